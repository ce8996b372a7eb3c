"""Low-rank approximation: truncated, randomized and exact Hessian-weighted.

A rank-``r`` approximation of a ``(d_in, d_out)`` weight is stored as :class:`LowRank`,
``Ŵ = U Vᵀ`` with ``U`` ``(d_in, r)`` and ``V`` ``(d_out, r)``: ``r (d_in + d_out)`` numbers
instead of ``d_in d_out``, and ``X @ Ŵ = (X @ U) @ Vᵀ`` costs two thin products.

Three solvers, one for each variant of subproblem (P2) of the HASSLE-free paper (section 4.2),
``min tr((W − M)ᵀ H (W − M))`` over ``rank(M) <= r``:

- :func:`truncated_svd`: ``H = I`` (section 4.2.1, data-free): ``M = C_r(W)``, the best rank-r
  approximation in Frobenius norm (Eckart–Young), by a full SVD;
- :func:`randomized_svd`: the same approximation by the randomized range finder of Halko,
  Martinsson and Tropp (2011) with power iterations: a few GEMMs with ``W`` instead of an SVD;
- :func:`weighted_lowrank`: the full Hessian (section 4.2.3). Where the paper reparametrises
  ``M = U Vᵀ`` and runs gradient descent (:mod:`matfactor.lowrank_descent`), this problem has a
  closed-form global minimiser by whitening: with ``H = Sᵀ S``, the objective is
  ``‖S W − S M‖²_F`` and the minimiser follows from the truncated SVD of ``S W``. It extends
  Theorem 4.1 (diagonal ``H``) to any positive semi-definite ``H``, singular ones included.

Sign convention (every solver, every backend): singular vectors are defined up to sign, so each
column of ``V`` is flipped to make its largest entry in absolute value positive (of two entries
of equal magnitude and opposite sign, the positive one wins), and the same column of ``U`` with
it. ``U Vᵀ`` does not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import _memory
from . import _validation as check
from ._array import random_normal
from ._contract import Parameter, contract, declare
from ._hessian import diagonal_scaling
from .error import layer_error

__all__ = [
    "LowRank",
    "lowrank_rank_for_density",
    "randomized_svd",
    "truncated_svd",
    "weighted_lowrank",
]


@declare(Parameter("U", "array"), Parameter("V", "array"), Parameter("history", "object", optional=True))
@dataclass(frozen=True, eq=False)
class LowRank:
    """A rank-``r`` approximation ``Ŵ = U Vᵀ`` of a ``(d_in, d_out)`` weight.

    Attributes
    ----------
    U
        ``(d_in, r)`` left factor. For the SVD-based solvers it carries the singular values
        (``U = U_svd · diag(σ)``) and ``V`` has orthonormal columns.
    V
        ``(d_out, r)`` right factor.
    history
        For iterative solvers (:func:`matfactor.lowrank_descent.lowrank_gd`), the objective at each
        evaluated iterate as a tuple of floats; ``None`` otherwise.
    """

    U: Any
    V: Any
    history: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        xp, _ = check.namespace(U=self.U, V=self.V)
        dtype = check.common_dtype(xp, U=self.U, V=self.V)
        check.matrix(xp, self.U, "U", dtype)
        check.matrix(xp, self.V, "V", dtype)
        if self.U.shape[1] != self.V.shape[1]:
            raise ValueError(f"LowRank needs U (d_in, r) and V (d_out, r) with the same r, got "
                             f"shapes {tuple(self.U.shape)} and {tuple(self.V.shape)}")
        if self.history is not None:
            if not isinstance(self.history, tuple) \
                    or not all(isinstance(v, float) for v in self.history):
                raise TypeError(f"history must be None or a tuple of floats, got "
                                f"{check.type_name(self.history)}")

    @property
    def rank(self) -> int:
        """The number of columns ``r`` of the factors."""
        return int(self.U.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_in, d_out)`` of the approximated weight."""
        return int(self.U.shape[0]), int(self.V.shape[0])

    @property
    def n_params(self) -> int:
        """Stored numbers: ``r (d_in + d_out)``."""
        d_in, d_out = self.shape
        return self.rank * (d_in + d_out)

    def dense(self) -> Any:
        """``Ŵ = U Vᵀ`` as a ``(d_in, d_out)`` array."""
        return self.U @ self.V.T

    def matmul(self, X: Any) -> Any:
        """``X @ Ŵ`` computed as ``(X @ U) @ Vᵀ``, never forming ``Ŵ``.

        ``X`` has shape ``(..., d_in)``; it is computed in the factors' dtype.
        """
        _, X = check.layer_input(X, self.U, self.U.shape[0])
        return (X @ self.U) @ self.V.T

    def rel_error(self, W: Any, H: Any | None = None) -> float:
        """Relative layer error ``tr(Dᵀ H D) / tr(Wᵀ H W)`` of ``Ŵ`` against ``W``
        (:func:`matfactor.error.layer_error`); Frobenius for ``H = None``."""
        return layer_error(W, self.dense(), H)


# --------------------------------------------------------------------------- shared helpers


def _fix_signs(xp: Any, U: Any, V: Any) -> tuple[Any, Any]:
    """Flip column pairs so that the largest-magnitude entry of each column of ``V`` is positive.

    Decided from the column's max and min, so it needs no index arithmetic and is the same rule
    on every backend; an exact tie ``max = −min`` counts as positive.
    """
    largest = xp.max(V, axis=0)
    smallest = xp.min(V, axis=0)
    ones = xp.ones_like(largest)
    sign = xp.where(largest >= -smallest, ones, -ones)
    return U * sign, V * sign



# --------------------------------------------------------------------------- solvers


@declare(Parameter("W", "array"), Parameter("rank", "rank"))
def truncated_svd(W: Any, rank: int) -> LowRank:
    """Best rank-``r`` approximation ``C_r(W)`` in Frobenius norm, by a full SVD.

    The Eckart–Young minimiser of ``‖W − M‖_F`` over ``rank(M) <= r`` (HASSLE-free paper,
    section 3 notation, and section 4.2.1: the data-free solution of (P2)); its squared error
    is the sum of the discarded ``σ_i²``.

    Parameters
    ----------
    W
        ``(d_in, d_out)`` weight.
    rank
        ``r`` in ``[1, min(d_in, d_out)]``.

    Returns
    -------
    LowRank
        ``U = U_r · diag(σ_1..σ_r)`` (singular values folded into ``U``), ``V = V_r`` with
        orthonormal columns, signs fixed by the module's rule; in the compute dtype on the
        input's device.

    Notes
    -----
    Costs a full SVD of ``W`` (``O(d_in d_out min(d_in, d_out))``) whatever the rank;
    :func:`randomized_svd` is much cheaper for ``r << min(d_in, d_out)``.
    """
    xp, _, W, _, w_exponent = check.layer_problem(W, None, needs_H=False, require_live=True)
    rank = contract(truncated_svd).validate({"shape": tuple(W.shape)}, rank=rank)["rank"]
    U, V = _truncated_svd(xp, W, rank)
    return LowRank(check.times_power_of_two(xp, U, w_exponent), V)


def _truncated_svd(xp: Any, W: Any, rank: int) -> tuple[Any, Any]:
    U, s, Vh = xp.linalg.svd(W, full_matrices=False)
    return _fix_signs(xp, U[:, :rank] * s[None, :rank], Vh[:rank, :].T)


def _default_power_iters(rank: int, shape: tuple[int, int]) -> int:
    """Power iterations used by :func:`randomized_svd` when ``power_iters=None``.

    Scikit-learn's rule (``randomized_svd(n_iter="auto")``): 7 when ``rank < 0.1 min(d_in,
    d_out)``, else 4. A small sketch of a matrix with a slowly decaying spectrum captures the
    leading subspace poorly, and each power iteration sharpens the spectrum (``σ_i`` becomes
    ``σ_i^(2q+1)``), so the smaller the rank relative to the matrix, the more iterations pay.
    """
    return 7 if rank < 0.1 * min(shape) else 4


@declare(Parameter("W", "array"), Parameter("rank", "rank"),
         Parameter("oversampling", "integer", minimum=0),
         Parameter("power_iters", "integer", minimum=0, optional=True), Parameter("rng", "rng"))
def randomized_svd(W: Any, rank: int, *, oversampling: int = 10, power_iters: int | None = None,
                   rng: Any = None) -> LowRank:
    """Approximate truncated SVD by the randomized range finder (Halko, Martinsson, Tropp 2011).

    Algorithm 4.4 of Halko et al. (randomized subspace iteration) with ``l = r + oversampling``
    Gaussian test vectors, then the SVD of the small projected matrix (their algorithm 5.1).
    The HASSLE-free paper (section 4.2.1) points to it as the fast substitute for the full SVD
    of the data-free (P2) step.

    The computation runs on the tall orientation of ``W`` (``A = W`` if ``d_in >= d_out``,
    else ``Wᵀ``):

    1. ``Ω`` ``(n, l)`` standard normal, drawn on the device; ``Q = qr(A Ω)``;
    2. ``power_iters`` times: ``Q = qr(A qr(Aᵀ Q))`` (re-orthonormalised after every product,
       so the columns do not all collapse onto the leading singular vector in floating point);
    3. ``B = Qᵀ A`` ``(l, n)``, ``B = Ũ Σ Ṽᵀ``, ``A ≈ (Q Ũ) Σ Ṽᵀ`` truncated to ``r``.

    Parameters
    ----------
    W
        ``(d_in, d_out)`` weight.
    rank
        ``r`` in ``[1, min(d_in, d_out)]``.
    oversampling
        Extra sketch columns (Halko et al. recommend 5 to 10). If ``rank + oversampling``
        reaches ``min(d_in, d_out)``, the full SVD (:func:`truncated_svd`) is returned: exact,
        and no dearer than a sketch that wide.
    power_iters
        Subspace iterations ``q``; ``None`` picks scikit-learn's rule: 7 when
        ``rank < 0.1·min(d_in, d_out)``, else 4.
    rng
        ``None``, an int seed or the backend's generator (:func:`matfactor._array.random_normal`):
        the same seed gives the same result on the same backend.

    Returns
    -------
    LowRank
        As :func:`truncated_svd`: ``U`` carries the singular values, ``V`` orthonormal, same
        sign rule. Exact (to rounding) when ``rank(W) <= rank``.
    """
    xp, device, W, _, w_exponent = check.layer_problem(W, None, needs_H=False, require_live=True)
    rank, oversampling, power_iters, rng = contract(randomized_svd).validate(
        {"shape": tuple(W.shape)}, rank=rank, oversampling=oversampling, power_iters=power_iters,
        rng=rng).values()
    if power_iters is None:
        power_iters = _default_power_iters(rank, tuple(W.shape))
    U, V = _randomized_svd(xp, device, W, rank, oversampling, power_iters, rng)
    return LowRank(check.times_power_of_two(xp, U, w_exponent), V)


def _randomized_svd(xp: Any, device: Any, W: Any, rank: int, oversampling: int, power_iters: int,
                    rng: Any) -> tuple[Any, Any]:
    """:func:`randomized_svd` on a validated ``W``: ``(U, V)``."""

    transpose = W.shape[0] < W.shape[1]
    A = W.T if transpose else W
    sketch_width = min(rank + oversampling, min(W.shape))
    omega = random_normal(xp, (A.shape[1], sketch_width), dtype=A.dtype, device=device, rng=rng)
    if sketch_width == min(W.shape):
        # A sketch as wide as the matrix spans all of it: the full SVD is then exact and no
        # dearer, while a square Gaussian sketch may be ill-conditioned (float32 loses digits).
        return _truncated_svd(xp, W, rank)
    Q, _ = xp.linalg.qr(A @ omega)
    for _ in range(power_iters):
        Z, _ = xp.linalg.qr(A.T @ Q)
        Q, _ = xp.linalg.qr(A @ Z)
    U_small, s, Vh = xp.linalg.svd(Q.T @ A, full_matrices=False)
    left, sigma, right = Q @ U_small[:, :rank], s[None, :rank], Vh[:rank, :].T  # A ≈ left Σ rightᵀ
    if transpose:  # W = Aᵀ ≈ right Σ leftᵀ
        left, right = right, left
    return _fix_signs(xp, left * sigma, right)


@declare(Parameter("W", "array"), Parameter("H", "array"), Parameter("rank", "rank"),
         Parameter("damping", "damping"))
def weighted_lowrank(W: Any, H: Any, rank: int, *, damping: float = 0.0) -> LowRank:
    """Exact minimiser of ``tr((W − M)ᵀ H (W − M))`` over ``rank(M) <= r``, by whitening.

    Subproblem (P2) of the HASSLE-free paper, eq. (5), with the full Hessian (section 4.2.3),
    solved in closed form instead of by gradient descent. With the diagonal scaling of eq. (7),
    ``D = √diag(H)``, ``H_n = D⁻¹ H D⁻¹ = Q diag(e) Qᵀ`` and ``S = diag(√e) Qᵀ`` (so that
    ``SᵀS = H_n``), the objective is ``‖S D W − S D M‖²_F``. If ``S D W = A Σ Bᵀ`` (SVD), then
    ``C_r(S D W) = S D W B_r B_rᵀ``, so ``M = W B_r B_rᵀ`` attains the Eckart–Young bound
    ``Σ_{i>r} σ_i²`` and is a global minimiser. No inverse of ``H`` is ever applied (only
    ``√e`` and a projector), so a singular or ill-conditioned ``H`` amplifies no rounding.
    For a diagonal ``H`` this is Theorem 4.1; for ``H = c·I``, :func:`truncated_svd`.

    The minimiser is unique only up to matrices whose columns lie in the null space of ``H``
    (inputs that the calibration data never excites). The one returned is
    ``M = D⁻¹ P D W B_r B_rᵀ`` with ``P`` the orthogonal projector onto the range of ``H_n``:
    its component in that null space, measured in the scaled coordinates ``D M``, is zero (the
    minimum of ``‖D M‖_F``). In particular the rows of dead inputs (``H_ii = 0``) are exactly
    zero, and with a full-rank ``H`` on the live inputs the live rows are ``W B_r B_rᵀ``, a
    projection of ``W``. Eigenvalues of ``H_n`` below ``√d_in · eps · max(e)`` (the rounding
    level of the eigendecomposition) count as zero.

    Parameters
    ----------
    W
        ``(d_in, d_out)`` weight.
    H
        ``(d_in, d_in)`` Gram matrix ``XᵀX``, positive semi-definite; any positive multiple
        gives the same result.
    rank
        ``r`` in ``[1, min(d_in, d_out)]``.
    damping
        Relative damping: minimise with ``H + λ I`` on the live inputs, ``λ = damping ·
        mean(diag H)`` (the paper's ``H = XᵀX + λI``). The default 0 minimises the undamped
        objective exactly, which needs no damping.

    Returns
    -------
    LowRank
        ``V = B_r`` with orthonormal columns (signs by the module's rule), ``U = D⁻¹ P D W
        B_r``; compute dtype, input's device.

    Notes
    -----
    Cost: one eigendecomposition of ``H`` (``d_in³``), the SVD of the ``(d_in, d_out)``
    whitened weight and three GEMMs; the same order as :func:`truncated_svd` plus the ``eigh``.
    """
    xp, _, W, H, w_exponent = check.layer_problem(W, H, needs_H=True, require_live=True)
    rank, damping = contract(weighted_lowrank).validate({"shape": tuple(W.shape)}, rank=rank,
                                                        damping=damping).values()
    U, V = _weighted_lowrank(xp, W, H, rank, damping)
    return LowRank(check.times_power_of_two(xp, U, w_exponent), V)


def _weighted_lowrank(xp: Any, W: Any, H: Any, rank: int, damping: float) -> tuple[Any, Any]:
    """:func:`weighted_lowrank` on validated arrays: ``(U, V)``."""
    H_n, scale, dead = diagonal_scaling(xp, H, damping)
    # Work on D W / √h̄: the scaled problem of eq. (7), independent of the scale of H.
    W_n = xp.where(dead[:, None], xp.zeros_like(W), W * scale[:, None])
    U_n, V = _whitened_lowrank(xp, W_n, _whiten(xp, H_n), rank)
    U = xp.where(dead[:, None], xp.zeros_like(U_n), U_n / scale[:, None])
    return _fix_signs(xp, U, V)


@dataclass(frozen=True)
class _Whitening:
    """``H_n = Q diag(e) Qᵀ`` prepared for :func:`_whitened_lowrank`, computed once per ``H``.

    ``Q = None`` stands for the identity (``H_n`` diagonal with a unit diagonal on the live
    inputs, as the diagonal scaling makes any diagonal ``H``): no eigendecomposition, no GEMM.
    """

    Q: Any | None   # eigenvectors, (d_in, d_in), or None for the identity
    root: Any       # √e where e is in the range of H_n, else 0
    in_range: Any   # boolean: eigenvalue above the rounding level of the eigendecomposition


def _whiten(xp: Any, H_n: Any) -> _Whitening:
    """Eigendecomposition of the scaled Gram matrix, with eigenvalues at rounding level zeroed."""
    eigenvalues, Q = xp.linalg.eigh(H_n)
    threshold = math.sqrt(H_n.shape[0]) * float(xp.finfo(H_n.dtype).eps) * xp.max(eigenvalues)
    in_range = eigenvalues > threshold
    return _Whitening(Q, xp.sqrt(xp.where(in_range, eigenvalues, xp.zeros_like(eigenvalues))),
                     in_range)


def _identity_whitening(xp: Any, live: Any, dtype: Any) -> _Whitening:
    """The :class:`_Whitening` of a diagonal ``H_n`` that is 1 on ``live`` inputs, 0 elsewhere."""
    return _Whitening(None, xp.astype(live, dtype), live)


def _whitened_lowrank(xp: Any, W_n: Any, whitening: _Whitening, rank: int) -> tuple[Any, Any]:
    """The exact rank-``r`` minimiser of ``tr((W_n − M)ᵀ H_n (W_n − M))`` (see weighted_lowrank).

    Returns ``(U, V)`` with ``M = U Vᵀ``, ``V`` orthonormal (signs not fixed). Cost with a full
    ``Q``: two GEMMs with ``Q`` and the SVD of the ``(d_in, d_out)`` whitened matrix.
    """
    QtW = W_n if whitening.Q is None else whitening.Q.T @ W_n
    _, _, Vh = xp.linalg.svd(QtW * whitening.root[:, None], full_matrices=False)
    V = Vh[:rank, :].T
    # U = P W_n V with P = Q diag(in_range) Qᵀ: a projector, never a division by √e.
    projected = xp.where(whitening.in_range[:, None], QtW @ V, xp.zeros_like(QtW[:, :rank]))
    return (projected if whitening.Q is None else whitening.Q @ projected), V


@declare(Parameter("shape", "shape"),
         Parameter("density", "real", minimum=0.0, maximum=1.0, low_open=True))
def lowrank_rank_for_density(shape: tuple[int, int], density: float) -> int:
    """Largest rank ``r`` whose factors fit the budget: ``r (d_in + d_out) <= density d_in d_out``.

    Parameters
    ----------
    shape
        ``(d_in, d_out)``.
    density
        Kept fraction of the dense parameter count, in ``(0, 1]``.

    Returns
    -------
    int
        ``r >= 0``; 0 means not even a rank-1 factorization fits. Never above
        ``min(d_in, d_out)`` (at density 1 the largest fit is below it).
    """
    (d_in, d_out), density = contract(lowrank_rank_for_density).validate(
        shape=shape, density=density).values()
    budget = density * d_in * d_out
    rank = int(budget // (d_in + d_out))
    # Floor division of floats can land one off either way: settle it with exact comparisons.
    while rank > 0 and rank * (d_in + d_out) > budget:
        rank -= 1
    while (rank + 1) * (d_in + d_out) <= budget:
        rank += 1
    return min(rank, d_in, d_out)


# --------------------------------------------------------------------------- memory models


@_memory.counts(truncated_svd)
def _truncated_svd_memory(problem: _memory.Problem) -> _memory.SolveMemory:
    """W scaled and the SVD of it, then U·σ, the sign fix of U and V (no H)."""
    d_in, d_out, s = problem.d_in, problem.d_out, problem.itemsize
    R = (d_in + d_out) * problem.rank * s
    return _memory.SolveMemory(problem.M + _memory.svd_bytes(d_in, d_out, s) + 3 * R, R,
                               _memory.svd_retained(d_in, d_out, s))


@_memory.counts(weighted_lowrank)
def _weighted_lowrank_memory(problem: _memory.Problem) -> _memory.SolveMemory:
    """The front door's 3 Hh, then W and H scaled beside ``_weighted_lowrank``
    (:func:`matfactor._memory.weighted_lowrank_bytes`; ``damping`` adds the damped copy)."""
    d_in, d_out, s = problem.d_in, problem.d_out, problem.itemsize
    work = _memory.weighted_lowrank_bytes(d_in, d_out, problem.rank, s,
                                          bool(problem.options.get("damping", 0.0)))
    return _memory.SolveMemory(max(3 * problem.Hh, work + problem.Hh + problem.M),
                               (d_in + d_out) * problem.rank * s, _memory.svd_retained(d_in, d_out, s))
