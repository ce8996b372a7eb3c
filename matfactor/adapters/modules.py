"""Compressed torch modules: the solvers' results as layers that compute with them.

Every module computes ``y = x @ Ŵ + b`` for inputs ``x`` of shape ``(..., d_in)`` (the
convolutions: the same on the im2col patches, see :mod:`matfactor.adapters.layers`), with ``Ŵ``
the ``(d_in, d_out)`` matrix of a solver's result, never formed by the factored modules:

- :class:`SparseLinear` (an ``nn.Linear``): ``weight = Ŵᵀ`` with zeros; nn.Linear's forward.
- :class:`DoubleSparseLinear`: ``A (d_in, k)`` and ``B (k, d_out)`` with zeros; ``(x @ A) @ B``.
- :class:`LowRankLinear`: ``U (d_in, r)`` and ``V (d_out, r)``; ``(x @ U) @ Vᵀ``.
- :class:`PifaLinear`: pivots, ``W_p (d_in, r)`` and ``C (r, d_out − r)``; PIFA's Algorithm 1.
- :class:`SparseLowRankLinear`: ``weight = Sᵀ`` with zeros, ``U``, ``V``; ``x @ S + (x @ U) @ Vᵀ``.
- :class:`SparseConv2d` (an ``nn.Conv2d``): its weight with zeros; nn.Conv2d's forward.
- :class:`UnfoldedConv2d`: one of the linear modules above, applied to the unfolded input.

A sparse part is held as what is kept (the DSF paper's appendix A.5): a 1-D parameter of its
kept values and a boolean buffer of where they are (:class:`SparseParameter`); reading the
attribute (``module.weight``, ``module.A``) gives the dense matrix with its zeros, made from the
two. So the stored values are the parameters: ``module.requires_grad_()`` (or
``model.requires_grad_()``) makes exactly them trainable, with the dense factors and the bias,
and whatever an optimiser does (momentum, weight decay, a preconditioner mixing the entries of
a matrix), under autocast, gradient accumulation or gradient checkpointing, a zero never becomes
nonzero and a pattern or a budget never breaks. On a CPU, PyTorch's CSR and COO products do not
beat the dense GEMM at 50% density, so each forward pass computes with the dense matrix it
makes (one scatter, cheap next to the product); :mod:`matfactor.adapters.checkpoint` stores the
values and a bitmask.

Parameters are ``nn.Parameter`` with ``requires_grad=False`` (the modules are built for
inference; gradients still flow to the input). The modules run in any floating dtype and on any
device (``module.to(...)`` as usual; the masks stay ``bool`` and the pivot indices ``int64``),
with or without autograd.

Every module is a :class:`CompressedModule`: it has ``compression`` (a JSON-able dict with at
least ``"method"`` and ``"arguments"``, as the caller gave it), :meth:`~CompressedModule.dense_weight`
(``Ŵ``), :meth:`~CompressedModule.to_dense` (a plain ``nn.Linear`` or ``nn.Conv2d`` with ``Ŵ``
merged back and the same bias) and :attr:`~CompressedModule.n_params` (stored weight values:
nonzeros of the sparse parts, every entry of the dense factors; neither biases nor indices).
:func:`compressed_module` builds the right one from a layer and a result, and
:func:`replace_module` puts it into a model.
"""

from __future__ import annotations

import json
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from matfactor import (
    DoubleSparse,
    LowRank,
    Pivoted,
    SparsePlusLowRank,
    mask_satisfies,
    nnz_budget,
    parse_pattern,
)
from matfactor import _validation

from .layers import weight_matrix
from .methods import Pruned

__all__ = [
    "CompressedConv2d",
    "CompressedLinear",
    "CompressedModule",
    "DoubleSparseLinear",
    "LowRankLinear",
    "PifaLinear",
    "SparseConv2d",
    "SparseLinear",
    "SparseLowRankLinear",
    "SparseParameter",
    "UnfoldedConv2d",
    "compressed_module",
    "module_kinds",
    "register_module",
    "replace_module",
]

Pair = tuple[int, int]
Cast = Callable[[Any, str], torch.Tensor]


# --------------------------------------------------------------------------- validation


def _check_matrices(owner: str, matrices: dict[str, Any]) -> None:
    """Each of ``matrices`` a finite floating-point 2-D tensor, all of one dtype and device."""
    first_name, first = next(iter(matrices.items()))
    for name, matrix in matrices.items():
        if not isinstance(matrix, torch.Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(matrix).__name__}")
        if not matrix.is_floating_point():
            raise TypeError(f"{owner}: {name} must be floating point, got {matrix.dtype}")
        if matrix.ndim != 2:
            raise ValueError(f"{owner}: {name} must be a 2-D matrix, got shape {tuple(matrix.shape)}")
        if (matrix.dtype, matrix.device) != (first.dtype, first.device):
            raise ValueError(f"{owner}: {name} is {matrix.dtype} on {matrix.device} but {first_name} "
                             f"is {first.dtype} on {first.device}; pass them in one dtype and device")
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError(f"{owner}: {name} contains NaN or Inf")


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    """A parameter holding ``tensor`` (no copy when it is contiguous), without gradient."""
    return nn.Parameter(tensor.contiguous(), requires_grad=False)


class SparseParameter:
    """A sparse matrix attribute of a compressed module, held as its kept values and their mask.

    A module class declares ``weight = SparseParameter()`` (or ``A``, ``B``) and stores a matrix
    with :meth:`hold`; the module then has ``<name>_values``, a 1-D ``nn.Parameter`` of the
    nonzeros in row-major order, and ``<name>_mask``, a boolean buffer of the matrix's shape
    that marks them (the DSF paper, appendix A.5: kept values as parameters, masks unpacked per
    forward pass). Reading ``module.<name>`` gives the dense matrix, zeros included, made by one
    ``masked_scatter`` (with autograd history when the values require grad).

    An optimiser only ever sees the values: the support, an ``n:m`` pattern and the number of
    stored values are those the solver produced, whatever the optimiser, schedule, autocast or
    accumulation. A value that training makes exactly zero stays stored (and counted) in the
    module; a checkpoint keeps the nonzeros.
    """

    name: str

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module: nn.Module | None, owner: type | None = None) -> Any:
        if module is None:
            return self
        values = module._parameters.get(f"{self.name}_values")
        mask = module._buffers.get(f"{self.name}_mask")
        if values is None or mask is None:
            # not held yet: nn.Linear's and nn.Conv2d's constructors register a placeholder
            # "weight" parameter, which nn.Module.__getattr__ finds after this AttributeError
            raise AttributeError(f"{type(module).__name__}.{self.name} is not set")
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    def __set__(self, module: nn.Module, value: Any) -> None:
        raise AttributeError(f"{type(module).__name__}.{self.name} is made from "
                             f"{self.name}_values and {self.name}_mask: change the values "
                             f"(module.{self.name}_values), the support is fixed")

    def hold(self, module: nn.Module, matrix: torch.Tensor) -> None:
        """Store ``matrix`` in ``module``: its nonzeros as the (frozen) values, its support as
        the mask."""
        module._parameters.pop(self.name, None)  # a base class's placeholder
        mask = matrix != 0
        module.register_parameter(f"{self.name}_values", _frozen(matrix[mask]))
        module.register_buffer(f"{self.name}_mask", mask)

    def count(self, module: nn.Module) -> int:
        """The number of values ``module`` stores for this matrix."""
        return module._parameters[f"{self.name}_values"].numel()


def _bias(owner: str, bias: Any, d_out: int, like: torch.Tensor) -> nn.Parameter | None:
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{owner}: bias must be None or a torch.Tensor, got {type(bias).__name__}")
    if tuple(bias.shape) != (d_out,):
        raise ValueError(f"{owner}: bias must have shape ({d_out},) (d_out), got {tuple(bias.shape)}")
    if (bias.dtype, bias.device) != (like.dtype, like.device):
        raise ValueError(f"{owner}: bias is {bias.dtype} on {bias.device} but the weight is "
                         f"{like.dtype} on {like.device}")
    if not bool(torch.isfinite(bias).all()):
        raise ValueError(f"{owner}: bias contains NaN or Inf")
    return _frozen(bias)


def _sparsity(owner: str, name: str, matrix: torch.Tensor, pattern: Any, density: Any,
              ) -> tuple[str | None, float | None]:
    """Validated ``(pattern, density)`` of a sparse ``(d_in, d_out)`` part, and its mask checked.

    ``(None, None)`` means unknown (nothing to check); a density without a pattern is
    unstructured. The mask test is :func:`matfactor.mask_satisfies` with ``exact=False``: a
    kept weight may be exactly zero.
    """
    if pattern is None and density is None:
        return None, None
    parsed = parse_pattern("unstructured" if pattern is None else pattern)
    density = _validation.density(density, parsed)
    if not mask_satisfies(matrix != 0, density, parsed, exact=False):
        raise ValueError(f"{owner}: {name} violates its sparsity pattern '{parsed}' (density "
                         f"{density:g}): it keeps {int(torch.count_nonzero(matrix))} nonzeros where the "
                         f"pattern allows {nnz_budget(tuple(matrix.shape), density, parsed)}, or more than "
                         "the pattern's count in some output column or group")
    return str(parsed), density


def _compression(compression: Any) -> dict[str, Any]:
    """A private copy of ``compression`` in the form a JSON round trip (a checkpoint) gives back."""
    if compression is None:
        return {"method": None, "arguments": {}}
    if not isinstance(compression, dict) or not {"method", "arguments"} <= compression.keys():
        raise TypeError("compression must be None or a dict with at least the keys 'method' and "
                        f"'arguments', got {compression!r}")
    try:
        return json.loads(json.dumps(compression, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"compression must be JSON-serialisable (it goes into checkpoint "
                         f"manifests): {error}") from None


def _conv_geometry(owner: str, name: str, value: Any, smallest: int) -> Pair:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < smallest
                             for v in pair):
        raise ValueError(f"{owner}: {name} must be an integer >= {smallest} or a pair of them, "
                         f"got {value!r}")
    return pair


# --------------------------------------------------------------------------- base classes


class CompressedModule(nn.Module):
    """Base class of the compressed layers: what every one of them offers.

    Each class declares how a checkpoint stores it and rebuilds it, and the checkpoint, the
    journal of resumable runs and the stored-bytes report read that declaration:

    Attributes
    ----------
    kind
        The module's name in checkpoint manifests (``"sparse_linear"``, ...).
    packed
        Attributes holding sparse matrices, stored packed (nonzeros and a bitmask).
    stored
        Attributes stored as they are (dense factors; integer indices as ``int32``).
    compression
        How it was made: a JSON-able dict with at least ``"method"`` and ``"arguments"``.
    """

    kind: ClassVar[str]
    packed: ClassVar[tuple[str, ...]] = ()
    stored: ClassVar[tuple[str, ...]] = ()
    compression: dict[str, Any]

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> CompressedModule:
        """The module rebuilt from its :attr:`packed` and :attr:`stored` tensors (and
        ``"bias"`` when it has one) and its checkpoint manifest entry (``"pattern"``,
        ``"density"``, ``"compression"``, ``"conv"``); the constructor checks them."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The ``(d_in, d_out)`` matrix ``Ŵ`` of ``y = x @ Ŵ + b``, without autograd history."""
        raise NotImplementedError

    @property
    def n_params(self) -> int:
        """Stored weight values: nonzeros of sparse parts plus dense factor entries (no bias,
        no indices); equal to the ``n_params`` of the result the module was built from."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """A plain layer with ``Ŵ`` merged back, the same bias, dtype and device."""
        raise NotImplementedError


class CompressedLinear(CompressedModule):
    """Base of the compressed linear layers: ``y = x @ Ŵ + b`` for ``x`` of shape ``(..., d_in)``.

    They replace ``nn.Linear`` and Hugging Face ``Conv1D`` layers alike (both compute that).

    Attributes
    ----------
    in_features, out_features
        ``d_in`` and ``d_out``.
    bias
        ``(d_out,)`` parameter or ``None``.
    """

    in_features: int
    out_features: int
    #: The type of solver result this module computes with (see :func:`register_module`).
    result_type: ClassVar[type]
    #: Attributes that ``repr`` shows after the shape and bias.
    _repr_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_result(cls, result: Any, cast: Cast, bias: torch.Tensor | None, *, pattern: str | None,
                    density: float | None, compression: dict[str, Any]) -> CompressedLinear:
        """The module computing with ``result`` (an instance of :attr:`result_type`) and
        ``bias``. ``cast(value, name)`` gives a result's floating tensor in the module's dtype and
        device (``name`` such as ``"result.A"`` for messages; a non-torch array is a TypeError);
        ``pattern`` and ``density`` are the recipe's, for a sparse part."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join([f"in_features={self.in_features}", f"out_features={self.out_features}",
                          f"bias={self.bias is not None}"]
                         + [f"{name}={getattr(self, name)!r}" for name in self._repr_fields])

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``Ŵᵀ`` and a copy of the bias (ordinary trainable
        parameters), in this module's dtype and on its device."""
        W = self.dense_weight()
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device="meta", dtype=W.dtype)  # meta: no initialisation to overwrite
        layer.weight = nn.Parameter(W.T.clone(memory_format=torch.contiguous_format))
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer


class CompressedConv2d(CompressedModule):
    """Base of the compressed ``nn.Conv2d`` replacements (``groups=1``, zero padding).

    ``Ŵ`` is the im2col matrix, ``(in_channels·kh·kw, out_channels)``, channel-major as in
    :func:`matfactor.adapters.layers.weight_matrix`.
    """

    in_channels: int
    out_channels: int
    kernel_size: Pair
    stride: Pair
    padding: Pair
    dilation: Pair

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` of the same geometry with weight ``Ŵᵀ`` reshaped to
        ``(out_channels, in_channels, kh, kw)`` and a copy of the bias."""
        W = self.dense_weight()
        layer = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                          padding=self.padding, dilation=self.dilation,
                          bias=self.bias is not None, device="meta", dtype=W.dtype)
        layer.weight = nn.Parameter(W.T.reshape(layer.weight.shape)
                                    .clone(memory_format=torch.contiguous_format))
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer


# --------------------------------------------------------------------------- linear modules


class _PrunedWeight:
    """What the pruned layers (an nn.Linear or nn.Conv2d whose ``weight`` holds the zeros) add
    to their torch base class."""

    weight = SparseParameter()
    pattern: str | None
    density: float | None

    @property
    def n_params(self) -> int:
        return _PrunedWeight.weight.count(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.pattern!r}, density={self.density}"


class SparseLinear(_PrunedWeight, nn.Linear, CompressedLinear):
    """A pruned linear layer: an ``nn.Linear`` whose weight has zeros.

    The forward pass is ``nn.Linear``'s: on a CPU the dense GEMM is the fastest product at the
    densities pruning reaches (PyTorch's CSR product does not beat it at 50%).

    Parameters
    ----------
    W
        ``(d_in, d_out)`` pruned weight ``Ŵ`` (matfactor's orientation); stored as
        ``weight = Ŵᵀ``, ``(d_out, d_in)``, like ``nn.Linear``'s.
    bias
        ``(d_out,)`` or ``None``, in ``W``'s dtype and device.
    pattern, density
        The sparsity pattern (``"unstructured"``, ``"per_output"``, ``"n:m"``) and kept fraction
        that ``W`` meets; ``W``'s support is checked against them. Both ``None``: unknown.
    compression
        How it was made (see :class:`CompressedModule`); ``None`` records nothing.

    Raises
    ------
    TypeError, ValueError
        A non-tensor, non-float, non-2-D or non-finite ``W`` or ``bias``, dtypes or devices that
        differ, a support that violates ``pattern``, a ``compression`` that is not JSON-able.
    """

    kind = "sparse_linear"
    result_type = Pruned
    packed = ("weight",)

    @classmethod
    def from_result(cls, result: Pruned, cast: Cast, bias: torch.Tensor | None, *, pattern: str | None,
                    density: float | None, compression: dict[str, Any]) -> SparseLinear:
        return cls(cast(result.W, "result"), bias, pattern=pattern, density=density,
                   compression=compression)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> SparseLinear:
        return cls(tensors["weight"].T, tensors.get("bias"), pattern=entry["pattern"],
                   density=entry["density"], compression=entry["compression"])

    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None = None, *, pattern: str | None = None,
                 density: float | None = None, compression: dict[str, Any] | None = None) -> None:
        _check_matrices(type(self).__name__, {"W": W})
        d_in, d_out = W.shape
        super().__init__(d_in, d_out, bias=bias is not None, device="meta", dtype=W.dtype)
        SparseLinear.weight.hold(self, W.T)
        self.register_parameter("bias", _bias(type(self).__name__, bias, d_out, W))
        self.pattern, self.density = _sparsity(type(self).__name__, "W", W, pattern, density)
        self.compression = _compression(compression)

    def dense_weight(self) -> torch.Tensor:
        """``Ŵ = weightᵀ``."""
        return self.weight.detach().T



class DoubleSparseLinear(CompressedLinear):
    """A double sparse factorization layer ``y = (x @ A) @ B + b`` (DSF paper, section 4).

    Parameters
    ----------
    A, B
        ``(d_in, k)`` and ``(k, d_out)`` factors, held as their kept values and masks
        (:class:`SparseParameter`).
    bias
        ``(d_out,)`` or ``None``.
    density
        The total kept fraction the factors meet, ``nnz(A) + nnz(B) <= floor(density·d_in·d_out)``
        (checked), or ``None``.
    compression
        How it was made (see :class:`CompressedModule`).
    """

    kind = "double_sparse_linear"
    result_type = DoubleSparse
    packed = ("A", "B")
    A = SparseParameter()
    B = SparseParameter()
    _repr_fields = ("k", "density")

    @classmethod
    def from_result(cls, result: DoubleSparse, cast: Cast, bias: torch.Tensor | None, *,
                    pattern: str | None, density: float | None,
                    compression: dict[str, Any]) -> DoubleSparseLinear:
        return cls(cast(result.A, "result.A"), cast(result.B, "result.B"), bias, density=density,
                   compression=compression)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> DoubleSparseLinear:
        return cls(tensors["A"], tensors["B"], tensors.get("bias"), density=entry["density"],
                   compression=entry["compression"])

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None, *,
                 density: float | None = None, compression: dict[str, Any] | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_matrices(owner, {"A": A, "B": B})
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"{owner}: A {tuple(A.shape)} and B {tuple(B.shape)} must be "
                             "(d_in, k) and (k, d_out)")
        self.in_features, self.out_features = int(A.shape[0]), int(B.shape[1])
        DoubleSparseLinear.A.hold(self, A)
        DoubleSparseLinear.B.hold(self, B)
        self.register_parameter("bias", _bias(owner, bias, self.out_features, A))
        if density is not None:
            shape = (self.in_features, self.out_features)
            budget = nnz_budget(shape, density, "unstructured")
            if self.n_params > budget:
                raise ValueError(f"{owner}: nnz(A) + nnz(B) = {self.n_params} exceeds the budget "
                                 f"{budget} of density {density:g} for a {shape} weight")
        self.density = density if density is None else float(density)
        self.compression = _compression(compression)

    @property
    def k(self) -> int:
        """The inner dimension: ``A`` is ``(d_in, k)``, ``B`` is ``(k, d_out)``."""
        return int(self.A.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x @ self.A, self.B.T, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return (self.A @ self.B).detach()

    @property
    def n_params(self) -> int:
        return DoubleSparseLinear.A.count(self) + DoubleSparseLinear.B.count(self)


class LowRankLinear(CompressedLinear):
    """A rank-``r`` layer ``y = (x @ U) @ Vᵀ + b``: ``r (d_in + d_out)`` multiply-adds a sample.

    Parameters
    ----------
    U, V
        ``(d_in, r)`` and ``(d_out, r)`` factors (:class:`matfactor.LowRank`'s ``Ŵ = U Vᵀ``).
    bias
        ``(d_out,)`` or ``None``.
    compression
        How it was made (see :class:`CompressedModule`).
    """

    kind = "lowrank_linear"
    result_type = LowRank
    stored = ("U", "V")
    _repr_fields = ("rank",)

    @classmethod
    def from_result(cls, result: LowRank, cast: Cast, bias: torch.Tensor | None, *, pattern: str | None,
                    density: float | None, compression: dict[str, Any]) -> LowRankLinear:
        return cls(cast(result.U, "result.U"), cast(result.V, "result.V"), bias, compression=compression)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> LowRankLinear:
        return cls(tensors["U"], tensors["V"], tensors.get("bias"), compression=entry["compression"])

    def __init__(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None, *,
                 compression: dict[str, Any] | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_matrices(owner, {"U": U, "V": V})
        if U.shape[1] != V.shape[1]:
            raise ValueError(f"{owner}: U {tuple(U.shape)} and V {tuple(V.shape)} must be (d_in, r) "
                             "and (d_out, r)")
        self.in_features, self.out_features = int(U.shape[0]), int(V.shape[0])
        self.U, self.V = _frozen(U), _frozen(V)
        self.register_parameter("bias", _bias(owner, bias, self.out_features, U))
        self.compression = _compression(compression)

    @property
    def rank(self) -> int:
        """``r``, the number of columns of ``U`` and ``V``."""
        return int(self.U.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x @ self.U, self.V, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return (self.U @ self.V.T).detach()

    @property
    def n_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)


class PifaLinear(CompressedLinear):
    """A pivoted-factorization layer (PIFA paper, Algorithm 1, transposed; :class:`matfactor.Pivoted`).

    ``Y_p = x @ W_p``, ``Y_np = Y_p @ C``, and one gather puts the output channels in order:
    ``r (d_in + d_out − r)`` multiply-adds a sample, against ``r (d_in + d_out)`` for
    :class:`LowRankLinear` at the same rank.

    Parameters
    ----------
    pivots, non_pivots
        ``(r,)`` and ``(d_out − r,)`` integer indices of the pivot output channels and of the
        others; together a permutation of ``range(d_out)`` (checked). Held as ``int64`` buffers,
        with ``gather``, the inverse permutation.
    W_p, C
        ``(d_in, r)`` pivot columns and ``(r, d_out − r)`` coefficients:
        ``Ŵ[:, pivots] = W_p`` and ``Ŵ[:, non_pivots] = W_p @ C``.
    bias
        ``(d_out,)`` or ``None``.
    compression
        How it was made (see :class:`CompressedModule`).
    """

    kind = "pifa_linear"
    result_type = Pivoted
    stored = ("pivots", "non_pivots", "W_p", "C")
    _repr_fields = ("rank",)

    @classmethod
    def from_result(cls, result: Pivoted, cast: Cast, bias: torch.Tensor | None, *, pattern: str | None,
                    density: float | None, compression: dict[str, Any]) -> PifaLinear:
        return cls(_as_torch(result.pivots, "result.pivots"),
                   _as_torch(result.non_pivots, "result.non_pivots"), cast(result.W_p, "result.W_p"),
                   cast(result.C, "result.C"), bias, compression=compression)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> PifaLinear:
        return cls(tensors["pivots"], tensors["non_pivots"], tensors["W_p"], tensors["C"],
                   tensors.get("bias"), compression=entry["compression"])

    def __init__(self, pivots: torch.Tensor, non_pivots: torch.Tensor, W_p: torch.Tensor,
                 C: torch.Tensor, bias: torch.Tensor | None = None, *,
                 compression: dict[str, Any] | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_matrices(owner, {"W_p": W_p, "C": C})
        rank = W_p.shape[1]
        for name, indices, length in (("pivots", pivots, rank), ("non_pivots", non_pivots, C.shape[1])):
            if not isinstance(indices, torch.Tensor) or indices.is_floating_point() \
                    or indices.is_complex() or indices.dtype == torch.bool:
                raise TypeError(f"{owner}: {name} must be an integer torch.Tensor, got "
                                f"{getattr(indices, 'dtype', type(indices).__name__)}")
            if tuple(indices.shape) != (length,):
                raise ValueError(f"{owner}: {name} must have shape ({length},) to match W_p "
                                 f"{tuple(W_p.shape)} and C {tuple(C.shape)}, got {tuple(indices.shape)}")
        if C.shape[0] != rank:
            raise ValueError(f"{owner}: W_p {tuple(W_p.shape)} and C {tuple(C.shape)} must be "
                             "(d_in, r) and (r, d_out − r)")
        d_out = rank + int(C.shape[1])
        order = torch.cat([pivots, non_pivots]).to(device=W_p.device, dtype=torch.long)
        if not torch.equal(torch.sort(order).values, torch.arange(d_out, device=W_p.device)):
            raise ValueError(f"{owner}: pivots and non_pivots must together be a permutation of "
                             f"range({d_out}) (distinct output channels, each in range)")
        self.in_features, self.out_features = int(W_p.shape[0]), d_out
        self.register_buffer("pivots", order[:rank])
        self.register_buffer("non_pivots", order[rank:])
        # Output channel j is column gather[j] of [Y_p | Y_np].
        self.register_buffer("gather", torch.argsort(order))
        self.W_p, self.C = _frozen(W_p), _frozen(C)
        self.register_parameter("bias", _bias(owner, bias, d_out, W_p))
        self.compression = _compression(compression)

    @property
    def rank(self) -> int:
        """``r``, the number of pivot output channels."""
        return int(self.W_p.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y_p = x @ self.W_p
        y = torch.cat([y_p, y_p @ self.C], dim=-1).index_select(-1, self.gather)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        W_p = self.W_p.detach()
        return torch.cat([W_p, W_p @ self.C.detach()], dim=1).index_select(1, self.gather)

    @property
    def n_params(self) -> int:
        return self.rank * (self.in_features + self.out_features - self.rank)


class SparseLowRankLinear(CompressedLinear):
    """A sparse plus low-rank layer ``y = x @ S + (x @ U) @ Vᵀ + b`` (HASSLE-free, OATS).

    Parameters
    ----------
    S
        ``(d_in, d_out)`` sparse part. Stored like an ``nn.Linear`` weight, ``weight = Sᵀ``
        ``(d_out, d_in)``: ``F.linear`` then adds the bias in the same GEMM, and an ``n:m``
        pattern runs along the contiguous dimension, the layout semi-structured sparse kernels
        expect.
    U, V
        ``(d_in, r)`` and ``(d_out, r)`` factors of the low-rank part.
    bias
        ``(d_out,)`` or ``None``.
    pattern, density
        The sparse part's pattern and kept fraction, checked against ``S`` (see
        :class:`SparseLinear`); both ``None``: unknown.
    compression
        How it was made (see :class:`CompressedModule`).
    """

    kind = "sparse_lowrank_linear"
    result_type = SparsePlusLowRank
    packed = ("weight",)
    stored = ("U", "V")
    weight = SparseParameter()
    _repr_fields = ("rank", "pattern", "density")

    @classmethod
    def from_result(cls, result: SparsePlusLowRank, cast: Cast, bias: torch.Tensor | None, *,
                    pattern: str | None, density: float | None,
                    compression: dict[str, Any]) -> SparseLowRankLinear:
        return cls(cast(result.S, "result.S"), cast(result.U, "result.U"), cast(result.V, "result.V"),
                   bias, pattern=pattern, density=density, compression=compression)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> SparseLowRankLinear:
        return cls(tensors["weight"].T, tensors["U"], tensors["V"], tensors.get("bias"),
                   pattern=entry["pattern"], density=entry["density"], compression=entry["compression"])

    def __init__(self, S: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                 bias: torch.Tensor | None = None, *, pattern: str | None = None,
                 density: float | None = None, compression: dict[str, Any] | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_matrices(owner, {"S": S, "U": U, "V": V})
        if U.shape[1] != V.shape[1] or (U.shape[0], V.shape[0]) != tuple(S.shape):
            raise ValueError(f"{owner}: S {tuple(S.shape)}, U {tuple(U.shape)} and V {tuple(V.shape)} "
                             "must be (d_in, d_out), (d_in, r) and (d_out, r)")
        self.in_features, self.out_features = int(S.shape[0]), int(S.shape[1])
        SparseLowRankLinear.weight.hold(self, S.T)
        self.U, self.V = _frozen(U), _frozen(V)
        self.register_parameter("bias", _bias(owner, bias, self.out_features, S))
        self.pattern, self.density = _sparsity(owner, "S", S, pattern, density)
        self.compression = _compression(compression)

    @property
    def rank(self) -> int:
        """``r``, the number of columns of ``U`` and ``V``."""
        return int(self.U.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(x @ self.U, self.V)

    def dense_weight(self) -> torch.Tensor:
        return (self.weight.T + self.U @ self.V.T).detach()

    @property
    def n_params(self) -> int:
        return SparseLowRankLinear.weight.count(self) + self.rank * (self.in_features
                                                                     + self.out_features)


# --------------------------------------------------------------------------- convolutions


class SparseConv2d(_PrunedWeight, nn.Conv2d, CompressedConv2d):
    """A pruned convolution: an ``nn.Conv2d`` (``groups=1``, zero padding) whose weight has zeros.

    Parameters
    ----------
    weight
        ``(out_channels, in_channels, kh, kw)`` pruned weight, as ``nn.Conv2d`` stores it; its
        im2col matrix ``Ŵ = weight.reshape(out_channels, −1).T`` meets ``pattern``.
    bias
        ``(out_channels,)`` or ``None``.
    stride, padding, dilation
        As for ``nn.Conv2d`` (integers or pairs; ``padding`` as numbers, not ``"same"``).
    pattern, density, compression
        As for :class:`SparseLinear`, the pattern applying to ``Ŵ``.
    """

    kind = "sparse_conv2d"
    packed = ("weight",)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> SparseConv2d:
        geometry = entry["conv"]
        return cls(tensors["weight"], tensors.get("bias"), stride=geometry["stride"],
                   padding=geometry["padding"], dilation=geometry["dilation"], pattern=entry["pattern"],
                   density=entry["density"], compression=entry["compression"])

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 stride: int | Pair = 1, padding: int | Pair = 0, dilation: int | Pair = 1,
                 pattern: str | None = None, density: float | None = None,
                 compression: dict[str, Any] | None = None) -> None:
        owner = type(self).__name__
        if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
            raise ValueError(f"{owner}: weight must be a 4-D (out_channels, in_channels, kh, kw) "
                             f"tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
        c_out, c_in, kh, kw = weight.shape
        W = weight.reshape(c_out, -1).T
        _check_matrices(owner, {"weight": W})
        super().__init__(c_in, c_out, (kh, kw), stride=_conv_geometry(owner, "stride", stride, 1),
                         padding=_conv_geometry(owner, "padding", padding, 0),
                         dilation=_conv_geometry(owner, "dilation", dilation, 1),
                         bias=bias is not None, device="meta", dtype=weight.dtype)
        SparseConv2d.weight.hold(self, weight)
        self.register_parameter("bias", _bias(owner, bias, c_out, weight))
        self.pattern, self.density = _sparsity(owner, "weight", W, pattern, density)
        self.compression = _compression(compression)

    def dense_weight(self) -> torch.Tensor:
        """``Ŵ``, the weight as a ``(in_channels·kh·kw, out_channels)`` matrix."""
        return self.weight.detach().reshape(self.out_channels, -1).T



class UnfoldedConv2d(CompressedConv2d):
    """A convolution whose im2col matrix is compressed by a :class:`CompressedLinear` module.

    ``F.unfold`` turns an ``(N, in_channels, H, W)`` input into its ``L = H_out·W_out`` patches
    ``(N, L, in_channels·kh·kw)`` (channel-major, as ``weight_matrix`` reads a Conv2d); the linear
    module maps them to ``(N, L, out_channels)``, bias included, which is reshaped to
    ``(N, out_channels, H_out, W_out)``. Unbatched ``(in_channels, H, W)`` inputs work too.

    The unfolded patches take ``kh·kw`` times the input's memory: the price of running a
    factored weight without a dedicated convolution kernel.

    Parameters
    ----------
    linear
        The compressed im2col matrix, with ``in_features = in_channels·kh·kw``; it holds the
        bias and the ``compression`` record, which this module exposes as its own.
    in_channels
        Input channels of the convolution.
    kernel_size, stride, padding, dilation
        As for ``nn.Conv2d`` (integers or pairs).
    """

    kind = "unfolded_conv2d"

    def __init__(self, linear: CompressedLinear, *, in_channels: int, kernel_size: int | Pair,
                 stride: int | Pair = 1, padding: int | Pair = 0, dilation: int | Pair = 1) -> None:
        super().__init__()
        owner = type(self).__name__
        if not isinstance(linear, CompressedLinear):
            raise TypeError(f"{owner}: linear must be a CompressedLinear module, got "
                            f"{type(linear).__name__}")
        self.kernel_size = _conv_geometry(owner, "kernel_size", kernel_size, 1)
        self.stride = _conv_geometry(owner, "stride", stride, 1)
        self.padding = _conv_geometry(owner, "padding", padding, 0)
        self.dilation = _conv_geometry(owner, "dilation", dilation, 1)
        patch = self.kernel_size[0] * self.kernel_size[1]
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) \
                or in_channels * patch != linear.in_features:
            raise ValueError(f"{owner}: in_channels ({in_channels!r}) times the kernel's "
                             f"{patch} positions must equal linear.in_features ({linear.in_features})")
        self.in_channels, self.out_channels = in_channels, linear.out_features
        self.linear = linear

    @property
    def bias(self) -> nn.Parameter | None:
        """The inner linear module's bias, ``(out_channels,)`` or ``None``."""
        return self.linear.bias

    @property
    def compression(self) -> dict[str, Any]:
        """The inner linear module's ``compression`` record."""
        return self.linear.compression

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: expected an (N, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W) input, got shape {tuple(x.shape)}")
        batch = x if x.ndim == 4 else x.unsqueeze(0)
        n, _, height, width = batch.shape
        patches = F.unfold(batch, self.kernel_size, dilation=self.dilation, padding=self.padding,
                           stride=self.stride)  # (N, C_in·kh·kw, L)
        y = self.linear(patches.transpose(1, 2))  # (N, L, C_out)
        size = [(extent + 2 * p - d * (k - 1) - 1) // s + 1 for extent, k, s, p, d in
                zip((height, width), self.kernel_size, self.stride, self.padding, self.dilation)]
        y = y.transpose(1, 2).reshape(n, self.out_channels, *size)
        return y if x.ndim == 4 else y.squeeze(0)

    def dense_weight(self) -> torch.Tensor:
        return self.linear.dense_weight()

    @property
    def n_params(self) -> int:
        return self.linear.n_params

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}")


# --------------------------------------------------------------------------- factory


#: The module form of each result type, and every module class by its manifest kind.
_FORMS: dict[type, type[CompressedLinear]] = {}
_KINDS: dict[str, type[CompressedModule]] = {}


def register_module(module_class: type[CompressedModule]) -> type[CompressedModule]:
    """Make ``module_class`` the form of its ``result_type``, and loadable by its ``kind``.

    After this, :func:`compressed_module` builds it from a solver's result of that type, and
    checkpoints and resumable runs store and rebuild it from the tensors it declares
    (``packed``, ``stored``) with its ``from_tensors``. Usable as a class decorator; registering
    the same class again does nothing.

    Parameters
    ----------
    module_class
        A :class:`CompressedLinear` subclass with ``kind``, ``result_type``, ``packed`` and/or
        ``stored``, ``from_result`` and ``from_tensors`` (a convolution class has no
        ``result_type``: it is rebuilt by kind only).

    Raises
    ------
    TypeError
        Not a :class:`CompressedModule` subclass, or a linear one without ``result_type``.
    ValueError
        Its kind or result type is taken by another class, it declares a tensor twice, or none.
    """
    if not (isinstance(module_class, type) and issubclass(module_class, CompressedModule)):
        raise TypeError(f"module_class must be a CompressedModule subclass, got {module_class!r}")
    kind = getattr(module_class, "kind", None)
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ValueError(f"{module_class.__name__}.kind must be an identifier such as 'my_linear', "
                         f"got {kind!r}")
    tensors = module_class.packed + module_class.stored
    if not tensors or len(set(tensors)) != len(tensors) or "bias" in tensors:
        raise ValueError(f"{module_class.__name__} must declare its tensors once each in packed and "
                         f"stored (the bias apart), got packed={module_class.packed}, "
                         f"stored={module_class.stored}")
    if _KINDS.get(kind, module_class) is not module_class:
        raise ValueError(f"kind {kind!r} is already the kind of {_KINDS[kind].__name__}")
    if issubclass(module_class, CompressedLinear):
        result_type = getattr(module_class, "result_type", None)
        if not isinstance(result_type, type):
            raise TypeError(f"{module_class.__name__}.result_type must be the class of the results "
                            f"it computes with, got {result_type!r}")
        if _FORMS.get(result_type, module_class) is not module_class:
            raise ValueError(f"{result_type.__name__} results already have the module form "
                             f"{_FORMS[result_type].__name__}")
        _FORMS[result_type] = module_class
    _KINDS[kind] = module_class
    return module_class


def module_kinds() -> dict[str, type[CompressedModule]]:
    """Every registered module class by its manifest kind (a copy)."""
    return dict(_KINDS)


def _form(result: Any) -> type[CompressedLinear]:
    """The module form of ``result``'s type (or of its nearest registered base class)."""
    for cls in type(result).__mro__:
        if cls in _FORMS:
            return _FORMS[cls]
    known = ", ".join(["torch.Tensor (a pruned weight)", *sorted(t.__name__ for t in _FORMS)])
    raise TypeError(f"result must be one of {known} (or a result type registered with "
                    f"register_module), got {type(result).__name__}")


for _module_class in (SparseLinear, DoubleSparseLinear, LowRankLinear, PifaLinear, SparseLowRankLinear,
                      SparseConv2d):
    register_module(_module_class)


def _as_torch(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} is a {type(value).__module__}.{type(value).__name__}; "
                        "compressed_module needs torch tensors (run the solver on torch tensors)")
    return value.detach()


def compressed_module(original: nn.Module, result: Any, *,
                      compression: dict[str, Any] | None) -> CompressedModule:
    """The compressed replacement of ``original`` computing with ``result``.

    - a tensor (a pruner's output) or a :class:`~matfactor.adapters.methods.Pruned`:
      :class:`SparseLinear`, or :class:`SparseConv2d` for a Conv2d;
    - :class:`matfactor.DoubleSparse`, :class:`matfactor.LowRank`, :class:`matfactor.Pivoted`,
      :class:`matfactor.SparsePlusLowRank`: :class:`DoubleSparseLinear`, :class:`LowRankLinear`,
      :class:`PifaLinear`, :class:`SparseLowRankLinear`; for a Conv2d, an
      :class:`UnfoldedConv2d` wrapping that module;
    - a result type registered with :func:`register_module`: its module form.

    A Hugging Face ``Conv1D`` becomes a linear module: both compute ``x @ W + b`` on inputs
    ``(..., d_in)``.

    Parameters
    ----------
    original
        The dense layer: ``nn.Linear``, ``transformers.pytorch_utils.Conv1D`` or ``nn.Conv2d``
        (``groups=1``, numeric zero padding).
    result
        A solver's result for ``original``'s ``(d_in, d_out)`` matrix (see
        :func:`matfactor.adapters.layers.weight_matrix`), holding torch tensors. Its values are
        cast to ``original``'s weight dtype and device (solvers return float32 or float64).
    compression
        ``{"method": ..., "arguments": {...}, ...}``, JSON-able, stored as the module's
        ``compression``. Its ``"pattern"`` and ``"density"`` (absent: ``None``) describe the
        sparse part of a pruned or sparse-plus-low-rank result, which is checked against them;
        for a :class:`matfactor.DoubleSparse`, ``"density"`` is the budget of both factors.

    Returns
    -------
    CompressedModule
        With a copy of ``original``'s bias, in its weight's dtype and on its device, in the
        same training mode.

    Raises
    ------
    TypeError
        ``original`` of another layer type, ``result`` of another type or holding non-torch
        arrays, a ``compression`` that is not a dict with ``"method"`` and ``"arguments"``.
    ValueError
        ``result`` of another shape than the layer's matrix, with NaN/Inf, or whose support
        violates the pattern; a grouped convolution.
    """
    W = weight_matrix(original, "original")
    if isinstance(result, torch.Tensor):
        result = Pruned(result)
    form = _form(result)
    if tuple(result.shape) != tuple(W.shape):
        raise ValueError(f"result has shape {tuple(result.shape)} but the {type(original).__name__} "
                         f"layer's (d_in, d_out) weight matrix is {tuple(W.shape)}")
    compression = _compression(compression)
    pattern, density = compression.get("pattern"), compression.get("density")
    dtype, device = original.weight.dtype, original.weight.device

    def cast(value: Any, name: str) -> torch.Tensor:
        return _as_torch(value, name).to(device=device, dtype=dtype)

    bias = None if original.bias is None else original.bias.detach().clone()
    if isinstance(original, nn.Conv2d) and form is SparseLinear:
        # a pruned convolution keeps nn.Conv2d's forward, its weight in the conv layout
        module = SparseConv2d(cast(result.W, "result").T.reshape(original.weight.shape), bias,
                              stride=original.stride, padding=original.padding,
                              dilation=original.dilation, pattern=pattern, density=density,
                              compression=compression)
    else:
        module = form.from_result(result, cast, bias, pattern=pattern, density=density,
                                  compression=compression)
        if isinstance(original, nn.Conv2d):
            module = UnfoldedConv2d(module, in_channels=original.in_channels,
                                    kernel_size=original.kernel_size, stride=original.stride,
                                    padding=original.padding, dilation=original.dilation)
    return module.train(original.training)


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` at the dotted submodule ``name`` of ``model``; return the one it replaces.

    Parameters
    ----------
    model
        The model to modify in place.
    name
        A submodule's name as in ``model.named_modules()``, e.g.
        ``"encoder.layer.0.attention.self.query"`` (list indices are names: ``"layers.3"``).
    new_module
        The replacement.

    Raises
    ------
    TypeError
        If ``new_module`` is not an ``nn.Module``.
    ValueError
        If ``model`` has no submodule ``name`` (empty ``name``: the model cannot replace itself).
    """
    if not isinstance(new_module, nn.Module):
        raise TypeError(f"new_module must be an nn.Module, got {type(new_module).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a submodule's dotted name such as 'encoder.layer.0.output', "
                         f"got {name!r}")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    children = {} if parent is None else dict(parent.named_children())
    if child not in children:
        raise ValueError(f"model has no submodule {name!r}")
    setattr(parent, child, new_module)
    return children[child]
