"""Layer ↔ matrix problem: which torch modules are compressible and how their weight is read.

matfactor's convention is ``Y = X @ W`` with ``W`` of shape ``(d_in, d_out)`` and samples as
rows of ``X``. A module of each supported type maps onto it exactly:

- ``torch.nn.Linear`` stores ``weight`` as ``(d_out, d_in)`` and computes ``x @ weight.T``:
  ``W = weight.T`` and ``X`` is the input with its leading dimensions flattened.
- Hugging Face ``Conv1D`` (GPT-2 style) already stores ``(d_in, d_out)`` and computes
  ``x @ weight``: ``W = weight``.
- ``torch.nn.Conv2d`` is a linear map of its unfolded input (im2col): ``F.unfold`` turns an
  ``(N, C_in, h, w)`` input into ``(N, C_in·kh·kw, L)`` patches, channel-major, the order of
  ``weight.reshape(C_out, C_in·kh·kw)``. So ``W = weight.reshape(C_out, −1).T`` and ``X`` is the
  patches as rows, ``(N·L, C_in·kh·kw)``. Grouped convolutions (``groups > 1``) are refused:
  their weight is block-diagonal in this form, which no method here preserves.

Biases are never part of the problem: they are added after ``X @ W`` and left untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["is_compressible", "layer_inputs", "weight_matrix"]


def _hf_conv1d() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is an optional extra
        return None
    return Conv1D


def _check_conv2d(module: nn.Conv2d, name: str) -> None:
    if module.groups != 1:
        raise ValueError(f"{name}: grouped convolution (groups={module.groups}) cannot be compressed: "
                         "its im2col weight is block-diagonal and no method keeps that structure; "
                         "exclude it with the recipe's 'ignore' list")
    if module.padding_mode != "zeros":
        raise ValueError(f"{name}: Conv2d with padding_mode={module.padding_mode!r} is not supported "
                         "(only 'zeros' maps onto F.unfold); exclude it with the recipe's 'ignore' list")
    if isinstance(module.padding, str):
        raise ValueError(f"{name}: Conv2d with padding={module.padding!r} is not supported; give the "
                         "padding as numbers, or exclude the layer with the recipe's 'ignore' list")


def is_compressible(module: nn.Module) -> bool:
    """Whether ``module`` is a layer type with a matrix problem (Linear, HF Conv1D, Conv2d)."""
    conv1d = _hf_conv1d()
    return isinstance(module, (nn.Linear, nn.Conv2d)) or (conv1d is not None
                                                           and isinstance(module, conv1d))


def weight_matrix(module: nn.Module, name: str = "module") -> torch.Tensor:
    """The ``(d_in, d_out)`` matrix ``W`` of ``module`` (a view, never a copy, never with grad).

    Parameters
    ----------
    module
        ``nn.Linear``, Hugging Face ``Conv1D`` or ``nn.Conv2d`` (``groups=1``).
    name
        The module's name in its model, used in error messages.

    Returns
    -------
    torch.Tensor
        ``weight.T`` (Linear), ``weight`` (Conv1D), ``weight.reshape(C_out, −1).T`` (Conv2d),
        detached from autograd.
    """
    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        return weight.T
    if isinstance(module, nn.Conv2d):
        _check_conv2d(module, name)
        return weight.reshape(weight.shape[0], -1).T
    conv1d = _hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return weight
    raise TypeError(f"{name}: {type(module).__name__} has no matrix problem; supported layers are "
                    "torch.nn.Linear, transformers' Conv1D and torch.nn.Conv2d")


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``X`` (``(n_samples, d_in)``) of ``module``'s matrix problem for its input ``x``.

    For Linear and Conv1D the leading dimensions of ``x`` are flattened (batch, sequence); for
    Conv2d the input is unfolded into its patches (im2col), one row per output position.
    """
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)  # (N, C_in·kh·kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def set_weight_matrix(module: nn.Module, W: Any) -> None:
    """Write a ``(d_in, d_out)`` matrix back into ``module``'s weight, in its dtype and device."""
    with torch.no_grad():
        weight = module.weight
        if isinstance(module, nn.Linear):
            weight.copy_(W.T)
        elif isinstance(module, nn.Conv2d):
            weight.copy_(W.T.reshape(weight.shape))
        else:
            weight.copy_(W)
