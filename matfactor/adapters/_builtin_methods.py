"""The built-in methods' declarations (see :mod:`matfactor.adapters.methods` for the table).

Imported by the registry the first time it is read; each method is one :class:`Method`: its
solve (a call of the core), its budget, its solvers' parameters and its memory model.
"""

from __future__ import annotations

from typing import Any, Callable

import matfactor

from . import memory
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


for _method in (
    Method("magnitude", _pruner(matfactor.magnitude_prune), "density", memory.score_pruning_work,
           solvers=(matfactor.magnitude_prune,), pattern=True, summary="largest |W| (data free)"),
    Method("wanda", _pruner(matfactor.wanda_prune), "density", memory.score_pruning_work,
           solvers=(matfactor.wanda_prune,), pattern=True, summary="largest |W|·‖x‖ (Wanda)"),
    Method("sparsegpt", _pruner(matfactor.sparsegpt_prune), "density", memory.sparsegpt_work,
           solvers=(matfactor.sparsegpt_prune,), pattern=True,
           summary="OBS pruning with updates (SparseGPT)"),
    Method("admm", _pruner(matfactor.admm_prune), "density", memory.admm_work,
           solvers=(matfactor.admm_prune,), pattern=True,
           summary="ADMM L0 least squares, gradual masks"),
    Method("dsf", _dsf, "density", memory.dsf_work, solvers=(matfactor.double_sparse,),
           summary="double sparse factorization W ≈ A B"),
    Method("lowrank", _lowrank, "rank", memory.lowrank_work, statistics="none",
           rank_for_density=matfactor.lowrank_rank_for_density, summary="truncated SVD (data free)"),
    Method("weighted_lowrank", _weighted_lowrank, "rank", memory.weighted_lowrank_work,
           solvers=(matfactor.weighted_lowrank,), rank_for_density=matfactor.lowrank_rank_for_density,
           summary="Hessian-weighted low rank"),
    Method("pifa", _pifa, "rank", memory.pifa_work, solvers=(matfactor.weighted_lowrank,),
           options=("rtol",), rank_for_density=matfactor.pifa_rank_for_density,
           summary="weighted low rank stored as PIFA"),
    Method("mpifa", _mpifa, "rank", memory.mpifa_work, solvers=(matfactor.mpifa,), statistics="streams",
           rank_for_density=matfactor.pifa_rank_for_density, takes_mix=True,
           summary="MPIFA online reconstruction, PIFA storage"),
    Method("sparse_lowrank", _sparse_lowrank, "total", memory.sparse_lowrank_work,
           solvers=(matfactor.sparse_plus_lowrank,), options=("rank_ratio",), pattern=True,
           summary="sparse plus low rank (HASSLE-free)"),
):
    register_method(_method)
