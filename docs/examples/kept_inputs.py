"""A method of one's own: keep the inputs that carry most of a layer's output, refit on them.

Structured input pruning, written outside matfactor and registered with it. For ``Y = X @ W``
with ``H = XᵀX``, input ``i`` carries ``‖X[:, i] W[i]‖² = H_ii ‖W[i]‖²`` of the output; the
method keeps the ``k = ⌊density · d_in⌋`` inputs that carry most, then refits their rows by least
squares on the calibration inputs, ``(H_KK + λI) W_K = H_K: W`` (the rows of the normal
equations of ``min ‖X W − X_K W_K‖²``, damped by ``λ = 0.01 mean(diag H_KK)`` for inputs that
are never active). It stores ``k · d_out`` values and ``k`` indices, and its layer computes
``x[..., K] @ W_K``: a smaller dense product, no sparse kernel needed.

Three declarations make it a method like the built-in ones: its result type (what the solve
returns), its module form (how a model computes with it and how a checkpoint stores it) and the
method itself (its solve, budget and memory model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from matfactor.adapters import (
    CompressedLinear,
    Method,
    MethodCall,
    register_method,
    register_module,
)
from matfactor.adapters.memory import error_bytes


@dataclass(frozen=True, eq=False)
class KeptInputs:
    """``Ŵ``, zero but on the rows ``index``, which hold ``W`` (``(k, d_out)``)."""

    index: torch.Tensor
    W: torch.Tensor
    d_in: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_in, int(self.W.shape[1]))

    def dense(self) -> torch.Tensor:
        full = self.W.new_zeros(self.shape)
        full[self.index] = self.W
        return full

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        return X[..., self.index] @ self.W

    @property
    def n_params(self) -> int:
        return self.W.numel()


@register_module
class KeptInputsLinear(CompressedLinear):
    """``y = x[..., index] @ W + b``."""

    kind = "kept_inputs_linear"
    result_type = KeptInputs
    stored = ("index", "weight")   # both stored as they are (the index as int32)

    def __init__(self, index: torch.Tensor, weight: torch.Tensor, d_in: int,
                 bias: torch.Tensor | None = None, *, compression: dict | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(d_in), int(weight.shape[1])
        self.register_buffer("index", index.to(device=weight.device, dtype=torch.long))
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.compression = compression or {"method": None, "arguments": {}}

    @classmethod
    def from_result(cls, result, cast, bias, *, pattern, density, compression):
        return cls(result.index, cast(result.W, "result.W"), result.d_in, bias, compression=compression)

    @classmethod
    def from_tensors(cls, tensors, entry):
        return cls(tensors["index"], tensors["weight"], entry["shape"][0], tensors.get("bias"),
                   compression=entry["compression"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.index), self.weight.T, self.bias)

    def dense_weight(self) -> torch.Tensor:
        full = self.weight.new_zeros(self.in_features, self.out_features)
        full[self.index] = self.weight.detach()
        return full

    @property
    def n_params(self) -> int:
        return self.weight.numel()


def _kept(density: float, d_in: int) -> int:
    k = math.floor(density * d_in + 1e-9)
    if k < 1:
        raise ValueError(f"density={density} keeps no input of {d_in}; increase density")
    return k


def solve(call: MethodCall) -> KeptInputs:
    W, H = call.W, call.H
    k = _kept(call.budget.density, W.shape[0])
    carried = torch.diagonal(H) * W.square().sum(dim=1)
    index = torch.sort(torch.topk(carried, k).indices).values
    H_KK = H[index][:, index]
    damping = call.arguments.get("damping", 0.01) * torch.diagonal(H_KK).mean()
    W_K = torch.linalg.solve(H_KK + damping * torch.eye(k, dtype=H.dtype, device=H.device),
                             H[index] @ W)
    return KeptInputs(index, W_K, W.shape[0])


def work_bytes(shape, budget, arguments, itemsize) -> int:
    """The rows ``H_K:``, ``H_KK``, the identity, the damped sum and its LU factor, the
    right-hand side and the solution; at the end, the dense ``Ŵ`` and the error evaluation."""
    d_in, d_out = shape
    k = _kept(budget.density, d_in)
    solve_peak = itemsize * (k * d_in + 4 * k * k + 2 * k * d_out) + 8 * k
    return max(solve_peak, error_bytes(shape, k * d_out * itemsize, itemsize))


register_method(Method("kept_inputs", solve, "density", work_bytes, options=("damping",),
                       summary="keep the inputs carrying most output, refit (a user's method)"))
