"""The compression methods a recipe can name, and the solve of one layer problem.

Each method maps a layer's ``(d_in, d_out)`` weight ``W`` and its calibration statistics onto one
call of the core (:mod:`matfactor`), with the budget given as a density (kept fraction of the
dense parameters) or, for the low-rank family, a rank:

==================== =============================================== =====================
method               core call                                       budget
==================== =============================================== =====================
``magnitude``        :func:`matfactor.magnitude_prune`               density or n:m
``wanda``            :func:`matfactor.wanda_prune`                   density or n:m
``sparsegpt``        :func:`matfactor.sparsegpt_prune`               density or n:m
``admm``             :func:`matfactor.admm_prune`                    density or n:m
``dsf``              :func:`matfactor.double_sparse`                 density
``lowrank``          :func:`matfactor.truncated_svd` (data free)     rank or density
``weighted_lowrank`` :func:`matfactor.weighted_lowrank`              rank or density
``pifa``             weighted low rank, then                         rank or density
                     :func:`matfactor.pifa_from_factors`             (PIFA's count)
``mpifa``            :func:`matfactor.mpifa` (two-stream statistics) rank or density
``sparse_lowrank``   :func:`matfactor.sparse_plus_lowrank`           density (+ rank or
                                                                     ``rank_ratio``)
==================== =============================================== =====================

A density budget counts stored values: ``nnz`` for sparse matrices, ``r (d_in + d_out)`` for two
factors and ``r (d_in + d_out − r)`` for PIFA, as each paper does. For ``sparse_lowrank`` the
density is the total of both parts: with an ``n:m`` pattern the low-rank part gets what the
pattern leaves (``sparse_lowrank_rank``, HASSLE-free section 5); unstructured, a share
``rank_ratio`` (default 0.3, OATS's) of the budget goes to the low-rank part
(``sparse_lowrank_budget``, appendix A.3), unless ``rank`` is given.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import matfactor
from matfactor import (
    DoubleSparse,
    LowRank,
    Pivoted,
    ReconstructionStatistics,
    SparsePlusLowRank,
    layer_error,
)

__all__ = ["METHODS", "LayerSolution", "Method", "method_parameters", "solve_layer"]

#: Arguments the pipeline sets from the budget; a recipe gives them as budget fields instead.
_BUDGET_NAMES = frozenset({"W", "H", "statistics", "density", "rank", "pattern", "U", "V", "rng"})


@dataclass(frozen=True)
class Method:
    """A compression method: what it calls, which budget it takes and what it needs."""

    name: str
    solve: Callable[..., Any]
    core: tuple[Callable[..., Any], ...]   # the core functions whose keyword arguments it accepts
    budget: str                            # "density", "rank" (or density) or "total"
    pattern: bool                          # takes a sparsity pattern
    needs_streams: bool = False            # MPIFA's dense and compressed input streams
    extra: tuple[str, ...] = ()            # arguments of its own (not of a core function)

    def accepted(self) -> frozenset[str]:
        """Keyword arguments a recipe may pass to this method."""
        names = set(self.extra)
        for function in self.core:
            names.update(name for name, parameter in inspect.signature(function).parameters.items()
                         if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD))
        return frozenset(names - _BUDGET_NAMES)


def _prune(function: Callable[..., Any]) -> Callable[..., Any]:
    def solve(W: Any, H: Any, statistics: Any, budget: Budget, arguments: dict[str, Any],
              seed: int) -> Any:
        return function(W, H, density=budget.density, pattern=budget.pattern, **arguments)
    return solve


def _dsf(W: Any, H: Any, statistics: Any, budget: Budget, arguments: dict[str, Any], seed: int) -> Any:
    return matfactor.double_sparse(W, budget.density, H, **arguments)


def _lowrank(W: Any, H: Any, statistics: Any, budget: Budget, arguments: dict[str, Any],
             seed: int) -> Any:
    return matfactor.truncated_svd(W, budget.rank)


def _weighted_lowrank(W: Any, H: Any, statistics: Any, budget: Budget, arguments: dict[str, Any],
                      seed: int) -> Any:
    return matfactor.weighted_lowrank(W, H, budget.rank, **arguments)


def _pifa(W: Any, H: Any, statistics: Any, budget: Budget, arguments: dict[str, Any], seed: int) -> Any:
    rtol = arguments.pop("rtol", None)
    low = matfactor.weighted_lowrank(W, H, budget.rank, **arguments)
    return matfactor.pifa_from_factors(low.U, low.V, rtol=rtol)


def _mpifa(W: Any, H: Any, statistics: Any, budget: Budget, arguments: dict[str, Any], seed: int) -> Any:
    return matfactor.mpifa(W, statistics, budget.rank, **arguments)


def _sparse_lowrank(W: Any, H: Any, statistics: Any, budget: Budget, arguments: dict[str, Any],
                    seed: int) -> Any:
    arguments.pop("rank_ratio", None)
    return matfactor.sparse_plus_lowrank(W, H, budget.rank, density=budget.density,
                                         pattern=budget.pattern, rng=seed, **arguments)


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", _prune(matfactor.magnitude_prune), (matfactor.magnitude_prune,),
                        "density", True),
    "wanda": Method("wanda", _prune(matfactor.wanda_prune), (matfactor.wanda_prune,), "density", True),
    "sparsegpt": Method("sparsegpt", _prune(matfactor.sparsegpt_prune), (matfactor.sparsegpt_prune,),
                        "density", True),
    "admm": Method("admm", _prune(matfactor.admm_prune), (matfactor.admm_prune,), "density", True),
    "dsf": Method("dsf", _dsf, (matfactor.double_sparse,), "density", False),
    "lowrank": Method("lowrank", _lowrank, (), "rank", False),
    "weighted_lowrank": Method("weighted_lowrank", _weighted_lowrank, (matfactor.weighted_lowrank,),
                               "rank", False),
    "pifa": Method("pifa", _pifa, (matfactor.weighted_lowrank,), "rank", False, extra=("rtol",)),
    "mpifa": Method("mpifa", _mpifa, (matfactor.mpifa,), "rank", False, needs_streams=True),
    "sparse_lowrank": Method("sparse_lowrank", _sparse_lowrank, (matfactor.sparse_plus_lowrank,),
                             "total", True, extra=("rank_ratio",)),
}


def method_parameters(name: str) -> frozenset[str]:
    """The keyword arguments method ``name`` accepts from a recipe."""
    return METHODS[name].accepted()


@dataclass(frozen=True)
class Budget:
    """The resolved budget of one layer: what the core call receives."""

    density: float | None
    rank: int | None
    pattern: str


def resolve_budget(method: Method, shape: tuple[int, int], *, density: float | None,
                   rank: int | None, pattern: str, arguments: dict[str, Any], name: str) -> Budget:
    """Turn a rule's density/rank into the arguments of the core call for a ``shape`` layer."""
    d_in, d_out = shape
    if method.budget == "density":
        return Budget(density, None, pattern)
    if method.budget == "rank":
        if rank is None:
            to_rank = (matfactor.pifa_rank_for_density if method.name in ("pifa", "mpifa")
                       else matfactor.lowrank_rank_for_density)
            rank = to_rank(shape, density)
            if rank < 1:
                raise ValueError(f"{name}: density={density} leaves no rank for a {shape} layer "
                                 f"with {method.name}; increase density")
        return Budget(None, min(rank, d_in, d_out), pattern)
    # sparse plus low rank: the density is the total budget of both parts
    compression = 1.0 - density
    if ":" in pattern:
        if rank is None:
            rank = matfactor.sparse_lowrank_rank(shape, compression, pattern=pattern)
        sparse_density = None
    elif rank is None:
        split = matfactor.sparse_lowrank_budget(shape, compression, arguments.get("rank_ratio", 0.3))
        rank, sparse_density = split.rank, split.density
    else:
        left = math.floor(density * d_in * d_out) - rank * (d_in + d_out)
        if left < 1:
            raise ValueError(f"{name}: rank {rank} alone takes {rank * (d_in + d_out)} values of the "
                             f"{math.floor(density * d_in * d_out)} that density={density} allows "
                             f"a {shape} layer; lower the rank or raise the density")
        sparse_density = (left + 0.5) / (d_in * d_out)
    if rank < 1:
        raise ValueError(f"{name}: density={density} with pattern {pattern!r} leaves no rank for the "
                         f"low-rank part of a {shape} layer; raise the density or pass a rank")
    return Budget(sparse_density, rank, pattern)


def reduce_by_value(instance: Any) -> tuple[Any, ...]:
    """``__reduce__`` of a dataclass shipped between processes: its fields pickled by value.

    multiprocessing's pickler, as torch sets it up, sends a tensor as a file descriptor that a
    thread of the sending process serves on request, from a socket in a ``/tmp/pymp-*``
    directory. A process ended abruptly (a pool worker at Ctrl-C or when its parent is killed)
    then leaves that directory behind, and the other side's serving thread prints an
    ``EOFError`` traceback. The tensors of a layer solve are copied between the processes
    either way.
    """
    fields = {item.name: getattr(instance, item.name) for item in dataclasses.fields(instance)}
    return _from_bytes, (type(instance), pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL))


def _from_bytes(cls: type, payload: bytes) -> Any:
    return cls(**pickle.loads(payload))


@dataclass
class LayerSolution:
    """The compressed form of one layer and what it cost."""

    result: Any                      # a matrix (pruners) or a matfactor result type
    rel_error: float                 # tr(DᵀHD) / tr(WᵀHW) under the layer's calibration H
    params_after: int
    seconds: float
    budget: Budget = field(repr=False)

    __reduce__ = reduce_by_value

    def dense(self) -> Any:
        """The ``(d_in, d_out)`` matrix the compressed layer computes with."""
        if isinstance(self.result, (LowRank, Pivoted, DoubleSparse, SparsePlusLowRank)):
            return self.result.dense()
        return self.result


def _params(result: Any) -> int:
    if isinstance(result, (LowRank, Pivoted, DoubleSparse, SparsePlusLowRank)):
        return int(result.n_params)
    return int(torch.count_nonzero(result))


def solve_layer(name: str, W: torch.Tensor, H: torch.Tensor | None,
                statistics: ReconstructionStatistics | None, method: str, *,
                density: float | None, rank: int | None, pattern: str,
                arguments: dict[str, Any], seed: int = 0) -> LayerSolution:
    """Compress one layer problem ``(W, H)`` with ``method`` under its budget.

    Parameters
    ----------
    name
        The layer's name, for error messages.
    W
        ``(d_in, d_out)`` weight in float32 or float64.
    H
        ``(d_in, d_in)`` Gram matrix of the calibration inputs.
    statistics
        Two-stream statistics (MPIFA only), else ``None``.
    method, density, rank, pattern, arguments
        The recipe rule that applies to the layer (validated by the recipe).
    seed
        Seed of the methods that draw random numbers.

    Returns
    -------
    LayerSolution
    """
    spec = METHODS[method]
    budget = resolve_budget(spec, tuple(W.shape), density=density, rank=rank, pattern=pattern,
                            arguments=arguments, name=name)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            result = spec.solve(W, H, statistics, budget, dict(arguments), seed)
    except ValueError as exc:  # name the layer: the core names only its own arguments
        raise ValueError(f"{name} ({method}, W {tuple(W.shape)}): {exc}") from exc
    seconds = time.perf_counter() - start
    solution = LayerSolution(result, 0.0, _params(result), seconds, budget)
    solution.rel_error = float(layer_error(W, solution.dense(), H))
    return solution
