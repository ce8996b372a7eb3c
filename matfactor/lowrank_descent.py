"""Hessian-weighted low-rank approximation by gradient descent: Low-Rank-GD (HASSLE-free, Alg. 1).

Subproblem (P2) of the HASSLE-free paper, eq. (6), reparametrises the rank-r matrix as
``M = U Vᵀ`` and minimises

    f(U, V) = tr((W − U Vᵀ)ᵀ H (W − U Vᵀ))

with Adam. With ``G = H (W − U Vᵀ)`` the gradients are

    ∇_U f = −2 G V,        ∇_V f = −2 Gᵀ U,

and everything is expanded so that ``H`` meets the ``(d_in, d_out)`` target only once, before
the loop (``H W``): each step then costs one GEMM with ``H`` (``H U``, ``d_in² r``) and two thin
GEMMs with ``H W`` (``d_in d_out r``), against ``d_in² d_out`` for forming ``G``::

    G V  = (H W) V − (H U)(VᵀV),        Gᵀ U = (H W)ᵀ U − V (Uᵀ H U),
    f    = tr(Wᵀ H W) − 2 ⟨U, (H W) V⟩ + ⟨Uᵀ H U, VᵀV⟩.

With ``scaled=True`` the problem is first rescaled as in eq. (7): ``D = √diag(H)``, Hessian
``D⁻¹ H D⁻¹`` (unit diagonal), target ``D W``; this changes the optimisation path, not the
minimiser, and lets one learning rate fit every layer (section 4.2.3).

This module is the paper's first-order method; :func:`matfactor.svd.weighted_lowrank` solves
the same problem exactly in closed form and is the reference it is tested against (gradient
descent never beats it). Low-Rank-GD matters as the warm-started inner step of the HASSLE-free
alternation (Algorithm 2), where a few Adam steps per outer iteration track a slowly moving
target.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np
from array_api_compat import is_cupy_namespace, is_torch_namespace

from . import _validation as check
from ._array import random_normal
from ._contract import Parameter, contract, declare
from ._hessian import diagonal_scaling
from .svd import LowRank

__all__ = ["lowrank_gd", "hassle_free_learning_rate"]

# Adam's constants (Kingma & Ba, 2015; PyTorch's defaults, which the paper's code uses).
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8

# An objective this many times the best one so far (or a non-finite one) is a diverging step.
_DIVERGENCE_FACTOR = 2.0


@declare(Parameter("iteration", "integer", minimum=0, doc="The outer iteration ``t``."),
         Parameter("base_lr", "real", minimum=0.0, low_open=True, doc="The base learning rate ``η``."))
def hassle_free_learning_rate(iteration: int, base_lr: float = 1e-2) -> float:
    """``η_t = η / (t + 10)``: the learning rate of Low-Rank-GD at HASSLE-free iteration ``t``.

    Algorithm 2 of the HASSLE-free paper (``get_lr``) decays the learning rate across the outer
    alternating-minimisation iterations ``t = 1, 2, ...``; within one call of Low-Rank-GD it is
    constant. Appendix A.2: ``η = 1e-2`` with the scaling of section 4.2.3.
    """
    iteration, base_lr = contract(hassle_free_learning_rate).validate(
        iteration=iteration, base_lr=base_lr).values()
    return base_lr / (iteration + 10)


def _to_host(xp: Any, values: list[Any]) -> list[float]:
    """A list of 0-d device arrays as Python floats, in one device-to-host transfer."""
    stacked = xp.stack(values)
    if is_torch_namespace(xp):
        return stacked.detach().cpu().tolist()
    if is_cupy_namespace(xp):
        return stacked.get().tolist()
    try:
        return np.asarray(stacked).tolist()
    except (TypeError, ValueError, RuntimeError):  # libraries without __array__: via DLPack
        return np.from_dlpack(stacked).tolist()


def _balance_columns(xp: Any, U: Any, V: Any) -> tuple[Any, Any]:
    """Rescale column pairs to ``‖u_k‖ = ‖v_k‖`` (``U Vᵀ`` unchanged).

    Adam moves every entry by about the learning rate whatever its gradient's scale, so a
    factor pair of very different magnitudes (an SVD with the singular values in ``U``) would
    move one factor relatively much faster than the other. Pairs with a zero column (the
    paper's ``U = 0`` start) are left as they are.
    """
    norm_U = xp.linalg.vector_norm(U, axis=0)
    norm_V = xp.linalg.vector_norm(V, axis=0)
    both = (norm_U > 0) & (norm_V > 0)
    ones = xp.ones_like(norm_U)
    factor = xp.sqrt(xp.where(both, norm_V, ones) / xp.where(both, norm_U, ones))
    return U * factor, V / factor


def _initial_factors(xp: Any, device: Any, target: Any, rank: int, init: Any, scale: Any,
                     unit: float, dead: Any, rng: Any) -> tuple[Any, Any]:
    """``(U, V)`` in the normalised coordinates of the target ``T = D W / unit``."""
    d_in, d_out = target.shape
    if init is None or (isinstance(init, str) and init == "svd"):
        # The best rank-r fit of the scaled target: with scaled=True this is Theorem 4.1's
        # minimiser for the diagonal of H (OATS's low-rank step), a cheap and good start.
        A, s, Bh = xp.linalg.svd(target, full_matrices=False)
        root = xp.sqrt(s[None, :rank])
        return A[:, :rank] * root, Bh[:rank, :].T * root
    if isinstance(init, str) and init == "random":
        # Algorithm 2's start: U = 0, V element-wise standard normal.
        V = random_normal(xp, (d_out, rank), dtype=target.dtype, device=device, rng=rng)
        return xp.zeros((d_in, rank), dtype=target.dtype, device=device), V
    if isinstance(init, LowRank):
        # Validated by the front door: scaled like W, in the compute dtype.
        U = xp.where(dead[:, None], xp.zeros_like(init.U), init.U * (scale[:, None] / unit))
        return _balance_columns(xp, U, init.V)
    raise AssertionError("init is validated by lowrank_gd")


def _init_factors(xp: Any, init: Any, W: Any, rank: int, w_exponent: int) -> Any:
    """``init`` validated: ``None``, ``"svd"``, ``"random"``, or a :class:`LowRank` of ``W``'s
    shape and ``rank`` from ``W``'s library, returned with ``U`` in the scale of the validated
    ``W`` (divided by ``2**w_exponent``) and both factors in its dtype."""
    if init is None or (isinstance(init, str) and init in ("svd", "random")):
        return init
    if isinstance(init, str):
        raise ValueError(f"init must be None, 'svd', 'random' or a LowRank, got {init!r}")
    if not isinstance(init, LowRank):
        raise TypeError(f"init must be None, 'svd', 'random' or a LowRank, got "
                        f"{check.type_name(init)}")
    d_in, d_out = W.shape
    if init.shape != (d_in, d_out) or init.rank != rank:
        raise ValueError(f"init has shape {init.shape} and rank {init.rank}, expected shape "
                         f"{(d_in, d_out)} and rank {rank}")
    check.namespace(W=W, **{"init.U": init.U, "init.V": init.V})
    U = check.matrix(xp, init.U, "init.U", W.dtype)
    V = check.matrix(xp, init.V, "init.V", W.dtype)
    return LowRank(check.times_power_of_two(xp, U, -w_exponent), V)


@declare(Parameter("W", "array"), Parameter("H", "array"), Parameter("rank", "rank"),
         Parameter("iters", "integer", minimum=0), Parameter("lr", "real", minimum=0.0, low_open=True),
         Parameter("init", "object", choices=("svd", "random"), optional=True),
         Parameter("scaled", "flag"), Parameter("damping", "damping"), Parameter("rng", "rng"),
         Parameter("return_history", "flag"), Parameter("check_every", "integer", minimum=1))
def lowrank_gd(W: Any, H: Any, rank: int, *, iters: int = 200, lr: float = 1e-2,
               init: LowRank | str | None = None, scaled: bool = True, damping: float = 0.0,
               rng: Any = None, return_history: bool = True, check_every: int = 10) -> LowRank:
    """Low-Rank-GD (HASSLE-free, Algorithm 1): Adam on ``U, V`` for ``min tr((W−UVᵀ)ᵀH(W−UVᵀ))``.

    Section 4.2.3, eq. (6), and with ``scaled=True`` eq. (7); analytic gradients (see the
    module docstring), one GEMM with ``H`` per step, no host synchronisation between checks.

    Parameters
    ----------
    W
        ``(d_in, d_out)`` target (in HASSLE-free: ``Ŵ − W_S``).
    H
        ``(d_in, d_in)`` Gram matrix ``XᵀX``; any positive multiple gives the same result.
        Dead inputs (``H_ii = 0``) are no part of the problem: their rows of ``U`` are zero.
    rank
        ``r`` in ``[1, min(d_in, d_out)]``.
    iters
        Adam steps (the paper's ``T_LR``; it uses 50 per outer iteration, warm-started). The
        default 200 suits a standalone call from the default start.
    lr
        Adam learning rate, constant within the call (Algorithm 1; Algorithm 2 decays it across
        outer iterations, see :func:`hassle_free_learning_rate`). It is measured in units of the
        root-mean-square entry of the target (``D W`` when scaled), which makes it independent
        of the scales of ``W`` and ``H``; the paper's ``η = 1e-2`` (appendix A.2) is the default.
    init
        Start: ``None`` or ``"svd"`` for the truncated SVD of the (scaled) target, i.e. the
        diagonal-Hessian minimiser of Theorem 4.1; ``"random"`` for Algorithm 2's ``U = 0``,
        ``V`` standard normal (drawn with ``rng``); or a :class:`~matfactor.svd.LowRank` warm
        start (e.g. the previous outer iteration's result), whose column pairs are rebalanced
        to equal norms (same product) before the first step.
    scaled
        Apply the diagonal rescaling of eq. (7) (the paper's ``is_scaled``, default on).
    damping
        Relative damping: minimise with ``H + λI`` on the live inputs, ``λ = damping ·
        mean(diag H)`` (the paper's ``XᵀX + λI`` with SparseGPT's 0.01). Default 0: the
        undamped objective.
    rng
        Seed or generator for ``init="random"``.
    return_history
        Attach the objective history to the result (it is computed anyway).
    check_every
        Objectives are read on the host every ``check_every`` steps (one transfer), where
        divergence is detected.

    Returns
    -------
    LowRank
        The best iterate by objective, in user coordinates (``U`` unscaled, rows of dead inputs
        zero), compute dtype, input's device. ``history[k]`` is the relative objective
        ``tr((W−U_kV_kᵀ)ᵀ H_λ (W−U_kV_kᵀ)) / tr(Wᵀ H_λ W)`` of the k-th evaluated iterate
        (``H_λ`` the damped H; ``iters + 1`` values, the start first); the result is the
        iterate of ``min(history)``.

    Notes
    -----
    Divergence recovery: at each check, if an objective is non-finite or the latest exceeds
    twice the best so far, the best iterate is restored, Adam's moments are reset and the
    learning rate is halved for the remaining steps (the restored iterate is evaluated again,
    which uses one of the ``iters`` steps). The objective is evaluated from its expanded form,
    accurate to about ``eps · tr(Wᵀ H W)``. If ``tr(Wᵀ H W) = 0`` the zero matrix (exact) is
    returned.
    """
    xp, device, W, H, w_exponent = check.layer_problem(W, H, needs_H=True, require_live=True)
    rank, iters, check_every, damping, lr, scaled, return_history, rng = contract(
        lowrank_gd).validate({"shape": tuple(W.shape)}, rank=rank, iters=iters,
                             check_every=check_every, damping=damping, lr=lr, scaled=scaled,
                             return_history=return_history, rng=rng).values()
    init = _init_factors(xp, init, W, rank, w_exponent)

    H_n, scale, dead = diagonal_scaling(xp, H, damping)
    if not scaled:
        # Undo eq. (7) but keep the division by mean(diag H): (H + λI) / h̄, target W.
        H_n = H_n * scale[:, None] * scale[None, :]
        scale = xp.ones_like(scale)
    target = xp.where(dead[:, None], xp.zeros_like(W), W * scale[:, None])
    # Normalise the target to unit RMS entry, so that lr (an absolute step for Adam) is relative.
    unit = float(xp.linalg.vector_norm(target)) / math.sqrt(W.shape[0] * W.shape[1])
    zero_result = LowRank(xp.zeros((W.shape[0], rank), dtype=W.dtype, device=device),
                          xp.zeros((W.shape[1], rank), dtype=W.dtype, device=device),
                          (0.0,) if return_history else None)
    if unit == 0.0:
        return zero_result  # W vanishes on the live inputs: M = 0 is exact
    target = target / unit
    U, V = _initial_factors(xp, device, target, rank, init, scale, unit, dead, rng)

    HT = H_n @ target                        # the one (d_in, d_in) x (d_in, d_out) product
    reference = xp.sum(target * HT)          # tr(Tᵀ H_n T): f at M = 0, normaliser of history
    if not float(reference) > 0:
        return zero_result  # tr(WᵀHW) = 0: W lies in the null space of H, M = 0 is exact
    best_U, best_V, history = _adam_lowrank(xp, H_n, HT, reference, U, V, iters=iters, lr=lr,
                                           check_every=check_every)
    U_user = xp.where(dead[:, None], xp.zeros_like(best_U), best_U * (unit / scale[:, None]))
    return LowRank(check.times_power_of_two(xp, U_user, w_exponent), best_V,
                   tuple(history) if return_history else None)


def _adam_lowrank(xp: Any, H_n: Any, HT: Any, reference: Any, U: Any, V: Any, *, iters: int,
                 lr: float, check_every: int) -> tuple[Any, Any, list[float]]:
    """The Adam loop of Low-Rank-GD on prepared inputs: ``iters`` steps from ``(U, V)``.

    Minimises ``f(U, V) = ⟨T, H_n T⟩ − 2⟨U, (H_n T) V⟩ + ⟨Uᵀ H_n U, VᵀV⟩`` (the expanded
    objective of the module docstring) given ``HT = H_n T`` and ``reference = ⟨T, H_n T⟩ > 0``
    as a 0-d array, without ever forming ``T``. Shared by :func:`lowrank_gd` and the
    sparse-plus-low-rank alternation, which prepares ``H_n`` once for all its calls.

    Returns the best iterate ``(U, V)`` and the history of ``f / reference``, one value per
    evaluated iterate (``iters + 1``, the start first); divergence recovery as in
    :func:`lowrank_gd`.
    """
    device = array_api_compat.device(U)
    inv_reference = 1.0 / reference

    def evaluate(U: Any, V: Any) -> tuple[Any, Any, Any]:
        HU = H_n @ U
        HTV = HT @ V
        UHU = U.T @ HU
        VV = V.T @ V
        objective = (reference - 2 * xp.sum(U * HTV) + xp.sum(UHU * VV)) * inv_reference
        grad_U = -2 * (HTV - HU @ VV)
        grad_V = -2 * (HT.T @ U - V @ UHU)
        return objective, grad_U, grad_V

    best_U, best_V = U, V
    best = xp.asarray(math.inf, dtype=U.dtype, device=device)
    history: list[float] = []
    window: list[Any] = []
    m_U, v_U = xp.zeros_like(U), xp.zeros_like(U)
    m_V, v_V = xp.zeros_like(V), xp.zeros_like(V)
    adam_step = 0
    best_seen = math.inf
    for k in range(iters + 1):
        objective, grad_U, grad_V = evaluate(U, V)
        window.append(objective)
        # Keep the best iterate on the device: a select per step, no host read.
        better = objective < best
        best_U = xp.where(better, U, best_U)
        best_V = xp.where(better, V, best_V)
        best = xp.where(better, objective, best)
        last = k == iters
        if len(window) == check_every or last:
            values = _to_host(xp, window)
            window = []
            history.extend(values)
            finite_values = [v for v in values if math.isfinite(v)]
            finite = len(finite_values) == len(values)
            best_seen = min([best_seen, *finite_values])
            if not last and (not finite or values[-1] > _DIVERGENCE_FACTOR * best_seen):
                # A diverging step: restart Adam from the best iterate with half the step.
                U, V = best_U, best_V
                m_U, v_U = xp.zeros_like(U), xp.zeros_like(U)
                m_V, v_V = xp.zeros_like(V), xp.zeros_like(V)
                adam_step = 0
                lr *= 0.5
                continue
        if last:
            break
        adam_step += 1
        m_U = _BETA1 * m_U + (1 - _BETA1) * grad_U
        m_V = _BETA1 * m_V + (1 - _BETA1) * grad_V
        v_U = _BETA2 * v_U + (1 - _BETA2) * grad_U * grad_U
        v_V = _BETA2 * v_V + (1 - _BETA2) * grad_V * grad_V
        step = lr / (1 - _BETA1 ** adam_step)
        root_correction = math.sqrt(1 - _BETA2 ** adam_step)
        U = U - step * m_U / (xp.sqrt(v_U) / root_correction + _ADAM_EPS)
        V = V - step * m_V / (xp.sqrt(v_V) / root_correction + _ADAM_EPS)

    return best_U, best_V, history
