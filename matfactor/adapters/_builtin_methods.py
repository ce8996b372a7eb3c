"""The built-in methods' declarations (see :mod:`matfactor.adapters.methods` for the table).

Imported by the registry the first time it is read; each method is one :class:`Method`: its
solve (a call of the core), its budget, its solvers' parameters and its memory model.
"""

from __future__ import annotations

from typing import Any, Callable

import matfactor

from .memory import solver_work
from .methods import Method, MethodCall, register_method


def _pruner(function: Callable[..., Any]) -> Callable[[MethodCall], Any]:
    def solve(call: MethodCall) -> Any:
        return function(call.W, call.H, density=call.budget.density, pattern=call.budget.pattern,
                        **call.arguments)
    return solve


def _dsf(call: MethodCall) -> Any:
    return matfactor.double_sparse(call.W, call.budget.density, call.H, **call.arguments)


def _lowrank(call: MethodCall) -> Any:
    return matfactor.truncated_svd(call.W, call.budget.rank)


def _weighted_lowrank(call: MethodCall) -> Any:
    return matfactor.weighted_lowrank(call.W, call.H, call.budget.rank, **call.arguments)


def _pifa(call: MethodCall) -> Any:
    arguments = dict(call.arguments)
    rtol = arguments.pop("rtol", None)
    low = matfactor.weighted_lowrank(call.W, call.H, call.budget.rank, **arguments)
    return matfactor.pifa_from_factors(low.U, low.V, rtol=rtol)


def _mpifa(call: MethodCall) -> Any:
    return matfactor.mpifa(call.W, call.statistics, call.budget.rank, **call.arguments)


def _sparse_lowrank(call: MethodCall) -> Any:
    arguments = dict(call.arguments)
    arguments.pop("rank_ratio", None)  # used by the budget split only
    return matfactor.sparse_plus_lowrank(call.W, call.H, call.budget.rank, density=call.budget.density,
                                         pattern=call.budget.pattern, rng=call.seed, **arguments)


def _pruning(name: str, function: Callable[..., Any], summary: str) -> Method:
    """A pruner as a method: density or n:m, its result the pruned weight itself."""
    return Method(name, _pruner(function), "density", solver_work(function, dense=False),
                  solvers=(function,), pattern=True, summary=summary)


for _method in (
    _pruning("magnitude", matfactor.magnitude_prune, "largest |W| (data free)"),
    _pruning("wanda", matfactor.wanda_prune, "largest |W|·‖x‖ (Wanda)"),
    _pruning("sparsegpt", matfactor.sparsegpt_prune, "OBS pruning with updates (SparseGPT)"),
    _pruning("admm", matfactor.admm_prune, "ADMM L0 least squares, gradual masks"),
    Method("dsf", _dsf, "density", solver_work(matfactor.double_sparse), solvers=(matfactor.double_sparse,),
           summary="double sparse factorization W ≈ A B"),
    Method("lowrank", _lowrank, "rank", solver_work(matfactor.truncated_svd), statistics="none",
           rank_for_density=matfactor.lowrank_rank_for_density, summary="truncated SVD (data free)"),
    Method("weighted_lowrank", _weighted_lowrank, "rank", solver_work(matfactor.weighted_lowrank),
           solvers=(matfactor.weighted_lowrank,), rank_for_density=matfactor.lowrank_rank_for_density,
           summary="Hessian-weighted low rank"),
    Method("pifa", _pifa, "rank", solver_work(matfactor.weighted_lowrank, matfactor.pifa_from_factors),
           solvers=(matfactor.weighted_lowrank,), options=("rtol",),
           rank_for_density=matfactor.pifa_rank_for_density, summary="weighted low rank stored as PIFA"),
    Method("mpifa", _mpifa, "rank", solver_work(matfactor.mpifa), solvers=(matfactor.mpifa,),
           statistics="streams", rank_for_density=matfactor.pifa_rank_for_density, takes_mix=True,
           summary="MPIFA online reconstruction, PIFA storage"),
    Method("sparse_lowrank", _sparse_lowrank, "total", solver_work(matfactor.sparse_plus_lowrank),
           solvers=(matfactor.sparse_plus_lowrank,), options=("rank_ratio",), pattern=True,
           summary="sparse plus low rank (HASSLE-free)"),
):
    register_method(_method)
