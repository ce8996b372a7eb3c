"""The layer reconstruction error shared by every result type.

With ``D = Ŵ − W`` and calibration Gram ``H = XᵀX``, the error of a compressed layer is

    rel_error = tr(Dᵀ H D) / tr(Wᵀ H W) = ||X Ŵ − X W||²_F / ||X W||²_F,

and with ``H = None`` the Frobenius version ``||D||²_F / ||W||²_F``. Any positive multiple of
``H`` gives the same value.
"""

from __future__ import annotations

from typing import Any

from ._array import as_compute_matrix, check_gram, common_compute_dtype, resolve_namespace

__all__ = ["layer_error", "weighted_sq_norm"]


def weighted_sq_norm(xp: Any, D: Any, H: Any | None) -> Any:
    """``tr(Dᵀ H D)`` (or ``||D||²_F`` for ``H=None``) as a 0-d array, without a host read."""
    if H is None:
        return xp.sum(D * D)
    return xp.sum(D * (H @ D))


def layer_error(W: Any, W_hat: Any, H: Any | None = None) -> float:
    """Relative layer error ``tr(Dᵀ H D) / tr(Wᵀ H W)`` with ``D = W_hat − W``.

    Parameters
    ----------
    W
        Original weight, ``(d_in, d_out)``.
    W_hat
        Its approximation, same shape.
    H
        Gram matrix ``XᵀX`` of the calibration inputs, ``(d_in, d_in)``; ``None`` for the
        Frobenius error.

    Returns
    -------
    float
        The relative error; 0 for an exact approximation. ``W`` with ``tr(WᵀHW) = 0`` (nothing
        to reconstruct) is an error.
    """
    xp, _ = resolve_namespace(W=W, W_hat=W_hat, H=H)
    dtype = common_compute_dtype(xp, W=W, W_hat=W_hat, H=H)
    W = as_compute_matrix(xp, W, "W", dtype)
    W_hat = as_compute_matrix(xp, W_hat, "W_hat", dtype)
    if W_hat.shape != W.shape:
        raise ValueError(f"W_hat has shape {tuple(W_hat.shape)} but W has shape {tuple(W.shape)}")
    if H is not None:
        H = as_compute_matrix(xp, H, "H", dtype)
        check_gram(xp, H, W.shape[0])
    reference = float(weighted_sq_norm(xp, W, H))
    if reference == 0.0:
        raise ValueError("W has zero norm under H (tr(WᵀHW) = 0): the relative error is undefined")
    return float(weighted_sq_norm(xp, W_hat - W, H)) / reference
