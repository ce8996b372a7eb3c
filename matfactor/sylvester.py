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
from typing import Any

from . import _validation as check
from ._contract import Parameter, contract, declare

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
        xp, device = check.namespace(M=M, N=N)
        dtype = check.common_dtype(xp, M=M, N=N)
        M = check.matrix(xp, M, "M", dtype)
        N = check.matrix(xp, N, "N", dtype)
        check.symmetric(xp, M, "M", "positive semi-definite")
        check.symmetric(xp, N, "N", "positive semi-definite")
        # Work on M and N scaled to unit magnitude by even powers of two (exact, and exactly
        # undone in solve): eigenvalue products cannot overflow or underflow.
        M, self._m_exponent = check.normalised(xp, M, "M", even=True)
        N, self._n_exponent = check.normalised(xp, N, "N", even=True)
        self._xp, self.device, self.dtype = xp, device, dtype
        d, self._Q = xp.linalg.eigh(M)
        e, self._R = xp.linalg.eigh(N)
        self.shape = (M.shape[0], N.shape[0])
        eps = float(xp.finfo(dtype).eps)
        for name, eigenvalues in (("M", d), ("N", e)):
            # A positive semi-definite matrix has eigenvalues >= 0 up to the rounding of the
            # eigendecomposition, about size · eps · max |eigenvalue|.
            smallest, largest = float(xp.min(eigenvalues)), float(xp.max(xp.abs(eigenvalues)))
            if smallest < -10 * eigenvalues.shape[0] * eps * largest:
                raise ValueError(f"{name} must be positive semi-definite, but it has the eigenvalue "
                                 f"{smallest:.3g} against a largest magnitude of {largest:.3g}: "
                                 f"the system has no unique solution for every rho")
        # Eigenvalues that rounding makes slightly negative count as zero.
        self._eigenvalues_M = xp.clip(d, 0, None)
        self._eigenvalues_N = xp.clip(e, 0, None)
        # Products of eigenvalues below this are zero to working precision.
        largest = float(xp.max(self._eigenvalues_M)) * float(xp.max(self._eigenvalues_N))
        self._singular = (float(xp.min(self._eigenvalues_M)) * float(xp.min(self._eigenvalues_N))
                          <= eps * max(self.shape) * largest)

    @property
    def eigenvalues_M(self) -> Any:
        """The eigenvalues of ``M`` (clipped at zero), increasing."""
        return check.times_power_of_two(self._xp, self._eigenvalues_M, self._m_exponent)

    @property
    def eigenvalues_N(self) -> Any:
        """The eigenvalues of ``N`` (clipped at zero), increasing."""
        return check.times_power_of_two(self._xp, self._eigenvalues_N, self._n_exponent)

    @declare(Parameter("C", "array"), Parameter("rho", "real", minimum=0.0))
    def solve(self, C: Any, rho: float) -> Any:
        """The ``A`` with ``M A N + ρ A = C`` (appendix A.1).

        Parameters
        ----------
        C
            ``(p, q)`` real floating right-hand side, from the library and device of ``M``.
        rho
            Non-negative shift ``ρ``.

        Raises
        ------
        TypeError
            If ``C`` is not a real floating array of ``M``'s library.
        ValueError
            If ``C`` has the wrong shape or NaN/Inf, ``rho`` is negative or not finite, or
            ``rho = 0`` while ``M`` or ``N`` is singular.
        """
        xp = self._xp
        check.namespace(M=self._Q, C=C)
        C = check.matrix(xp, C, "C", self.dtype, shape=self.shape)
        rho = contract(SylvesterSolver.solve).validate(rho=rho)["rho"]
        if rho == 0 and self._singular:
            raise ValueError("the system M A N = C is singular (M or N is singular) and rho = 0; "
                             "pass rho > 0")
        # With M = 2^m M', N = 2^n N' and C = 2^c C': A = 2^(c-m-n) A' where
        # M' A' N' + 2^-(m+n) ρ A' = C'.
        C, c_exponent = check.normalised(xp, C, "C")
        scale = self._m_exponent + self._n_exponent
        rotated = self._Q.T @ C @ self._R
        denominator = self._eigenvalues_M[:, None] * self._eigenvalues_N[None, :] \
            + math.ldexp(rho, -scale)
        A = self._Q @ (rotated / denominator) @ self._R.T
        return check.times_power_of_two(xp, A, c_exponent - scale)
