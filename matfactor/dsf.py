"""Double sparse factorization (DSF): ``W ≈ A @ B`` with both factors sparse.

Boža & Macko, "Two sparse matrices are better than one" (DSF paper), section 4 and appendices
A.1–A.3. For a ``(d_in, d_out)`` weight, ``A`` is ``(d_in, k)`` and ``B`` is ``(k, d_out)`` with
``k = min(d_in, d_out)``, and ``nnz(A) + nnz(B)`` never exceeds ``density · d_in · d_out``: the
same number of stored values as ordinary pruning at that density, and the same number of
multiplications in ``(X @ A) @ B``.

The projection problem ``min ‖A B − W‖_F`` (Algorithm 1) is solved by alternating minimisation:
the square factor (``k × k``, next to the smaller dimension) starts as the identity and the other
as the magnitude-pruned ``W``; each outer iteration solves, for each factor in turn, the L0-
constrained regression ``min ‖F X − T‖`` with the other factor ``F`` fixed, by a few ADMM
iterations (eq. (1)) warm-started from the previous primal and dual variables. Its first step
uses a smaller penalty ``ρ₀ = min(1, t/(n − 3))³`` (annealing, section 4.2), which lets the
early iterations move far from the previous solution.

The layer-wise problem ``min tr((AB − W)ᵀ H (AB − W))`` (section 4.3) projects the input-norm-
scaled weight ``diag(√H_ii) W`` instead, scales ``A`` back, and then *finalizes*: with both
masks fixed, ``B`` is solved on the true objective (a convex least-squares problem per output;
the paper runs ADMM on it, here conjugate gradients, which converge in fewer products), and
optionally ``A`` first, by ADMM through the Sylvester equation of appendix A.1
(:mod:`matfactor.sylvester`).

Cost: each factor update forms the fixed factor's Gram matrix and the linear term (two
products), one Cholesky solve for the ``ρ₀`` step, one inverse of ``(G + ρI)`` (about one
product) and ``inner_iters − 1`` products; masks are chosen by partial selection, never a sort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_compat

from . import _memory
from . import _validation as check
from ._array import add_to_diagonal, contiguous, spd_inverse, spd_solve, top_k_mask
from ._contract import Parameter, contract, declare
from ._hessian import unit_diagonal
from .admm import _admm_iterations
from .error import layer_error
from .sparsity import _keep_count
from .sylvester import SylvesterSolver

__all__ = ["DoubleSparse", "double_sparse", "dsf_budget_split"]

#: Shares of the total budget the square factor gets by default (see :func:`dsf_budget_split`):
#: when it is the factor that the layer-wise finalization re-fits (next to the output of a tall
#: layer), on a square layer, and otherwise (wide layers, tall ones in the projection problem).
_AUTO_SHARE_REFIT, _AUTO_SHARE_SQUARE, _AUTO_SHARE_OTHER = 1 / 3, 0.25, 0.2


@dataclass(frozen=True)
class DoubleSparse:
    """``W ≈ A @ B`` with sparse ``A (d_in, k)`` and ``B (k, d_out)``.

    Attributes
    ----------
    A, B
        The factors, in the compute dtype on the input's device; exactly zero off their masks.
    """

    A: Any
    B: Any

    def __post_init__(self) -> None:
        xp, _ = check.namespace(A=self.A, B=self.B)
        dtype = check.common_dtype(xp, A=self.A, B=self.B)
        A = check.matrix(xp, self.A, "A", dtype)
        check.matrix(xp, self.B, "B", dtype, shape=(A.shape[1], None))

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_in, d_out)`` of the approximated weight."""
        return (self.A.shape[0], self.B.shape[1])

    def dense(self) -> Any:
        """The approximation ``A @ B`` as a dense ``(d_in, d_out)`` matrix."""
        return self.A @ self.B

    def matmul(self, X: Any) -> Any:
        """``X @ (A @ B)`` computed as ``(X @ A) @ B``, without forming the product.

        ``X`` has shape ``(..., d_in)``; it is computed in the factors' dtype.
        """
        _, X = check.layer_input(X, self.A, self.A.shape[0])
        return (X @ self.A) @ self.B

    @property
    def n_params(self) -> int:
        """Stored values: ``nnz(A) + nnz(B)``."""
        xp = array_api_compat.array_namespace(self.A, self.B)
        return int(xp.count_nonzero(self.A)) + int(xp.count_nonzero(self.B))

    def rel_error(self, W: Any, H: Any | None = None) -> float:
        """Relative layer error ``tr(DᵀHD) / tr(WᵀHW)`` of ``A @ B`` (Frobenius if ``H=None``)."""
        return layer_error(W, self.dense(), H)


# 'auto', 'paper' or a share of the budget in (0, 1).
_SPLIT = Parameter("split", "real", minimum=0.0, maximum=1.0, low_open=True, high_open=True,
                   choices=("auto", "paper"))


@declare(Parameter("shape", "shape"), Parameter("density", "density"), _SPLIT,
         Parameter("layerwise", "flag"))
def dsf_budget_split(shape: tuple[int, int], density: float, split: str | float = "auto",
                     layerwise: bool = False) -> tuple[int, int]:
    """Nonzeros for the square factor and for the other one.

    The total is ``floor(density · d_in · d_out)``; the square factor is ``k × k`` with
    ``k = min(d_in, d_out)``.

    Parameters
    ----------
    shape
        ``(d_in, d_out)`` of the weight.
    density
        Total kept fraction in (0, 1].
    split
        ``"auto"``: a fixed share of the total budget, whatever the density: a third (the DSF
        paper's "1/3 and 2/3", section 4.2 and Fig. 6) when the square factor is the one the
        layer-wise finalization re-fits, i.e. ``B`` next to the output of a tall layer
        (``layerwise`` and ``d_in > d_out``); a quarter on a square layer (``d_in == d_out``,
        both problems); a fifth otherwise (wide layers, and tall ones in the projection
        problem). Chosen from measurements on real all-MiniLM-L6-v2 layers at densities 0.5, 0.3
        and 0.25 (``docs/guide/dsf.md``): on square layers a fifth starves the square factor
        (of 20 square layers and densities measured, all but one did better with a quarter).
        ``"paper"``: the reference code's fixed rule, 16% of the square factor's own size for a
        square weight and 25% for a rectangular one, whatever the density; at low density it
        starves the other factor. A float in (0, 1): that share of the total budget.
    layerwise
        Whether the split is for the layer-wise problem (``H`` given), which ``"auto"`` uses.

    Returns
    -------
    (nnz_square, nnz_other)
        Never more than each factor's size; what one cannot hold goes to the other.
    """
    (d_in, d_out), density, layerwise = contract(dsf_budget_split).validate(
        shape=shape, density=density, layerwise=layerwise).values()
    return _budget_split((d_in, d_out), density, split, layerwise)


def _budget_split(shape: tuple[int, int], density: float, split: Any, layerwise: bool,
                  ) -> tuple[int, int]:
    d_in, d_out = shape
    k, m = min(d_in, d_out), max(d_in, d_out)
    total = _keep_count(density, d_in * d_out)
    split = contract(dsf_budget_split).validate(split=split)["split"]
    if split == "auto":
        share = (_AUTO_SHARE_REFIT if layerwise and d_in > d_out else
                 _AUTO_SHARE_SQUARE if d_in == d_out else _AUTO_SHARE_OTHER)
        square = math.floor(share * total)
    elif split == "paper":
        square = math.floor((0.16 if d_in == d_out else 0.25) * k * k)
    else:
        square = math.floor(split * total)
    square = min(square, k * k, total)
    other = min(total - square, k * m)
    square = min(total - other, k * k)
    if square < 1 or other < 1:
        raise ValueError(f"density={density} with split={split!r} leaves a factor of a {shape} "
                         f"weight without nonzeros ({square} and {other}); increase density")
    return square, other


@declare(Parameter("W", "array"), Parameter("density", "density"), Parameter("H", "array"), _SPLIT,
         Parameter("outer_iters", "integer", minimum=1), Parameter("inner_iters", "integer", minimum=1),
         Parameter("mask_iters", "integer", minimum=0, maximum="inner_iters",
                   what="(at most inner_iters = {inner_iters})"),
         Parameter("damping", "damping", low_open=True), Parameter("finalize", "flag"),
         Parameter("finalize_input_factor", "flag"), Parameter("finalize_iters", "integer", minimum=1),
         Parameter("square_mask", "array", optional=True))
def double_sparse(W: Any, density: float, H: Any | None = None, *, split: str | float = "auto",
                  outer_iters: int = 40, inner_iters: int = 5, mask_iters: int = 2,
                  damping: float = 0.01, finalize: bool = True, finalize_input_factor: bool = False,
                  finalize_iters: int = 40, square_mask: Any | None = None) -> DoubleSparse:
    """Double sparse factorization ``W ≈ A @ B`` (DSF paper, Algorithm 1 and section 4.3).

    Parameters
    ----------
    W
        ``(d_in, d_out)`` weight of ``Y = X @ W``.
    density
        Total kept fraction in (0, 1]: ``nnz(A) + nnz(B) <= floor(density · d_in · d_out)``.
    H
        ``(d_in, d_in)`` calibration Gram matrix ``XᵀX`` for the layer-wise problem; ``None`` for
        the projection problem ``min ‖AB − W‖_F``.
    split
        How the budget is divided between the factors (:func:`dsf_budget_split`).
    outer_iters, inner_iters
        Alternating iterations, and ADMM iterations per factor update. The paper's default is
        40 × 5 (appendix A.3: many outer and few inner iterations work best); 20 × 5 or
        10 × 5 trade quality for time (appendix A.6).
    mask_iters
        Inner iterations that (re)select the factor's mask, from ``|X + U|``; the rest keep it.
    damping
        Ridge regularisation of each regression, relative to the mean of the normalised Gram
        diagonal (the reference code's 1e-2). Must be positive.
    finalize
        For the layer-wise problem: re-fit ``B`` on its mask against the true objective, by
        conjugate gradients from the alternation's ``B`` (the paper's finalization, section
        4.3, solved with a faster method than its ADMM).
    finalize_input_factor
        Also re-fit ``A`` on its mask first, through the Sylvester equation ``H A (BBᵀ) + ρA =
        C`` (appendix A.1). The paper finds it helps vision models, not language models.
    finalize_iters
        Iterations of each finalization, one product each: conjugate-gradient steps for ``B``
        (40 come within 0.04% of the exact least-squares solution on real layers), ADMM
        iterations for ``A``.
    square_mask
        Optional fixed boolean mask ``(k, k)`` of the square factor (section 5.1: a random mask
        shared by all layers, so that only one mask per layer needs storing). Its count is the
        square factor's budget; the other factor gets the rest.

    Returns
    -------
    DoubleSparse
        Factors in the compute dtype on the input's device.
    """
    # The factorization is exactly homogeneous under powers of two (H by even ones): it
    # computes at unit magnitude, and the scale goes back to the factor that carries W's (the
    # one other than the square factor: A of a tall weight, B otherwise).
    xp, _, W, H, w_exponent = check.layer_problem(W, H, needs_H=False, require_live=True)
    check.namespace(W=W, square_mask=square_mask, optional=("square_mask",))
    d_in, d_out = W.shape
    k = min(d_in, d_out)
    (density, outer_iters, inner_iters, mask_iters, finalize_iters, damping, finalize,
     finalize_input_factor) = contract(double_sparse).validate(
        density=density, outer_iters=outer_iters, inner_iters=inner_iters, mask_iters=mask_iters,
        finalize_iters=finalize_iters, damping=damping, finalize=finalize,
        finalize_input_factor=finalize_input_factor).values()

    if square_mask is not None:
        square_mask = check.boolean_mask(xp, square_mask, "square_mask", (k, k))
        nnz_square = int(xp.count_nonzero(square_mask))
        total = _keep_count(density, d_in * d_out)
        nnz_other = min(total - nnz_square, d_in * d_out)
        if nnz_square < 1 or nnz_other < 1:
            raise ValueError(f"square_mask keeps {nnz_square} entries of a budget of {total}: "
                             "both factors need nonzeros")
    else:
        nnz_square, nnz_other = _budget_split((d_in, d_out), density, split,
                                              layerwise=H is not None)

    A, B = _double_sparse(xp, W, H, nnz_square, nnz_other, outer_iters, inner_iters, mask_iters,
                          damping, finalize, finalize_input_factor, finalize_iters, square_mask)
    if d_in > d_out:
        return DoubleSparse(check.times_power_of_two(xp, A, w_exponent), B)
    return DoubleSparse(A, check.times_power_of_two(xp, B, w_exponent))


def _double_sparse(xp: Any, W: Any, H: Any | None, nnz_square: int, nnz_other: int,
                   outer_iters: int, inner_iters: int, mask_iters: int, damping: float,
                   finalize: bool, finalize_input_factor: bool, finalize_iters: int,
                   square_mask: Any | None) -> tuple[Any, Any]:
    """:func:`double_sparse` on validated, scaled arrays: ``(A, B)``."""
    d_in, d_out = W.shape
    # Layer-wise: project the input-norm-scaled weight (section 4.3; Wanda's scaling).
    if H is None:
        scale, target = None, W
    else:
        scale, dead = unit_diagonal(xp, H)
        target = xp.where(dead[:, None], xp.zeros_like(W), W * scale[:, None])

    k = min(d_in, d_out)
    if not bool(xp.any(target != 0)):
        # W vanishes (on the live inputs): A = B = 0 is exact, and the regressions below would
        # have no live column to fit.
        return (xp.zeros((d_in, k), dtype=W.dtype, device=array_api_compat.device(W)),
                xp.zeros((k, d_out), dtype=W.dtype, device=array_api_compat.device(W)))

    # Work with T (k × m) ≈ S (k × k) @ other (k × m), k <= m: transpose a tall weight.
    transposed = d_in > d_out
    T = target.T if transposed else target
    try:
        S, other = _project(xp, T, nnz_square, nnz_other, outer_iters, inner_iters, mask_iters,
                            damping, None if square_mask is None else
                            (square_mask.T if transposed else square_mask))
    except ValueError as exc:  # a Cholesky factorization of a factor's Gram matrix failed
        raise ValueError(f"a factor's regression is singular at damping={damping:g} (the ridge "
                         f"that keeps it definite); increase damping ({exc})") from exc
    A, B = (other.T, S.T) if transposed else (S, other)

    if H is not None:
        A = xp.where(dead[:, None], xp.zeros_like(A), A / scale[:, None])
        if finalize:
            if finalize_input_factor:
                A = _finalize_input_factor(xp, W, H, A, B, finalize_iters)
            B = _finalize_output_factor(xp, W, H, A, B, finalize_iters)
    return A, B


def _project(xp: Any, T: Any, nnz_square: int, nnz_other: int, outer_iters: int,
             inner_iters: int, mask_iters: int, damping: float, square_mask: Any | None,
             ) -> tuple[Any, Any]:
    """Algorithm 1 on ``T ≈ S @ other`` with square ``S``; returns ``(S, other)``."""
    k = T.shape[0]
    device = array_api_compat.device(T)
    S = xp.eye(k, dtype=T.dtype, device=device)
    # The reference initialises the other factor with half its budget of the largest entries.
    other = xp.where(top_k_mask(xp, xp.abs(T), max(1, nnz_other // 2)), T, xp.zeros_like(T))
    U_S, U_other = xp.zeros_like(S), xp.zeros_like(other)
    for t in range(outer_iters):
        rho0 = min(1.0, t / max(1, outer_iters - 3)) ** 3
        # S-update: min ‖otherᵀ Sᵀ − Tᵀ‖, a regression for Sᵀ with the fixed factor otherᵀ.
        S_t, U_S_t = _sparse_regression(
            xp, other @ other.T, other @ T.T, S.T, U_S.T, nnz_square, rho0, inner_iters,
            mask_iters, damping, None if square_mask is None else square_mask.T)
        S, U_S = S_t.T, U_S_t.T
        # other-update: min ‖S other − T‖ with the fixed factor S.
        other, U_other = _sparse_regression(xp, S.T @ S, S.T @ T, other, U_other, nnz_other, rho0,
                                            inner_iters, mask_iters, damping, None)
    return S, other


def _sparse_regression(xp: Any, G: Any, FtT: Any, Z: Any, U: Any, nnz: int, rho0: float,
                       inner_iters: int, mask_iters: int, damping: float, fixed_mask: Any | None,
                       ) -> tuple[Any, Any]:
    """ADMM for ``min ‖F X − T‖²`` s.t. ``nnz(X) <= nnz``, warm-started from ``(Z, U)``.

    ``G = FᵀF`` and ``FtT = FᵀT``. The columns of ``F`` are normalised (``diag(G) = 1``, the
    preconditioning of section 3.1), a ridge ``damping · mean(diag G)`` is added, and the first
    Ŵ-update uses the annealed penalty ``ρ₀`` with one Cholesky solve; the remaining
    ``inner_iters − 1`` use ``ρ = 1`` through one inverse. Rows of ``X`` whose column of ``F`` is
    zero cannot affect the fit: they are set to zero and go first when the mask is chosen.
    """
    # The S-update passes transposed views: one copy into row-major order here keeps every
    # elementwise pass of the ADMM loop on uniformly ordered memory (see _array.contiguous).
    G, FtT, Z, U = (contiguous(xp, A) for A in (G, FtT, Z, U))
    scale, dead = unit_diagonal(xp, G)
    G_n = G / scale[:, None] / scale[None, :]
    live_fraction = 1.0 - float(xp.mean(xp.astype(dead, G.dtype)))
    G_n = add_to_diagonal(xp, G_n, damping * live_fraction)
    zeros = xp.zeros_like(Z)
    target = xp.where(dead[:, None], zeros, FtT / scale[:, None])
    Z_n = xp.where(dead[:, None], zeros, Z * scale[:, None])
    U_n = xp.where(dead[:, None], zeros, U * scale[:, None])
    rho = 1.0
    first = spd_solve(xp, add_to_diagonal(xp, G_n, rho0), target + rho0 * (Z_n - U_n), name="G")
    G_rho_inv = spd_inverse(xp, add_to_diagonal(xp, G_n, rho), name="G")

    def mask_at(t: int, V: Any) -> Any:
        if fixed_mask is not None:
            return fixed_mask if t == 0 else None
        if t < max(1, mask_iters):
            return top_k_mask(xp, xp.abs(V), nnz)
        return None

    _, Z_n, U_n, _ = _admm_iterations(xp, G_rho_inv, target, rho, first, U_n, inner_iters - 1,
                                     mask_at)
    return Z_n / scale[:, None], U_n / scale[:, None]


def _finalize_output_factor(xp: Any, W: Any, H: Any, A: Any, B: Any, iters: int) -> Any:
    """``B`` on its mask minimising ``tr((AB − W)ᵀ H (AB − W))``: conjugate gradients, ``G = AᵀHA``.

    With the mask fixed the problem is one convex least-squares problem per output column ``j``,
    ``G_SS b = (AᵀHW)_S`` on its support ``S`` (section 4.3). All columns run conjugate gradients
    at once, from the alternation's ``B``, in the coordinates where ``diag(G) = 1`` (Jacobi
    preconditioning): the operator is ``P ↦ M ⊙ (G P)``, one product per iteration, as an ADMM
    iteration, and the step sizes are per column. Each iteration minimises the objective over a
    larger Krylov space, so the error never rises; it converges much faster than ADMM at ``ρ = 1``
    (on real all-MiniLM-L6-v2 layers 40 iterations come within 0.04% of the exact solution's
    layer error, where 20 ADMM iterations stopped 0.3% to 2.6% above it). The convergence holds
    in exact arithmetic; in floating point the recurrences drift, harmlessly for these counts.
    """
    HA = H @ A
    G = A.T @ HA
    scale, _ = unit_diagonal(xp, G)
    G_n = G / scale[:, None] / scale[None, :]
    on = xp.astype(B != 0, G.dtype)
    X = B * scale[:, None]
    R = on * ((HA.T @ W) / scale[:, None] - G_n @ X)  # the negative gradient on the support
    P = R
    rr = xp.sum(R * R, axis=0)
    zero = xp.zeros_like(rr)
    for _ in range(iters):
        Q = on * (G_n @ P)
        pq = xp.sum(P * Q, axis=0)
        # A column whose residual vanished (or whose support is empty) stops: step 0.
        alpha = xp.where(pq > 0, rr / xp.where(pq > 0, pq, xp.ones_like(pq)), zero)
        X = X + alpha * P
        R = R - alpha * Q
        rr_next = xp.sum(R * R, axis=0)
        beta = xp.where(rr > 0, rr_next / xp.where(rr > 0, rr, xp.ones_like(rr)), zero)
        P = R + beta * P
        rr = rr_next
    return X / scale[:, None]


def _finalize_input_factor(xp: Any, W: Any, H: Any, A: Any, B: Any, iters: int) -> Any:
    """``A`` on its mask minimising ``tr((AB − W)ᵀ H (AB − W))`` (appendix A.1).

    ADMM whose Ŵ-update is the Sylvester equation ``H A (BBᵀ) + ρA = H W Bᵀ + ρ(Z − U)``,
    solved by :class:`matfactor.sylvester.SylvesterSolver` from one eigendecomposition of ``H``
    and one of ``BBᵀ``. Inputs are normalised (``diag(H) = 1``) and ``ρ`` is taken relative to
    the scale of ``BBᵀ``, so that one value fits every layer.
    """
    scale, dead = unit_diagonal(xp, H)
    H_n = H / scale[:, None] / scale[None, :]
    N = B @ B.T
    solver = SylvesterSolver(H_n, N)
    rho = float(xp.mean(xp.linalg.diagonal(N)))
    if rho <= 0:
        return A
    linear = (H_n @ (W * scale[:, None])) @ B.T
    mask = A != 0
    Z = A * scale[:, None]
    U = xp.zeros_like(Z)
    for _ in range(iters):
        X = solver.solve(linear + rho * (Z - U), rho)
        V = X + U
        Z = xp.where(mask, V, 0.0)
        U = V - Z
    return xp.where(dead[:, None], xp.zeros_like(Z), Z / scale[:, None])


# --------------------------------------------------------------------------- memory model


@_memory.counts(double_sparse)
def _double_sparse_memory(problem: _memory.Problem) -> _memory.SolveMemory:
    """Double sparse factorization: the alternation, then the finalizations it is asked for."""
    d_in, d_out, s, options = problem.d_in, problem.d_out, problem.itemsize, problem.options
    mn, M, Hh = problem.mn, problem.M, problem.Hh
    B = mn
    k = min(d_in, d_out)
    K, kk = k * k * s, k * k
    # the front door's H and W scaled, and the input-norm-scaled target (kept by _double_sparse)
    base = Hh + 2 * M
    # the other factor's initial mask: |T|, kthvalue's copy and indices; then zeros, the where
    start = base + max(M + _memory.top_k_bytes(mn, s), 3 * M + B)
    # S-update (_sparse_regression with G = other otherᵀ, k x k): the factors other and U_other
    # (2 M), S and U_S; G, otherTᵀ, the contiguous copies of Sᵀ and U_Sᵀ, G_n, zeros, target,
    # Z_n, U_n, the first step and (G_n + I)⁻¹ (11 K); the loop at a mask step: Ŵ, U, V, on, off,
    # signed ρ, |V| and kthvalue's copy (8 K), its indices and the mask
    s_update = base + 2 * M + 21 * K + 8 * kk + kk
    # other-update (F = S, unknown k x max): other, U_other, S^T T, zeros, target, Z_n, U_n,
    # the first step (8 M), the loop's 8 arrays as above (8 M), the Gram matrices (5 K), the
    # indices and the mask; a tall weight's transposed other and U_other are copied to
    # row-major order (contiguous) at every update (2 M)
    other_update = base + 16 * M + 5 * K + 8 * mn + B + (2 * M if d_in > d_out else 0)
    peak = max(3 * Hh, start, s_update, other_update)
    A, Bf = d_in * k * s, k * d_out * s
    if options.get("finalize", True):
        # _finalize_output_factor (conjugate gradients): A, B, H A; AᵀHA, G_n and a temporary
        # (3 K); the boolean mask, its 0/1 copy, the target and its scaled copy, and in the loop
        # X, R, P, Q with G_n P and the updates' temporaries (12 arrays of B's size in all)
        peak = max(peak, base + 2 * A + 12 * Bf + 3 * K + k * d_out)
        if options.get("finalize_input_factor", False):
            # _finalize_input_factor beside A and B: H_n; SylvesterSolver: symmetric's 3 Hh, H_n
            # scaled and eigh of it; then H_n, Q, R and BBᵀ kept, and the loop: linear (after
            # W·scale and H_n(W·scale)), Z, U, X, V and a solve's C, C scaled, QᵀC, QᵀCR, the
            # denominator, the quotient and the products back (about 11 A)
            peak = max(peak, base + A + Bf + Hh + max(3 * Hh, Hh + _memory.eigh_bytes(d_in, s),
                                                      Hh + 2 * K + 2 * M + A,
                                                      Hh + 2 * K + 11 * A + d_in * k))
    return _memory.SolveMemory(peak, (d_in + d_out) * k * s)
