"""The Sylvester-type equation ``M A N + ρ A = C`` by two eigendecompositions.

In the layer-wise double sparse factorization (DSF paper, section 4.3 and appendix A.1) the
ADMM step for the factor ``A`` next to the input minimises
``‖X W − X A B‖² + ρ/2 ‖A − Z + U‖²``, whose normal equation is

    H A (B Bᵀ) + ρ A = H W Bᵀ + ρ (Z − U),      H = XᵀX,

an equation ``M A N + ρ A = C`` with symmetric positive semi-definite ``M`` and ``N``. With
``M = Q diag(d) Qᵀ`` and ``N = R diag(e) Rᵀ`` it decouples entrywise (appendix A.1):

    Qᵀ A R = (Qᵀ C R) ⊘ (d eᵀ + ρ),

so ``A = Q [(Qᵀ C R) ⊘ (d eᵀ + ρ)] Rᵀ``. Both decompositions are computed once; every solve,
for any right-hand side and any ``ρ``, then costs four matrix products — exactly what an ADMM
loop with a changing right-hand side (and a first step with a smaller ``ρ₀``) needs.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from ._array import (
    as_compute_matrix,
    check_finite,
    check_symmetric,
    common_compute_dtype,
    resolve_namespace,
)

__all__ = ["SylvesterSolver"]


class SylvesterSolver:
    """Solver for ``M A N + ρ A = C``, decomposing ``M`` and ``N`` once.

    Parameters
    ----------
    M
        ``(p, p)`` symmetric positive semi-definite matrix (e.g. ``H = XᵀX``).
    N
        ``(q, q)`` symmetric positive semi-definite matrix (e.g. ``B Bᵀ``).

    Raises
    ------
    ValueError
        If ``M`` or ``N`` is not square, not symmetric, or holds NaN/Inf.

    Notes
    -----
    Eigenvalues that rounding makes slightly negative are clipped to zero: the operator
    ``A ↦ M A N`` is then positive semi-definite and ``ρ > 0`` always gives a unique solution.
    With ``ρ = 0`` the system is singular as soon as ``M`` or ``N`` is, which :meth:`solve`
    reports instead of dividing by zero.
    """

    def __init__(self, M: Any, N: Any) -> None:
        xp, device = resolve_namespace(M=M, N=N)
        dtype = common_compute_dtype(xp, M=M, N=N)
        M = as_compute_matrix(xp, M, "M", dtype)
        N = as_compute_matrix(xp, N, "N", dtype)
        check_symmetric(xp, M, "M", "positive semi-definite")
        check_symmetric(xp, N, "N", "positive semi-definite")
        self._xp, self.device, self.dtype = xp, device, dtype
        d, self._Q = xp.linalg.eigh(M)
        e, self._R = xp.linalg.eigh(N)
        self.eigenvalues_M = xp.clip(d, 0, None)
        self.eigenvalues_N = xp.clip(e, 0, None)
        self.shape = (M.shape[0], N.shape[0])
        # Products of eigenvalues below this are zero to working precision.
        eps = float(xp.finfo(dtype).eps)
        largest = float(xp.max(self.eigenvalues_M)) * float(xp.max(self.eigenvalues_N))
        self._singular = (float(xp.min(self.eigenvalues_M)) * float(xp.min(self.eigenvalues_N))
                          <= eps * max(self.shape) * largest)

    def solve(self, C: Any, rho: float) -> Any:
        """The ``A`` with ``M A N + ρ A = C`` (appendix A.1).

        Parameters
        ----------
        C
            ``(p, q)`` right-hand side.
        rho
            Non-negative shift ``ρ``.

        Raises
        ------
        ValueError
            If ``C`` has the wrong shape or NaN/Inf, ``rho`` is negative or not finite, or
            ``rho = 0`` while ``M`` or ``N`` is singular.
        """
        xp = self._xp
        resolve_namespace(M=self._Q, C=C)
        if C.ndim != 2 or tuple(C.shape) != self.shape:
            raise ValueError(f"C must have shape {self.shape} (rows of M, rows of N), got "
                             f"{tuple(C.shape)}")
        if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) \
                or rho < 0:
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        if rho == 0 and self._singular:
            raise ValueError("the system M A N = C is singular (M or N is singular) and rho = 0; "
                             "pass rho > 0")
        C = xp.astype(C, self.dtype, copy=False) if C.dtype != self.dtype else C
        check_finite(xp, C, "C")
        rotated = self._Q.T @ C @ self._R
        denominator = self.eigenvalues_M[:, None] * self.eigenvalues_N[None, :] + float(rho)
        return self._Q @ (rotated / denominator) @ self._R.T

