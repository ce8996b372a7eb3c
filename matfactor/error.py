"""The layer reconstruction error shared by every result type.

With ``D = Ŵ − W`` and calibration Gram ``H = XᵀX``, the error of a compressed layer is

    rel_error = tr(Dᵀ H D) / tr(Wᵀ H W) = ||X Ŵ − X W||²_F / ||X W||²_F,

and with ``H = None`` the Frobenius version ``||D||²_F / ||W||²_F``. Any positive multiple of
``H`` gives the same value.
"""

from __future__ import annotations

import math
from typing import Any

from . import _validation as check

__all__ = ["layer_error"]


def _weighted_sq_norm(xp: Any, D: Any, H: Any | None) -> Any:
    """``tr(Dᵀ H D)`` (or ``||D||²_F`` for ``H=None``) as a 0-d array, without a host read.

    On validated arrays of moderate magnitude (the solvers' scaled problems): it overflows
    where ``D² H`` does.
    """
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
        The relative error; 0 for an exact approximation, ``inf`` only when the ratio exceeds
        the range of a Python float. ``W`` with ``tr(WᵀHW) = 0`` (nothing to reconstruct) is an
        error.

    Notes
    -----
    Exact in its scaling for any finite input of the dtype: ``W``, ``W_hat`` and ``H`` are
    brought to unit magnitude by powers of two (``W`` and ``W_hat`` by a common one, so that
    their difference cannot overflow), the difference ``D`` and ``W`` are each scaled to unit
    magnitude again before the weighted sums of squares, and the ratio of the two sums is
    scaled back in Python floats.
    """
    xp, _ = check.namespace(W=W, W_hat=W_hat, H=H, optional=("H",))
    dtype = check.common_dtype(xp, W=W, W_hat=W_hat, H=H)
    W = check.matrix(xp, W, "W", dtype)
    W_hat = check.matrix(xp, W_hat, "W_hat", dtype, shape=tuple(W.shape))
    if H is not None:
        H = check.matrix(xp, H, "H", dtype)
        check.gram(xp, H, W.shape[0])
        H, _ = check.normalised(xp, H, "H")
    common = check.binary_exponent(max(check.finite_max(xp, W, "W"),
                                       check.finite_max(xp, W_hat, "W_hat")))
    D = check.times_power_of_two(xp, W_hat, -common) - check.times_power_of_two(xp, W, -common)
    D_unit, d_exponent = check.normalised(xp, D, "W_hat - W")
    W_unit, w_exponent = check.normalised(xp, W, "W")
    reference = float(_weighted_sq_norm(xp, W_unit, H))
    if reference == 0.0:
        raise ValueError("W has zero norm under H (tr(WᵀHW) = 0): the relative error is undefined")
    ratio = float(_weighted_sq_norm(xp, D_unit, H)) / reference
    try:
        return math.ldexp(ratio, 2 * (d_exponent + common - w_exponent))
    except OverflowError:
        return math.inf
