"""Sparse plus low-rank decomposition by alternating minimisation: HASSLE-free, and OATS.

HASSLE-free paper (Makni et al.), problem (1): with ``H = XᵀX``,

    minimise  f(S, M) = tr((W − S − M)ᵀ H (W − S − M))
    subject to  S in the sparsity pattern,  rank(M) <= r,

solved by Algorithm 2, alternating the two subproblems of section 4 from ``S = 0, M = 0``::

    S_t = prune(W − M_{t−1})           (P1), eq. (2): a pruner on the residual weight
    M_t = lowrank(W − S_t)             (P2), eq. (3): Hessian-weighted rank-r fit

Both subproblems share ``H``, which does not change across iterations, so everything a pruner
or the low-rank step needs of ``H`` (SparseGPT's inverse-Hessian factor, ADMM's preconditioned
inverse, the low-rank step's scaled Gram matrix or eigendecomposition) is computed once and
reused (section 4.3, "Computational efficiency").

The three Hessians of sections 4.1–4.2 (``hessian=``):

- ``"full"``: HASSLE-free. The sparse step is any pruner (SparseGPT by default, as the paper);
  the low-rank step is Low-Rank-GD (Algorithm 1: Adam on ``U, V``, scaled per eq. (7),
  warm-started, learning rate ``η/(t + 10)``) or, a choice the paper does not offer, the exact
  minimiser of (P2) by whitening (:func:`matfactor.svd.weighted_lowrank`).
- ``"diagonal"``: both steps use ``diag(H)``; this is OATS (Corollary 4.2): with
  ``D = √diag(H)``, the sparse step keeps the largest ``|D W̃|`` (Wanda's score, exact for
  (P1)) and the low-rank step is ``D⁻¹ C_r(D W̄)`` (Theorem 4.1).
- ``"identity"``: the data-free variant (sections 4.1.1, 4.2.1): magnitude pruning and the
  truncated SVD.

Whatever the variant, the iterates are judged by the true objective ``f`` with the ``H``
given (Frobenius if ``H`` is ``None``): the result is the best iterate and carries the
objective history.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_compat

from . import _memory
from . import _validation as check
from ._array import random_normal
from ._hessian import diagonal_scaling, input_norms
from ._contract import Parameter, contract, declare
from .admm import _admm_factor, _admm_prune_with_factor, admm_prune
from .error import _weighted_sq_norm, layer_error
from .lowrank_descent import _adam_lowrank, _balance_columns, hassle_free_learning_rate
from .pifa import _RTOL, Pivoted, pifa_from_factors
from .pruning import (
    Pruner,
    _sparsegpt_factor,
    _sparsegpt_with_factor,
    magnitude_prune,
    sparsegpt_prune,
    wanda_prune,
)
from .sparsity import SparsityPattern, _mask, _wanda_scores, mask_satisfies, nnz_budget
from .svd import (
    LowRank,
    _default_power_iters,
    _identity_whitening,
    _randomized_svd,
    _whiten,
    _whitened_lowrank,
)

__all__ = [
    "SparseLowRankBudget",
    "SparsePlusLowRank",
    "sparse_lowrank_budget",
    "sparse_lowrank_rank",
    "sparse_plus_lowrank",
]

_HESSIANS = ("full", "diagonal", "identity")
_LOWRANK_STEPS = ("gd", "exact")
# The pruner each Hessian calls for (sections 4.1.1–4.1.3): the exact minimiser of (P1) for the
# identity and the diagonal, the paper's SparseGPT for the full Hessian.
_DEFAULT_PRUNER = {"full": "sparsegpt", "diagonal": "wanda", "identity": "magnitude"}
# Low-Rank-GD is the paper's (P2) step for the full Hessian; for the others (P2) has a closed
# form (Eckart–Young, Theorem 4.1) that gradient descent could only approach.
_DEFAULT_LOWRANK = {"full": "gd", "diagonal": "exact", "identity": "exact"}
# The built-in pruners by name. Their options, defaults and checks are their contracts'
# parameters beyond the shared pruner signature, less those the alternation sets itself (it
# warm-starts nothing and takes the pruned weight, not a state).
_PRUNERS = {"magnitude": magnitude_prune, "wanda": wanda_prune, "sparsegpt": sparsegpt_prune,
            "admm": admm_prune}
_NOT_PRUNER_OPTIONS = ("warm_start", "return_state")


def _pruner_options(pruner: str) -> dict[str, Any]:
    """The options of the built-in ``pruner`` and their defaults, in signature order."""
    shared = contract(Pruner.__call__).parameters
    return {name: parameter.default
            for name, parameter in contract(_PRUNERS[pruner]).parameters.items()
            if name not in shared and name not in _NOT_PRUNER_OPTIONS}


@declare(Parameter("S", "array"), Parameter("U", "array"), Parameter("V", "array"),
         Parameter("history", "object", optional=True),
         Parameter("best_iteration", "integer", minimum=0, maximum="last_index",
                   what="(an index in history)", optional=True))
@dataclass(frozen=True, eq=False)
class SparsePlusLowRank:
    """A ``(d_in, d_out)`` weight approximated as ``Ŵ = S + U Vᵀ``.

    Attributes
    ----------
    S
        ``(d_in, d_out)`` sparse part, exactly zero off its pattern.
    U, V
        ``(d_in, r)`` and ``(d_out, r)`` factors of the low-rank part ``M = U Vᵀ``.
    history
        For :func:`sparse_plus_lowrank`: the relative objective ``f / tr(Wᵀ H W)`` of the
        starting point and of every iteration, ``iters + 1`` floats; ``None`` otherwise.
    best_iteration
        The index in ``history`` of the iterate returned (its minimum).
    """

    S: Any
    U: Any
    V: Any
    history: tuple[float, ...] | None = None
    best_iteration: int | None = None

    def __post_init__(self) -> None:
        xp, _ = check.namespace(S=self.S, U=self.U, V=self.V)
        dtype = check.common_dtype(xp, S=self.S, U=self.U, V=self.V)
        for name in ("S", "U", "V"):
            check.matrix(xp, getattr(self, name), name, dtype)
        if self.U.shape[1] != self.V.shape[1] \
                or (self.U.shape[0], self.V.shape[0]) != tuple(self.S.shape):
            raise ValueError(f"SparsePlusLowRank needs S (d_in, d_out), U (d_in, r) and V (d_out, r), "
                             f"got shapes {tuple(self.S.shape)}, {tuple(self.U.shape)} and "
                             f"{tuple(self.V.shape)}")
        if self.history is not None and (not isinstance(self.history, tuple) or not all(
                isinstance(v, float) for v in self.history)):
            raise TypeError(f"history must be None or a tuple of floats, got "
                            f"{check.type_name(self.history)}")
        last_index = None if self.history is None else len(self.history) - 1
        object.__setattr__(self, "best_iteration", contract(SparsePlusLowRank).validate(
            {"last_index": last_index}, best_iteration=self.best_iteration)["best_iteration"])

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_in, d_out)`` of the approximated weight."""
        return int(self.S.shape[0]), int(self.S.shape[1])

    @property
    def rank(self) -> int:
        """The number of columns ``r`` of the low-rank factors."""
        return int(self.U.shape[1])

    @property
    def nnz(self) -> int:
        """Number of nonzero entries of ``S`` (one host read)."""
        xp = array_api_compat.array_namespace(self.S)
        return int(xp.sum(xp.astype(self.S != 0, xp.int64)))

    @property
    def n_params(self) -> int:
        """Stored values: ``nnz(S) + r (d_in + d_out)`` (indices of ``S`` not counted).

        Storing the low-rank part with :meth:`pifa` saves ``r²`` of them.
        """
        d_in, d_out = self.shape
        return self.nnz + self.rank * (d_in + d_out)

    @property
    def lowrank(self) -> LowRank:
        """The low-rank part ``M = U Vᵀ`` as a :class:`~matfactor.svd.LowRank`."""
        return LowRank(self.U, self.V)

    def dense(self) -> Any:
        """``Ŵ = S + U Vᵀ`` as a ``(d_in, d_out)`` array."""
        return self.S + self.U @ self.V.T

    def matmul(self, X: Any) -> Any:
        """``X @ Ŵ = X @ S + (X @ U) @ Vᵀ``, never forming ``Ŵ``; ``X`` of shape ``(..., d_in)``."""
        _, X = check.layer_input(X, self.S, self.S.shape[0])
        return X @ self.S + (X @ self.U) @ self.V.T

    def rel_error(self, W: Any, H: Any | None = None) -> float:
        """Relative layer error ``tr(Dᵀ H D) / tr(Wᵀ H W)`` of ``Ŵ`` against ``W``
        (:func:`matfactor.error.layer_error`); Frobenius for ``H = None``."""
        return layer_error(W, self.dense(), H)

    @declare(_RTOL, docs_from=(pifa_from_factors,))
    def pifa(self, *, rtol: float | None = None) -> Pivoted:
        """The low-rank part as a PIFA :class:`~matfactor.pifa.Pivoted` factor.

        The same matrix ``U Vᵀ`` (to rounding) in ``r (d_in + d_out − r)`` numbers instead of
        ``r (d_in + d_out)``, with the faster PIFA layer: the whole weight is then stored in
        ``nnz(S) + r (d_in + d_out − r)`` values, and ``X @ Ŵ = X @ S + pivoted.matmul(X)``.
        Raises ``ValueError`` if ``U Vᵀ`` has numerical rank below ``r`` (see
        :func:`~matfactor.pifa.pifa_from_factors`).
        """
        return pifa_from_factors(self.U, self.V, rtol=rtol)


# --------------------------------------------------------------------------- budgets


class SparseLowRankBudget(NamedTuple):
    """A parameter budget split between a sparse part and a rank-``r`` part.

    ``density`` is the kept fraction of the sparse part, chosen so that
    ``nnz_budget(shape, density, "unstructured") == nnz`` exactly: it is ``(nnz + 1/2) / size``,
    midway between the densities that keep ``nnz`` and ``nnz + 1``, so that no rounding of the
    float changes the count.
    """

    rank: int
    density: float
    nnz: int


@declare(Parameter("shape", "shape"),
         Parameter("compression", "real", minimum=0.0, maximum=1.0, high_open=True),
         Parameter("pattern", "pattern"), Parameter("density", "density"))
def sparse_lowrank_rank(shape: tuple[int, int], compression: float, *,
                        pattern: str | SparsityPattern = "2:4", density: float | None = None) -> int:
    """Rank of the low-rank part for a compression ratio ``ρ`` beside a sparse part (section 5).

    ``r = ⌊(1 − ρ − δ) · d_in d_out / (d_in + d_out)⌋`` with ``δ`` the sparse part's density
    (``n/m`` for an ``n:m`` pattern), so that ``δ d_in d_out + r (d_in + d_out) <= (1 − ρ)
    d_in d_out``: the paper's "N:M sparsity + fixed compression ratio" setting.

    Parameters
    ----------
    shape
        ``(d_in, d_out)``.
    compression
        ``ρ`` in ``[0, 1)``: the fraction of the dense parameters removed.
    pattern, density
        The sparse part's pattern and density (``density`` implied for ``n:m``).

    Returns
    -------
    int
        ``r >= 0``; 0 when the sparse part alone fills the budget. At most ``min(d_in, d_out)``.

    Raises
    ------
    ValueError
        If the sparse part alone exceeds the budget ``(1 − ρ) d_in d_out``.
    """
    (d_in, d_out), compression, pattern, density = contract(sparse_lowrank_rank).validate(
        shape=shape, compression=compression, pattern=pattern, density=density).values()
    size = d_in * d_out
    sparse = nnz_budget((d_in, d_out), density, pattern)
    room = (1.0 - compression) * size - sparse
    if room < -1e-9 * size:
        raise ValueError(f"compression={compression:g} keeps {(1 - compression) * size:g} values of "
                         f"a {(d_in, d_out)} weight, but pattern '{pattern}' alone keeps {sparse}: "
                         f"lower the compression or the sparse density")
    rank = max(0, math.floor(room / (d_in + d_out) + 1e-9))
    return min(rank, d_in, d_out)


@declare(Parameter("shape", "shape"),
         Parameter("compression", "real", minimum=0.0, maximum=1.0, high_open=True),
         Parameter("rank_ratio", "real", minimum=0.0, maximum=1.0, low_open=True, high_open=True))
def sparse_lowrank_budget(shape: tuple[int, int], compression: float,
                          rank_ratio: float) -> SparseLowRankBudget:
    """Rank and unstructured nnz from a compression ratio and a rank ratio (appendix A.3, OATS).

    ``r = ⌊κ (1 − ρ) d_in d_out / (d_in + d_out)⌋`` and ``k = ⌊(1 − κ)(1 − ρ) d_in d_out⌋``:
    the fraction ``κ`` of the kept parameters goes to the low-rank part.

    Parameters
    ----------
    shape
        ``(d_in, d_out)``.
    compression
        ``ρ`` in ``[0, 1)``.
    rank_ratio
        ``κ`` in ``(0, 1)`` (OATS's default for Llama-3-8B: 0.3).

    Returns
    -------
    SparseLowRankBudget
        ``(rank, density, nnz)``; pass ``rank`` and ``density`` to :func:`sparse_plus_lowrank`
        with ``pattern="unstructured"``.
    """
    (d_in, d_out), compression, rank_ratio = contract(sparse_lowrank_budget).validate(
        shape=shape, compression=compression, rank_ratio=rank_ratio).values()
    kept = (1.0 - compression) * d_in * d_out
    rank = min(math.floor(rank_ratio * kept / (d_in + d_out) + 1e-9), d_in, d_out)
    nnz = math.floor((1.0 - rank_ratio) * kept + 1e-9)
    return SparseLowRankBudget(rank, min(1.0, (nnz + 0.5) / (d_in * d_out)), nnz)


# --------------------------------------------------------------------------- the two steps


def _sparse_step(xp: Any, pruner: str | Callable[..., Any], H_method: Any, density: float,
                 pattern: SparsityPattern, options: dict[str, Any]) -> Callable[[Any], Any]:
    """The (P1) step ``W̃ ↦ S`` with everything it needs of ``H`` computed now, once."""
    if callable(pruner):
        def user_step(target: Any) -> Any:
            S = pruner(target, H_method, density=density, pattern=str(pattern), **options)
            return _user_result(xp, S, target, density, pattern)
        return user_step

    settings = contract(_PRUNERS[pruner]).validate(**{**_pruner_options(pruner), **options})
    if pruner == "magnitude":
        return lambda target: xp.where(_mask(xp, xp.abs(target), density, pattern), target,
                                       xp.zeros_like(target))
    if pruner == "wanda":
        norms, _ = input_norms(xp, H_method)
        return lambda target: xp.where(_mask(xp, _wanda_scores(xp, target, norms), density,
                                             pattern), target, xp.zeros_like(target))
    if pruner == "sparsegpt":
        factor = _sparsegpt_factor(xp, H_method, settings["damping"])
        return lambda target: _sparsegpt_with_factor(xp, target, factor, density, pattern,
                                                    settings["block_size"])
    factor = _admm_factor(xp, H_method, settings["damping"], settings["rho"])
    return lambda target: _admm_prune_with_factor(xp, target, factor, density, pattern,
                                                 settings["iters"], settings["gradual_iters"])


def _user_result(xp: Any, S: Any, target: Any, density: float, pattern: SparsityPattern) -> Any:
    """A user pruner's result, validated: a finite same-shaped array of ``target``'s library
    within the pattern and its budget, returned in ``target``'s dtype (detached)."""
    try:
        check.namespace(target=target, pruned=S)
        S = check.matrix(xp, S, "pruned", target.dtype, shape=tuple(target.shape))
    except (TypeError, ValueError) as error:
        raise type(error)(f"pruner returned an array that does not match its input: {error}") \
            from None
    if not mask_satisfies(S != 0, density, pattern, exact=False):
        raise ValueError(f"pruner returned a weight outside pattern '{pattern}' at density "
                         f"{density:g} (more nonzeros than the pattern keeps)")
    return S


@dataclass(frozen=True)
class _LowRankCoordinates:
    """(P2) in the scaled coordinates of eq. (7), prepared once for all iterations.

    A weight ``A`` in user coordinates is ``A · scale / unit`` here (rows of dead inputs zero),
    with ``unit`` the root-mean-square entry of the scaled ``W``: the learning rate of
    Low-Rank-GD is measured in that unit, the same at every iteration.
    """

    H_n: Any            # D⁻¹ H D⁻¹ (unit diagonal on live inputs), or H / h̄ when not scaled
    scale: Any          # D / √h̄ per input (1 for dead inputs; all 1 when not scaled)
    dead: Any
    unit: float
    whitening: Any      # for the exact step, else None
    reference: float    # ⟨W, H_n W⟩ in these coordinates: f here / reference = f / tr(WᵀHW)

    def to_scaled(self, xp: Any, A: Any) -> Any:
        return xp.where(self.dead[:, None], xp.zeros_like(A), A * (self.scale[:, None] / self.unit))

    def to_user(self, xp: Any, A: Any) -> Any:
        return xp.where(self.dead[:, None], xp.zeros_like(A), A * (self.unit / self.scale[:, None]))


def _lowrank_coordinates(xp: Any, W: Any, H_method: Any, hessian: str, lowrank: str,
                         scaled: bool) -> _LowRankCoordinates:
    H_n, scale, dead = diagonal_scaling(xp, H_method, 0.0)
    if not scaled:
        H_n = H_n * scale[:, None] * scale[None, :]
        scale = xp.ones_like(scale)
    scaled_W = xp.where(dead[:, None], xp.zeros_like(W), W * scale[:, None])
    unit = float(xp.linalg.vector_norm(scaled_W)) / math.sqrt(W.shape[0] * W.shape[1])
    whitening = None
    if lowrank == "exact":
        # A diagonal H is the identity on the live inputs once scaled: no eigendecomposition.
        whitening = _whiten(xp, H_n) if hessian == "full" else _identity_whitening(xp, ~dead, W.dtype)
    scaled_W = scaled_W / unit
    return _LowRankCoordinates(H_n, scale, dead, unit, whitening,
                               float(xp.sum(scaled_W * (H_n @ scaled_W))))


# --------------------------------------------------------------------------- validation


def _pruner(pruner: Any, options: Any) -> tuple[str | Callable[..., Any], dict[str, Any]]:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"pruner_options must be a dict of keyword arguments, got "
                        f"{check.type_name(options)}")
    if callable(pruner):
        return pruner, dict(options)
    pruner = contract(sparse_plus_lowrank).validate(pruner=pruner)["pruner"]
    known_options = _pruner_options(pruner)
    unknown = sorted(set(options) - set(known_options))
    if unknown:
        known = ", ".join(known_options) or "none"
        raise TypeError(f"pruner_options {unknown} are not options of pruner '{pruner}' "
                        f"(its options: {known})")
    return pruner, dict(options)


def _initial_point(xp: Any, init: Any, W: Any, rank: int, w_exponent: int,
                   ) -> tuple[Any, Any, Any] | None:
    """``(S₀, U₀, V₀)`` of a warm start, validated and in the scale of the validated ``W``
    (``S₀`` and ``U₀`` divided by ``2**w_exponent``); ``None`` for a cold start."""
    if init is None:
        return None
    if isinstance(init, str):
        contract(sparse_plus_lowrank).validate(init=init)
        return None
    if isinstance(init, SparsePlusLowRank):
        S, U, V = init.S, init.U, init.V
    elif isinstance(init, LowRank):
        S, U, V = None, init.U, init.V
    else:
        raise TypeError(f"init must be None, 'random', a LowRank or a SparsePlusLowRank, got "
                        f"{check.type_name(init)}")
    d_in, d_out = W.shape
    if tuple(U.shape) != (d_in, rank) or tuple(V.shape) != (d_out, rank):
        raise ValueError(f"init has factors of shapes {tuple(U.shape)} and {tuple(V.shape)}, "
                         f"expected {(d_in, rank)} and {(d_out, rank)} for rank {rank}")
    arrays = {"init.U": U, "init.V": V} if S is None else {"init.S": S, "init.U": U, "init.V": V}
    check.namespace(W=W, **arrays)
    U = check.times_power_of_two(xp, check.matrix(xp, U, "init.U", W.dtype), -w_exponent)
    V = check.matrix(xp, V, "init.V", W.dtype)
    if S is None:
        S = xp.zeros_like(W)
    else:
        S = check.times_power_of_two(xp, check.matrix(xp, S, "init.S", W.dtype, shape=(d_in, d_out)),
                                     -w_exponent)
    return S, U, V


# --------------------------------------------------------------------------- the solver


@declare(Parameter("W", "array"), Parameter("H", "array"), Parameter("rank", "rank"),
         Parameter("density", "density"), Parameter("pattern", "pattern"),
         Parameter("pruner", "pruner", choices=tuple(_PRUNERS), optional=True),
         Parameter("lowrank", "choice", choices=_LOWRANK_STEPS, optional=True),
         Parameter("hessian", "choice", choices=_HESSIANS),
         Parameter("iters", "integer", minimum=1), Parameter("lowrank_iters", "integer", minimum=1),
         Parameter("lr", "real", minimum=0.0, low_open=True), Parameter("scaled", "flag"),
         Parameter("init", "object", choices=("random",), optional=True),
         Parameter("pruner_options", "object", optional=True), Parameter("rng", "rng"))
def sparse_plus_lowrank(W: Any, H: Any | None, rank: int, *, density: float | None = None,
                        pattern: str | SparsityPattern = "unstructured",
                        pruner: str | Callable[..., Any] | None = None,
                        lowrank: str | None = None, hessian: str = "full", iters: int = 80,
                        lowrank_iters: int = 50, lr: float = 0.1, scaled: bool = True,
                        init: SparsePlusLowRank | LowRank | str | None = None,
                        pruner_options: dict[str, Any] | None = None,
                        rng: Any = None) -> SparsePlusLowRank:
    """Decompose ``W ≈ S + U Vᵀ`` minimising the layer error (HASSLE-free, Algorithm 2).

    Alternating minimisation of ``f(S, M) = tr((W − S − M)ᵀ H (W − S − M))`` over ``S`` in
    ``pattern`` and ``rank(M) <= r`` (problem (1), section 4): each iteration prunes the
    residual ``W − M`` (P1) and fits ``M`` to ``W − S`` (P2). See the module docstring for the
    variants and what is computed once.

    Parameters
    ----------
    W
        ``(d_in, d_out)`` weight of ``Y = X @ W``.
    H
        ``(d_in, d_in)`` Gram matrix ``XᵀX``; any positive multiple gives the same result, and a
        singular ``H`` (dead inputs) is valid. ``None`` only with ``hessian="identity"`` (data
        free); the objective is then the Frobenius norm.
    rank
        ``r`` of the low-rank part, in ``[1, min(d_in, d_out)]`` (see :func:`sparse_lowrank_rank`
        and :func:`sparse_lowrank_budget` for the paper's budgets).
    density, pattern
        The sparse part's kept fraction and pattern (:mod:`matfactor.sparsity`); an ``n:m``
        pattern implies its density.
    pruner
        The (P1) step: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"``, ``"admm"``, or any callable
        with the :class:`~matfactor.pruning.Pruner` signature, called as
        ``pruner(W̃, H_used, density=, pattern=, **pruner_options)`` (it pays its own setup at
        each call; its result is checked against the pattern). Like every pruner it must
        scale its result with ``W̃`` and ignore the scale of ``H``: it is called on the
        problem scaled to unit magnitude by powers of two (section "Scale" of the guide).
        Default: the paper's choice for the Hessian, ``"sparsegpt"`` for full, ``"wanda"`` for
        diagonal (exact for (P1) with a diagonal ``H``), ``"magnitude"`` for identity (exact
        for ``H = I``). A pruner receives
        the Hessian of the variant: ``H``, ``diag(H)`` as a matrix, or the identity.
    lowrank
        The (P2) step: ``"gd"`` (Low-Rank-GD, Algorithm 1) or ``"exact"`` (the closed-form
        minimiser by whitening; one eigendecomposition of ``H`` in all, then an SVD of the
        ``(d_in, d_out)`` whitened residual per iteration). Default ``"gd"`` for the full
        Hessian (the paper), ``"exact"`` for the others (Theorem 4.1, Eckart–Young).
    hessian
        ``"full"`` (HASSLE-free), ``"diagonal"`` (OATS) or ``"identity"`` (data free).
    iters
        Alternating-minimisation iterations ``T_AM`` (appendix A.2: 80, OATS's default).
    lowrank_iters
        Adam steps per Low-Rank-GD call ``T_LR`` (appendix A.2: 50).
    lr
        Base learning rate ``η`` of Low-Rank-GD; iteration ``t`` uses ``η / (t + 10)``
        (:func:`~matfactor.lowrank_descent.hassle_free_learning_rate`). In units of the
        root-mean-square entry of the scaled weight ``D W`` (so independent of the scales of
        ``W`` and ``H``, unlike the paper's absolute ``η = 1e-2``). The default 0.1 makes the
        first call's step 0.1/11 ≈ 1e-2, the standalone default of
        :func:`~matfactor.lowrank_descent.lowrank_gd`; on real MiniLM layers and the synthetic
        layers of :mod:`matfactor.testing` (2:4 plus rank ``d/64``, 40 iterations) the final
        error at ``η`` = 0.03–0.3 was within 2% of each other and 1–8% below ``η = 1e-2``;
        ``η = 1`` was as good except on a tall layer, 6% worse (the guide, section 16;
        ``python -m benchmarks.guide_tables --table eta``).
    scaled
        Low-Rank-GD in the diagonally scaled coordinates of eq. (7) (the paper's ``is_scaled``,
        default on). Changes the path of gradient descent only, not the exact step.
    init
        Start. ``None``: ``S = 0, M = 0`` (Algorithm 2), with Low-Rank-GD's first call started
        from the diagonal-Hessian minimiser ``D⁻¹ C_r(D (W − S₁))`` (Theorem 4.1, by
        :func:`~matfactor.svd.randomized_svd`) rather than the paper's random factors;
        ``"random"``: the paper's ``U = 0``, ``V`` standard normal (drawn with ``rng``); a
        :class:`SparsePlusLowRank` or :class:`~matfactor.svd.LowRank` (``S = 0``) to continue
        from, e.g. a previous result: it is iterate 0.
    pruner_options
        Keyword options of the pruner: ``damping`` and ``block_size`` for SparseGPT (defaults
        0.01 and 128), ``iters``, ``gradual_iters``, ``damping`` and ``rho`` for ADMM; for a
        callable, anything it accepts.
    rng
        Seed or generator for ``init="random"`` and for the randomized SVD that starts
        Low-Rank-GD by default (``None``: seed 0, so that the default result is reproducible).

    Returns
    -------
    SparsePlusLowRank
        The iterate (the start included) of least true objective ``f`` with the ``H`` given, in
        the compute dtype on the input's device; ``history`` holds ``f / tr(Wᵀ H W)`` of the
        start and of each iteration, ``best_iteration`` the index of the result.

    Raises
    ------
    ValueError
        Bad shapes, NaN/Inf, a rank out of range, a density or pattern that does not fit,
        ``tr(Wᵀ H W) = 0``, an unknown ``pruner``, ``lowrank`` or ``hessian``.

    Notes
    -----
    Cost per iteration: one pruner call with its factorization reused (SparseGPT: about one
    ``d_in² d_out`` sweep; ADMM: ``iters + 1`` GEMMs), the low-rank step (GD: one
    ``d_in² d_out`` GEMM, then ``T_LR`` steps of ``O(d_in² r + d_in d_out r)``; exact: two
    GEMMs and an SVD of ``(d_in, d_out)``), and the true objective: from the GD step's own
    products with the full Hessian, else one more GEMM. Once: the pruner's factorization
    (SparseGPT, ADMM: an inverse of ``H``) and, for the exact step, an eigendecomposition of
    ``H``. Measured (2-core CPU, 1024 x 1024, 2:4 plus rank 16): 13 GEMMs per default
    iteration, about one standalone SparseGPT call (guide, section 16).
    """
    declared = contract(sparse_plus_lowrank)
    hessian = declared.validate(hessian=hessian)["hessian"]
    if H is None and hessian != "identity":
        raise check.ArgumentTypeError(f"H (the calibration Gram matrix XᵀX) is required with "
                        f"hessian='{hessian}'; only hessian='identity' is data free")
    # The alternation is exactly homogeneous under powers of two (H by even ones): it solves
    # at unit magnitude, and S and U get the scale of W back.
    xp, device, W, H, w_exponent = check.layer_problem(W, H, needs_H=False,
                                                       require_live=hessian != "identity")
    dtype = W.dtype
    d_in, d_out = W.shape
    rank, pattern, density = declared.validate({"shape": (d_in, d_out)}, rank=rank,
                                               pattern=pattern, density=density).values()
    if nnz_budget((d_in, d_out), density, pattern) == 0:
        raise ValueError(f"density={density} keeps no entry of a {(d_in, d_out)} weight under "
                         f"pattern '{pattern}'; increase density")
    pruner, pruner_options = _pruner(_DEFAULT_PRUNER[hessian] if pruner is None else pruner,
                                           pruner_options)
    lowrank, iters, lowrank_iters, lr, scaled, rng = declared.validate(
        lowrank=lowrank, iters=iters, lowrank_iters=lowrank_iters, lr=lr, scaled=scaled,
        rng=rng).values()
    lowrank = _DEFAULT_LOWRANK[hessian] if lowrank is None else lowrank

    start = _initial_point(xp, init, W, rank, w_exponent)
    reference = float(_weighted_sq_norm(xp, W, H))
    if reference == 0.0:
        raise ValueError("W has zero norm under H (tr(WᵀHW) = 0): there is nothing to approximate")

    if hessian == "full":
        H_method = H
    elif hessian == "diagonal":
        H_method = xp.eye(d_in, dtype=dtype, device=device) * xp.linalg.diagonal(H)[None, :]
    else:
        H_method = xp.eye(d_in, dtype=dtype, device=device)

    prune = _sparse_step(xp, pruner, H_method, density, pattern, pruner_options)
    coordinates = _lowrank_coordinates(xp, W, H_method, hessian, lowrank, scaled)

    def relative_objective(S: Any, U: Any, V: Any) -> float:
        return float(_weighted_sq_norm(xp, W - S - U @ V.T, H)) / reference

    def relative_objective_gd(T: Any, HT: Any, U_n: Any, V_n: Any) -> float:
        # f in scaled coordinates from the product H_n T that Low-Rank-GD has already formed,
        # with thin GEMMs only: f = ⟨Δ, H_n Δ⟩, Δ = T − U Vᵀ, H_n Δ = H_n T − (H_n U) Vᵀ. As
        # accurate as forming H_n Δ (the expanded form of Low-Rank-GD's own objective loses
        # eps · ⟨T, H_n T⟩, too much in float32 when the low-rank part removes most of T).
        residual = T - U_n @ V_n.T
        return float(xp.sum(residual * (HT - (coordinates.H_n @ U_n) @ V_n.T))) / coordinates.reference

    if start is None:
        S = xp.zeros_like(W)
        U = xp.zeros((d_in, rank), dtype=dtype, device=device)
        V = (random_normal(xp, (d_out, rank), dtype=dtype, device=device, rng=rng)
             if init == "random" else xp.zeros((d_out, rank), dtype=dtype, device=device))
        history = [1.0]
    else:
        S, U, V = start
        history = [relative_objective(S, U, V)]
    best, best_iteration = (S, U, V), 0
    # Low-Rank-GD's factors live in scaled coordinates between iterations (the warm start).
    U_n, V_n = _balance_columns(xp, coordinates.to_scaled(xp, U), V)
    cold_gd_start = start is None and init is None

    for t in range(1, iters + 1):
        S = prune(W - U @ V.T)
        T = coordinates.to_scaled(xp, W - S)
        if lowrank == "exact":
            U_n, V_n = _whitened_lowrank(xp, T, coordinates.whitening, rank)
        else:
            if t == 1 and cold_gd_start:
                # The diagonal-Hessian minimiser (Theorem 4.1) in scaled coordinates, by the
                # randomized SVD: a start needs no full SVD (which costs ~25 GEMMs at 1024²).
                U_n, V_n = _balance_columns(xp, *_randomized_svd(
                    xp, device, T, rank, 10, _default_power_iters(rank, tuple(T.shape)),
                    0 if rng is None else rng))
            HT = coordinates.H_n @ T
            residual_norm = xp.sum(T * HT)
            if float(residual_norm) > 0:
                U_n, V_n, _ = _adam_lowrank(xp, coordinates.H_n, HT, residual_norm, U_n, V_n,
                                           iters=lowrank_iters,
                                           lr=hassle_free_learning_rate(t, lr), check_every=10)
            else:  # S reproduces W on the live inputs: M = 0 is exact
                U_n = xp.zeros_like(U_n)
        U, V = coordinates.to_user(xp, U_n), V_n
        # With the full Hessian and Low-Rank-GD, the true objective comes without a new GEMM.
        history.append(relative_objective_gd(T, HT, U_n, V_n)
                       if hessian == "full" and lowrank == "gd" else relative_objective(S, U, V))
        if history[-1] < history[best_iteration]:
            best, best_iteration = (S, U, V), t
    S, U, V = best
    return SparsePlusLowRank(check.times_power_of_two(xp, S, w_exponent),
                             check.times_power_of_two(xp, U, w_exponent), V, tuple(history),
                             best_iteration)


# --------------------------------------------------------------------------- memory model


def _pruner_memory(pruner: str, problem: _memory.Problem) -> tuple[int, int]:
    """``(persistent, peak)`` of one ``_sparse_step`` of a built-in pruner, beyond the target it
    is given: the factor it keeps of ``H``, and its peak."""
    M, Hh, mn, s = problem.M, problem.Hh, problem.mn, problem.itemsize
    if pruner in ("magnitude", "wanda"):
        # scores (|W|, or |W|·norms), top-k, then zeros_like and the where
        return 0, max(M + _memory.top_k_bytes(mn, s), 3 * M + mn)
    if pruner == "sparsegpt":
        # the (d_in, d_in) factor U; the sweep: where(dead, zeros, W) and its zeros, the
        # first block's  U[...].T @ errors  and the difference, then the concatenated rows
        return Hh, 4 * M
    # ADMM: H_n and (H_n + ρI)⁻¹ kept; the loop (_admm_prune_with_factor) without W scaled
    return 2 * Hh, 10 * M + _memory.top_k_bytes(mn, s) + 2 * mn + (M + mn if problem.nm else 0)


@_memory.counts(sparse_plus_lowrank)
def _sparse_plus_lowrank_memory(problem: _memory.Problem) -> _memory.SolveMemory:
    """Sparse plus low rank, every variant (``hessian``, ``pruner``, ``lowrank``); a callable
    pruner is bounded by the largest built-in one, ADMM's."""
    d_in, d_out, r, s, options = problem.d_in, problem.d_out, problem.rank, problem.itemsize, problem.options
    M, Hh = problem.M, problem.Hh
    hessian = options.get("hessian", "full")
    pruner = options.get("pruner") or _DEFAULT_PRUNER.get(hessian, "sparsegpt")
    lowrank = options.get("lowrank") or _DEFAULT_LOWRANK.get(hessian, "gd")
    if not isinstance(pruner, str) or pruner not in _PRUNERS:
        pruner = "admm"
    factor, prune = _pruner_memory(pruner, problem)
    # W and H scaled; H_method (the diagonal or the identity as a matrix, else H itself); the
    # pruner's factor of H_method; the low-rank coordinates' H_n; Q of the exact full step
    persistent = M + Hh + (Hh if hessian != "full" else 0) + factor + Hh
    exact_full = lowrank == "exact" and hessian == "full"
    persistent += Hh if exact_full else 0
    # setup, beside W and H scaled: the reference tr(WᵀHW) (H W and the product), H_method
    # (eye and the product), the pruner's factor of it (sparsegpt: eye, eye·λ, the sum, then
    # H + λI, the inverse and its factor; admm: H/D/D twice, eye, eye·λ, the sum, the inverse),
    # and for the exact step with the full H, eigh(H_n) beside H_n
    method_hessian = Hh if hessian != "full" else 0
    factor_setup = {"sparsegpt": 3 * Hh, "admm": 5 * Hh}.get(pruner, 0)
    setup = max(3 * Hh, M + Hh + 2 * M, M + Hh + 2 * Hh,
                M + Hh + method_hessian + factor_setup,
                M + Hh + method_hessian + factor + Hh + 2 * M
                + (_memory.eigh_bytes(d_in, s) if exact_full else 0))
    # carried between iterations: the best S, the previous S, T and H_n T, U and V (and their
    # scaled copies, the best ones)
    carry = 4 * M + 8 * (d_in + d_out) * r * s
    if lowrank == "gd":
        # H_n T and T ⊙ H_n T; the objective: residual, (H_n U) Vᵀ, H_n T − that, the product
        step = 3 * M
    else:
        # QᵀT (full), T·√e and the SVD of it; Vh
        step = (M if exact_full else 0) + M + _memory.svd_bytes(d_in, d_out, s) + min(d_in, d_out) * d_out * s
    # W − U Vᵀ (the target, and U Vᵀ); to_scaled: W − S, zeros, the product, the where (4 M)
    loop = persistent + carry + max(M + prune, 2 * M, 4 * M, step)
    return _memory.SolveMemory(max(setup, loop), M + (d_in + d_out) * r * s,
                               _memory.svd_retained(d_in, d_out, s))
