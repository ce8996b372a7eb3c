"""What the solvers need of a Gram matrix's diagonal: dead inputs, scales, damping.

One implementation of each idea that several solvers share (``DESIGN.md``: dead inputs and
diagonal scaling), on validated arrays:

- an input ``i`` is *dead* when ``H_ii = 0`` (never active on the calibration set): its row
  and column of ``H`` are zero, its weights cannot change the layer's output, and no solver
  divides by its diagonal;
- *damping* is relative: ``λ = damping · h̄`` with ``h̄`` the mean diagonal over the live
  inputs, so that any positive multiple of ``H`` gives the same answer;
- *diagonal scaling* (the HASSLE-free paper's eq. (7), the DSF paper's preconditioning of
  section 3.1) works in coordinates where the diagonal is 1.
"""

from __future__ import annotations

from typing import Any

from . import _validation as check
from ._array import add_to_diagonal

__all__ = ["dead_inputs", "live_mean", "unit_diagonal", "diagonal_scaling", "damped_hessian",
           "input_norms"]


def dead_inputs(xp: Any, H: Any) -> Any:
    """Boolean vector of the inputs with a non-positive diagonal entry of ``H``."""
    return xp.linalg.diagonal(H) <= 0


def live_mean(xp: Any, H: Any, dead: Any) -> Any:
    """``h̄``, the mean diagonal of ``H`` over the live inputs, as a 0-d array (no host read).

    At least one input must be live (the front door checks it: ``gram(require_live=True)``).
    """
    diagonal = xp.linalg.diagonal(H)
    live_count = xp.sum(xp.astype(~dead, diagonal.dtype))
    return xp.sum(xp.where(dead, xp.zeros_like(diagonal), diagonal)) / live_count


def unit_diagonal(xp: Any, G: Any) -> tuple[Any, Any]:
    """``(√diag(G), dead)``, the scales that bring a Gram matrix to a unit diagonal.

    The scale of a dead entry is 1, so that dividing by it is always safe; callers zero what
    they own of it.
    """
    diagonal = xp.linalg.diagonal(G)
    dead = diagonal <= 0
    return xp.sqrt(xp.where(dead, xp.ones_like(diagonal), diagonal)), dead


def diagonal_scaling(xp: Any, H: Any, damping: float) -> tuple[Any, Any, Any]:
    """The Gram matrix with unit diagonal of the HASSLE-free paper's eq. (7), damping included.

    ``λ = damping · h̄`` is added to the live diagonal (dead inputs are no part of the problem:
    their rows of the result are zero), and ``D = √diag(H + λI)``. Returns ``(H_n, scale,
    dead)`` with ``H_n = D⁻¹ (H + λI) D⁻¹``, ``scale = D / √h̄`` (1 for dead inputs, whose rows
    and columns of ``H_n`` stay zero) and the boolean vector of dead inputs. ``H_n`` does not
    depend on the scale of ``H``.
    """
    diagonal = xp.linalg.diagonal(H)
    dead = diagonal <= 0
    mean = live_mean(xp, H, dead)
    zeros = xp.zeros_like(diagonal)
    damped = xp.where(dead, zeros, diagonal + damping * mean)
    root = xp.sqrt(xp.where(dead, xp.ones_like(diagonal), damped))
    H_n = H / root[:, None] / root[None, :]
    if damping > 0:
        # (H + λI)_ii / D_ii² = 1 on live inputs: the damping adds λ / D_ii² there.
        H_n = add_to_diagonal(xp, H_n, xp.where(dead, zeros, damping * mean / (root * root)))
    return H_n, root / xp.sqrt(mean), dead


def damped_hessian(xp: Any, H: Any, damping: float) -> tuple[Any, Any]:
    """``H`` made positive definite: dead inputs filled, then relative damping added.

    A dead input has an all-zero row and column in ``H``; its diagonal entry is set to ``h̄``
    so that the matrix can be factored (its weights are set to zero by the callers). Then
    ``damping · h̄`` is added to the diagonal, which makes the result independent of the scale
    of ``H``. Returns the damped matrix and the boolean vector of dead inputs.
    """
    dead = dead_inputs(xp, H)
    mean = live_mean(xp, H, dead)
    diagonal = xp.linalg.diagonal(H)
    fill = xp.where(dead, mean, xp.zeros_like(diagonal))
    return add_to_diagonal(xp, H, fill + damping * mean), dead


def input_norms(xp: Any, H: Any) -> tuple[Any, int]:
    """Wanda's input norms ``‖X_i‖ = √H_ii`` (0 for dead inputs) as ``(norms, e)``.

    The true norms are ``norms · 2**e``: the diagonal is scaled to unit magnitude by an even
    power of two first (exact, and the square root of a power of two with it), so that the
    norms cannot overflow or underflow whatever the scale of ``H``. A mask of scores built
    from them does not depend on ``e``.
    """
    diagonal, exponent = check.normalised(xp, xp.linalg.diagonal(H), "H", even=True)
    return xp.sqrt(xp.clip(diagonal, 0, None)), exponent // 2
