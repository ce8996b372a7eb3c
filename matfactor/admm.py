"""ADMM for L0-constrained least squares: pruning with weight update (Boža, 2024).

The layer-wise pruning problem (DSF paper, section 3.1) is

    minimise  tr((Ŵ − W)ᵀ H (Ŵ − W))   subject to  Ŵ in the sparsity pattern,

with ``H = XᵀX``. For a fixed mask it is convex (one least-squares regression per output on its
own set of inputs) and ADMM solves it with the iterations of eq. (1)::

    Ŵ ← (H + ρI)⁻¹ (H W + ρ (Z − U))
    Z ← M ⊙ (Ŵ + U)
    U ← U + Ŵ − Z

where ``U`` is the scaled dual variable and ``Z`` the feasible (exactly sparse) iterate.
Following the paper:

- the problem is preconditioned so that ``diag(H) = 1`` (input ``i`` scaled by ``√H_ii``, the
  weight row multiplied by it), which makes one ``ρ = 1`` fit every layer;
- ``(H + ρI)`` is factored once (Cholesky, then an explicit inverse): every iteration is then a
  single GEMM, and the loop never synchronises with the host;
- :func:`admm_prune` selects the mask during the first ``gradual_iters`` iterations by gradual
  pruning with the cubic schedule, removing the smallest ``|Ŵ + U|``, then keeps it fixed;
  the schedule applies to every pattern (for n:m the ``n`` best of each group are always kept
  and the removal happens among the rest, so the final mask is exactly n:m);
- :func:`admm_solve` runs the same iteration on a given mask until its residuals converge,
  giving the least-squares solution on that support.

Damping ``λ`` is added in the preconditioned coordinates, i.e. the objective becomes
``tr(Dᵀ (H + λ·Diag(H)) D)``: relative to each input's own scale, hence independent of the
scale of ``H``. Dead inputs (``H_ii = 0``) have no effect on the layer's output: their weights
are set to zero and take no share of the budget.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

from . import _memory
from . import _validation as check
from ._array import add_to_diagonal, spd_inverse
from ._contract import Parameter, contract, declare
from ._hessian import unit_diagonal
from .exceptions import ConvergenceWarning
from .pruning import _PRUNER_PARAMETERS, _prepare_pruning_problem
from .sparsity import SparsityPattern, _cubic_schedule, _gradual_mask, mask_satisfies

__all__ = ["AdmmState", "admm_prune", "admm_solve"]


@declare(Parameter("Z", "array"), Parameter("U", "array"), Parameter("mask", "array"),
         Parameter("iterations", "integer", minimum=0, label="AdmmState.iterations"),
         Parameter("converged", "flag", optional=True, label="AdmmState.converged"))
@dataclass(frozen=True)
class AdmmState:
    """The ADMM iterate, for inspection and warm starts.

    Attributes
    ----------
    Z
        The sparse solution, ``(d_in, d_out)``, exactly zero off ``mask``.
    U
        The scaled dual variable, in the same coordinates as ``Z`` (user coordinates).
    mask
        Boolean support of ``Z``.
    iterations
        Number of ``Ŵ`` updates (GEMMs) performed.
    converged
        For :func:`admm_solve`: whether the residuals met ``tol``. ``None`` for
        :func:`admm_prune`, which runs a fixed number of iterations.
    """

    Z: Any
    U: Any
    mask: Any
    iterations: int
    converged: bool | None = None

    def __post_init__(self) -> None:
        xp, _ = check.namespace(Z=self.Z, U=self.U, mask=self.mask)
        dtype = check.common_dtype(xp, Z=self.Z, U=self.U)
        Z = check.matrix(xp, self.Z, "AdmmState.Z", dtype)
        check.matrix(xp, self.U, "AdmmState.U", dtype, shape=tuple(Z.shape))
        check.boolean_mask(xp, self.mask, "AdmmState.mask", tuple(Z.shape))
        valid = contract(AdmmState).validate(iterations=self.iterations, converged=self.converged)
        object.__setattr__(self, "iterations", valid["iterations"])
        object.__setattr__(self, "converged", valid["converged"])


@dataclass(frozen=True)
class _AdmmFactor:
    """The problem's ``H`` in coordinates where ``diag(H) = 1``, factored once for a fixed ρ.

    Everything ADMM pruning needs of ``H``, reusable for any weight (the sparse-plus-low-rank
    alternation prunes a new weight against the same ``H`` at every iteration).
    """

    H: Any          # damped, preconditioned Gram matrix H_n + λI (dead inputs: zero rows)
    H_rho_inv: Any  # (H_n + λI + ρI)⁻¹: one GEMM per Ŵ-update
    rho: float
    scale: Any      # √H_ii per input (1 for dead inputs)
    dead: Any       # boolean, per input


def _admm_factor(xp: Any, H: Any, damping: float, rho: float) -> _AdmmFactor:
    """Precondition ``H`` to a unit diagonal, damp it, and invert ``H + ρI`` (``d_in³``, once)."""
    scale, dead = unit_diagonal(xp, H)  # not all dead: checked by _prepare_pruning_problem
    H_n = add_to_diagonal(xp, H / scale[:, None] / scale[None, :], damping)
    return _AdmmFactor(H_n, spd_inverse(xp, add_to_diagonal(xp, H_n, rho)), rho, scale, dead)


def _to_user(xp: Any, factor: _AdmmFactor, A: Any) -> Any:
    return xp.where(factor.dead[:, None], xp.zeros_like(A), A / factor.scale[:, None])


def _from_user(xp: Any, factor: _AdmmFactor, A: Any) -> Any:
    return xp.where(factor.dead[:, None], xp.zeros_like(A), A * factor.scale[:, None])


def _warm_start(xp: Any, warm_start: Any, W: Any, w_exponent: int) -> AdmmState | None:
    """A warm start on the scaled problem: ``Z`` and ``U`` in the scale of the validated ``W``."""
    if warm_start is None:
        return None
    if not isinstance(warm_start, AdmmState):
        raise TypeError(f"warm_start must be an AdmmState (from return_state=True), got "
                        f"{check.type_name(warm_start)}")
    check.namespace(W=W, **{"warm_start.Z": warm_start.Z})
    shape = tuple(W.shape)
    Z = check.matrix(xp, warm_start.Z, "warm_start.Z", W.dtype, shape=shape)
    U = check.matrix(xp, warm_start.U, "warm_start.U", W.dtype, shape=shape)
    return AdmmState(check.times_power_of_two(xp, Z, -w_exponent),
                     check.times_power_of_two(xp, U, -w_exponent), warm_start.mask,
                     warm_start.iterations, warm_start.converged)


def _warm_iterate(xp: Any, factor: _AdmmFactor, warm_start: AdmmState) -> tuple[Any, Any]:
    """The previous ``(Z, U)`` of a validated warm start, in preconditioned coordinates."""
    return _from_user(xp, factor, warm_start.Z), _from_user(xp, factor, warm_start.U)


def _admm_iterations(xp: Any, H_rho_inv: Any, target: Any, rho: float, W_hat: Any, U: Any,
                     iters: int, mask_at: Callable[[int, Any], Any],
                     ) -> tuple[Any, Any, Any, Any]:
    """Run eq. (1): ``iters`` Ŵ-updates, each preceded by the Z- and U-updates.

    The engine shared by every ADMM L0 regression in matfactor (pruning here, the factor
    updates of :mod:`matfactor.dsf`): ``H_rho_inv = (G + ρI)⁻¹`` for the (preconditioned,
    damped) Gram matrix ``G`` and ``target`` the linear term, so that a Ŵ-update is one GEMM.

    ``mask_at(t, Ŵ + U)`` returns the mask for step ``t`` (``None`` keeps the current one; at
    ``t = 0`` it must return one).
    Returns the last ``(Ŵ, Z, U, mask)`` after a complete Z- and U-update: the state from which
    a warm start resumes with the next Ŵ-update.
    """
    for t in range(iters + 1):
        V = W_hat + U
        new_mask = mask_at(t, V)
        if new_mask is not None:
            mask = new_mask
            # The mask as 0/1 factors: with Z = M ⊙ V, U ← V − Z = (1 − M) ⊙ V and
            # Z − U = (2M − 1) ⊙ V. Products instead of `where`, which NumPy runs an order of
            # magnitude slower than arithmetic (4.3 ms against 0.3 ms for 1024² float32).
            on = xp.astype(mask, V.dtype)
            off = 1.0 - on
            signed_rho = rho * (2.0 * on - 1.0)
        U = V * off
        if t == iters:
            return W_hat, V * on, U, mask
        W_hat = H_rho_inv @ (target + signed_rho * V)
    raise AssertionError("unreachable")


@declare(*_PRUNER_PARAMETERS, Parameter("iters", "integer", minimum=1),
         Parameter("gradual_iters", "integer", minimum=0, maximum="iters",
                   what="(at most iters = {iters})"),
         Parameter("damping", "damping"), Parameter("rho", "real", minimum=0.0, low_open=True),
         Parameter("warm_start", "object", optional=True), Parameter("return_state", "flag"))
def admm_prune(W: Any, H: Any, *, density: float | None = None,
               pattern: str | SparsityPattern = "unstructured", iters: int = 20,
               gradual_iters: int = 15, damping: float = 0.1, rho: float = 1.0,
               warm_start: AdmmState | None = None, return_state: bool = False) -> Any:
    """Prune ``W`` with ADMM and gradual mask selection (Boža 2024; DSF paper, section 3.1).

    Minimises ``tr((Ŵ − W)ᵀ (H + λ·Diag(H)) (Ŵ − W))`` over ``Ŵ`` in ``pattern`` heuristically:
    during the first ``gradual_iters`` iterations the mask goes from dense to the target along
    the cubic schedule, choosing what to remove by ``|Ŵ + U|``; the remaining iterations are
    eq. (1) on the fixed mask.

    Parameters
    ----------
    W
        ``(d_in, d_out)`` weight.
    H
        ``(d_in, d_in)`` Gram matrix ``XᵀX``; any positive multiple gives the same result, and a
        singular ``H`` (dead inputs, few samples) is valid.
    density, pattern
        Kept fraction and sparsity pattern (:mod:`matfactor.sparsity`).
    iters
        Number of ADMM iterations (one GEMM each). The paper uses 20.
    gradual_iters
        Iterations over which the mask is selected (the paper: 15 of 20). ``0`` fixes the mask
        at the start, by ``|W|`` in preconditioned coordinates (the Wanda score).
    damping
        Relative damping ``λ`` (the paper's 0.1).
    rho
        ADMM penalty in preconditioned coordinates (the paper's 1).
    warm_start
        A previous :class:`AdmmState` on the same ``W`` and ``H`` to resume from: the first
        iteration is the Ŵ-update from its ``(Z, U)``. With ``gradual_iters=0`` its mask is kept
        (10 + 10 warm-started iterations equal 20 at once); with ``gradual_iters > 0`` the mask
        is selected again along the schedule, starting from ``|Ŵ + U|``.
    return_state
        Return the :class:`AdmmState` instead of the pruned weight.

    Returns
    -------
    W_sparse or AdmmState
        The pruned weight in the compute dtype, meeting ``pattern`` and its budget exactly.
    """
    problem = _prepare_pruning_problem(W, H, density, pattern, needs_H=True)
    iters, gradual_iters, damping, rho, return_state = contract(admm_prune).validate(
        iters=iters, gradual_iters=gradual_iters, damping=damping, rho=rho,
        return_state=return_state).values()
    xp = problem.xp
    W_scaled, w_exponent = problem.scaled_W()
    warm_start = _warm_start(xp, warm_start, W_scaled, w_exponent)
    if warm_start is not None and gradual_iters == 0 \
            and not mask_satisfies(warm_start.mask, problem.density, problem.pattern):
        raise ValueError(f"warm_start.mask does not meet pattern '{problem.pattern}' at density "
                         f"{problem.density:g} exactly, and gradual_iters=0 keeps it: pass the "
                         "state of a run with the same density and pattern")

    factor = _admm_factor(xp, problem.scaled_H(), damping, rho)
    result = _admm_prune_with_factor(xp, W_scaled, factor, problem.density, problem.pattern,
                                     iters, gradual_iters, warm_start=warm_start,
                                     return_state=return_state)
    check.finite_result(xp, result.Z if return_state else result,
                        f"rho={rho:g} or damping={damping:g} is too small for this H (singular on "
                        "the live inputs); increase damping")
    if not return_state:
        return check.times_power_of_two(xp, result, w_exponent)
    return AdmmState(check.times_power_of_two(xp, result.Z, w_exponent),
                     check.times_power_of_two(xp, result.U, w_exponent), result.mask,
                     result.iterations, result.converged)


def _admm_prune_with_factor(xp: Any, W: Any, factor: _AdmmFactor, density: float,
                           pattern: SparsityPattern, iters: int, gradual_iters: int, *,
                           warm_start: AdmmState | None = None, return_state: bool = False) -> Any:
    """:func:`admm_prune` on validated inputs with a precomputed :class:`_AdmmFactor`.

    Costs ``iters + 1`` GEMMs of ``(d_in, d_in)`` by ``(d_in, d_out)`` and no factorization.
    """
    W_n = _from_user(xp, factor, W)
    target = factor.H @ W_n
    rho = factor.rho
    if warm_start is None:
        # Cold start: Ŵ = W, U = 0 (the Ŵ-update from Z = W, U = 0 would return W itself).
        W_hat, U, remaining = W_n, xp.zeros_like(W_n), iters
    else:
        # Warm start: resume with the Ŵ-update from the previous (Z, U), the first of `iters`.
        Z, U = _warm_iterate(xp, factor, warm_start)
        W_hat, remaining = factor.H_rho_inv @ (target + rho * (Z - U)), iters - 1

    def mask_at(t: int, V: Any) -> Any:
        # Dead inputs have Ŵ + U = 0 exactly, so they are the first to go.
        if t < gradual_iters:
            return _gradual_mask(xp, xp.abs(V), density, pattern,
                                _cubic_schedule(t + 1, gradual_iters))
        if t == 0:  # no gradual phase: keep a warm start's mask, or select one at once
            if warm_start is not None:
                return warm_start.mask
            return _gradual_mask(xp, xp.abs(V), density, pattern, 1.0)
        return None

    _, Z, U, mask = _admm_iterations(xp, factor.H_rho_inv, target, rho, W_hat, U, remaining,
                                    mask_at)
    Z_user = _to_user(xp, factor, Z)
    if not return_state:
        return Z_user
    return AdmmState(Z_user, _to_user(xp, factor, U), mask, iters)


@declare(Parameter("W", "array"), Parameter("H", "array"), Parameter("mask", "array"),
         Parameter("damping", "damping"), Parameter("rho", "real", minimum=0.0, low_open=True),
         Parameter("tol", "real", minimum=0.0, low_open=True, optional=True),
         Parameter("max_iters", "integer", minimum=1), Parameter("check_every", "integer", minimum=1),
         Parameter("adaptive_rho", "flag"), Parameter("warm_start", "object", optional=True),
         Parameter("return_state", "flag"))
def admm_solve(W: Any, H: Any, mask: Any, *, damping: float = 0.0, rho: float = 1.0,
               tol: float | None = None, max_iters: int = 2000, check_every: int = 10,
               adaptive_rho: bool = True, warm_start: AdmmState | None = None,
               return_state: bool = False) -> Any:
    """Least squares on a given support by ADMM: polish the weights of a fixed mask.

    Solves the convex problem ``min tr((Ŵ − W)ᵀ (H + λ·Diag(H)) (Ŵ − W))`` subject to
    ``Ŵ = 0`` off ``mask`` with eq. (1) of the DSF paper, section 3.1, until the primal residual
    ``‖Ŵ − Z‖`` and the dual residual ``ρ‖Z − Z_prev‖`` (Boyd et al., 2011, section 3.3) are
    below ``tol`` relative to the size of the iterates. Its optimality conditions, which the
    result meets to ``tol``: the gradient ``(H + λ·Diag(H))(Z − W)`` vanishes on the support,
    and ``Z`` is exactly zero off it.

    Parameters
    ----------
    W, H
        Weight ``(d_in, d_out)`` and Gram matrix ``(d_in, d_in)``.
    mask
        Boolean ``(d_in, d_out)`` support (from any pruner, or a pattern of the user's own).
    damping
        Relative damping ``λ``; 0 (the default) solves the undamped problem exactly. If ``H``
        restricted to the live inputs is singular (fewer calibration samples than inputs), the
        minimiser is not unique and ADMM converges to one of them only sublinearly: a small
        ``damping`` (e.g. 0.01) restores fast linear convergence. Dead inputs need no damping.
    rho
        Initial ADMM penalty in preconditioned coordinates (``diag(H) = 1``).
    tol
        Relative residual tolerance; default ``1e-10`` in float64, ``1e-5`` in float32.
    max_iters
        Upper bound on the iterations (one GEMM each).
    check_every
        Residuals are read on the host only every ``check_every`` iterations, keeping the loop
        on the device in between.
    adaptive_rho
        Rebalance ``ρ`` at each check when one residual is ten times the other (Boyd et al.,
        2011, section 3.4.1): makes the iteration count insensitive to the initial ``rho``.
    warm_start
        A previous :class:`AdmmState` (e.g. from :func:`admm_prune`) to continue from.
    return_state
        Return the :class:`AdmmState` (with ``converged`` and ``iterations``).

    Returns
    -------
    W_solved or AdmmState
        Weights on ``mask``, exactly zero elsewhere, in the compute dtype.

    Warns
    -----
    ConvergenceWarning
        If ``max_iters`` is reached before ``tol``; the last iterate is returned.
    """
    problem = _prepare_pruning_problem(W, H, 1.0, "unstructured", needs_H=True)
    xp, _ = check.namespace(W=W, mask=mask)
    mask = check.boolean_mask(xp, mask, "mask", tuple(problem.W.shape))
    damping, rho, max_iters, check_every, tol, adaptive_rho, return_state = contract(
        admm_solve).validate(damping=damping, rho=rho, max_iters=max_iters,
                             check_every=check_every, tol=tol, adaptive_rho=adaptive_rho,
                             return_state=return_state).values()
    if tol is None:
        tol = 1e-10 if problem.W.dtype == xp.float64 else 1e-5
    W_scaled, w_exponent = problem.scaled_W()
    warm_start = _warm_start(xp, warm_start, W_scaled, w_exponent)

    factor = _admm_factor(xp, problem.scaled_H(), damping, rho)
    H_n, H_rho_inv = factor.H, factor.H_rho_inv
    W_n = _from_user(xp, factor, W_scaled)
    target = H_n @ W_n
    zeros = xp.zeros_like(W_n)
    if warm_start is None:
        Z, U = xp.where(mask, W_n, zeros), zeros
    else:
        Z, U = _warm_iterate(xp, factor, warm_start)
        Z = xp.where(mask, Z, zeros)

    converged = False
    iterations = 0
    while iterations < max_iters:
        steps = min(check_every, max_iters - iterations)
        for _ in range(steps):
            Z_previous = Z
            W_hat = H_rho_inv @ (target + rho * (Z - U))
            V = W_hat + U
            Z = xp.where(mask, V, 0.0)
            U = xp.where(mask, 0.0, V)
        iterations += steps
        scale = max(float(xp.linalg.vector_norm(W_hat)), float(xp.linalg.vector_norm(Z)),
                    float(xp.linalg.vector_norm(rho * U)), 1e-300)
        primal = float(xp.linalg.vector_norm(W_hat - Z))
        dual = rho * float(xp.linalg.vector_norm(Z - Z_previous))
        if primal <= tol * scale and dual <= tol * scale:
            converged = True
            break
        # Residual balancing (Boyd et al., 2011, section 3.4.1): keep both residuals of the
        # same size. A new ρ costs one refactorization, paid at most once per check.
        if adaptive_rho and (primal > 10 * dual or dual > 10 * primal):
            rho_change = 2.0 if primal > dual else 0.5
            rho *= rho_change
            U = U / rho_change
            H_rho_inv = spd_inverse(xp, add_to_diagonal(xp, H_n, rho))
    if not converged:
        warnings.warn(f"admm_solve stopped at max_iters={max_iters} before reaching tol={tol:g} "
                      f"(primal residual {primal / scale:.2e}, dual {dual / scale:.2e}, relative); "
                      "a rank-deficient H with damping=0 converges slowly: set damping > 0 or "
                      "raise max_iters", ConvergenceWarning, stacklevel=2)
    check.finite_result(xp, Z, f"rho={rho:g} or damping={damping:g} is too small for this H "
                               "(singular on the live inputs); increase damping")
    Z_user = check.times_power_of_two(xp, _to_user(xp, factor, Z), w_exponent)
    if not return_state:
        return Z_user
    return AdmmState(Z_user, check.times_power_of_two(xp, _to_user(xp, factor, U), w_exponent),
                     mask, iterations, converged)


# --------------------------------------------------------------------------- memory model


@_memory.counts(admm_prune)
def _admm_prune_memory(problem: _memory.Problem) -> _memory.SolveMemory:
    """The front door's 3 Hh; ``_admm_factor``: W scaled, H scaled, H/D/D (two), eye, eye·λ,
    the sum (M + 5 Hh); the loop (``_admm_iterations`` at a gradual mask step): H_n and
    (H_n + ρI)⁻¹ (2 Hh); W scaled, W_n, target, the cold start's U = 0 (kept by
    ``_admm_prune_with_factor``), Ŵ, U, V, on, off, signed ρ, ``|V|`` and kthvalue's copy
    (12 M), its int64 indices and the old and new masks; n:m (``_gradual_mask``): the mask of
    the n best and ``where(it, inf, |V|)``."""
    M, Hh, mn = problem.M, problem.Hh, problem.mn
    loop = 2 * Hh + 12 * M + 8 * mn + 2 * mn + (M + mn if problem.nm else 0)
    return _memory.SolveMemory(max(3 * Hh, M + 5 * Hh, loop), M)
