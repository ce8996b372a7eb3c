"""Compressed torch modules: forward time and parameter memory of each form against nn.Linear.

Square ``d x d`` float32 layers with a bias, every compressed form at density 0.5 (its stored
values within half the dense count), a batch of 128 tokens, under ``torch.no_grad``. The weights
are random (timing does not depend on their values) with exactly the solvers' structure: a random
unstructured mask of ``floor(0.5·d²)`` entries for the pruned layer; for DSF, random masks with
:func:`matfactor.dsf_budget_split`'s default nonzero counts in the ``(d, d)`` factors; the rank
that fits the budget for low rank (:func:`matfactor.lowrank_rank_for_density`, ``d/4``) and for
PIFA (:func:`matfactor.pifa_rank_for_density`, a multiple of 8); OATS's default split for sparse
plus low rank (:func:`matfactor.sparse_lowrank_budget`, 30% of the kept values in the low-rank
part).

``track_param_bytes_ratio`` is the bytes the module holds in memory (parameters and buffers:
a sparse part's kept values and its one-byte mask) over those of the dense layer; checkpoints
pack the masks to bits (:mod:`matfactor.adapters.checkpoint`). ``track_speedup_over_dense`` is measured in one process
with :func:`benchmarks.common.median_seconds`.

Measured (shared 2-core CPU, one thread, forward time relative to dense at d = 1024 / 4096):
sparse 1.0 / 0.9, double sparse 2.1 / 2.0 (two dense ``d x d`` GEMMs), low rank 0.49 / 0.41,
PIFA 0.53 / 0.51 (the same FLOPs as low rank at this density, plus the gather, for a rank of
296 / 1192 instead of 256 / 1024), sparse plus low rank 1.2 / 1.2. Memory held relative to
dense, sparse parts held dense with their zeros then: sparse 1.0, double sparse 2.0, low rank
and PIFA 0.50, sparse plus low rank 1.15; held as kept values and masks (now): sparse 0.75,
double sparse 1.0, sparse plus low rank 0.75 (the times not re-measured since).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from matfactor import (
    dsf_budget_split,
    lowrank_rank_for_density,
    pifa_from_factors,
    pifa_rank_for_density,
    sparse_lowrank_budget,
)
from matfactor.adapters.modules import (
    DoubleSparseLinear,
    LowRankLinear,
    PifaLinear,
    SparseLinear,
    SparseLowRankLinear,
)

from .common import BENCH_BACKENDS, BackendBenchmark, median_seconds

FORMS = ["dense", "sparse", "double_sparse", "lowrank", "pifa", "sparse_lowrank"]
SIZES = [1024, 4096]
TOKENS = 128
DENSITY = 0.5


def _masked(shape: tuple[int, int], nnz: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``shape`` matrix with exactly ``nnz`` nonzeros at random positions."""
    values = torch.randn(shape, generator=generator) / math.sqrt(shape[0])
    keep = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    keep[torch.randperm(keep.numel(), generator=generator)[:nnz]] = True
    return values * keep.reshape(shape)


def build_module(form: str, d: int, device: torch.device) -> nn.Module:
    """The ``d x d`` layer of ``form`` at density 0.5, float32, with a bias, on ``device``."""
    generator = torch.Generator().manual_seed(d)
    bias = torch.randn(d, generator=generator)

    def factors(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn((d, rank), generator=generator) / math.sqrt(d),
                torch.randn((d, rank), generator=generator))

    if form == "dense":
        module = nn.Linear(d, d)
    elif form == "sparse":
        module = SparseLinear(_masked((d, d), math.floor(DENSITY * d * d), generator), bias,
                              pattern="unstructured", density=DENSITY)
    elif form == "double_sparse":
        nnz_A, nnz_B = dsf_budget_split((d, d), DENSITY)  # square layer: A is the square factor
        module = DoubleSparseLinear(_masked((d, d), nnz_A, generator),
                                    _masked((d, d), nnz_B, generator), bias, density=DENSITY)
    elif form == "lowrank":
        module = LowRankLinear(*factors(lowrank_rank_for_density((d, d), DENSITY)), bias)
    elif form == "pifa":
        layer = pifa_from_factors(*factors(pifa_rank_for_density((d, d), DENSITY, multiple_of=8)))
        module = PifaLinear(layer.pivots, layer.non_pivots, layer.W_p, layer.C, bias)
    else:
        budget = sparse_lowrank_budget((d, d), 1 - DENSITY, 0.3)
        module = SparseLowRankLinear(_masked((d, d), budget.nnz, generator),
                                     *factors(budget.rank), bias, pattern="unstructured",
                                     density=budget.density)
    return module.to(device).eval()


class ModuleForward(BackendBenchmark):
    """Forward pass of each module form against ``nn.Linear`` at density 0.5 (see the module
    docstring); PyTorch on the CPU and on CUDA."""

    params = (BENCH_BACKENDS[1:3], SIZES, FORMS)
    param_names = ["backend", "d", "form"]
    timeout = 1800

    def setup(self, backend_name, d, form):
        self.setup_backend(backend_name)
        self.module = build_module(form, d, self.backend.device)
        self.dense = build_module("dense", d, self.backend.device)
        rng = np.random.default_rng(0)
        self.X = self.backend.asarray(rng.standard_normal((TOKENS, d), dtype=np.float32))
        # Fewer repetitions where one dense product takes a while on a CPU.
        self.repeats = {1024: 25, 4096: 7}[d]

    def _forward(self, module: nn.Module) -> None:
        with torch.no_grad():
            module(self.X)

    def time_forward(self, backend_name, d, form):
        self._forward(self.module)
        self.sync()

    def track_speedup_over_dense(self, backend_name, d, form):
        dense = median_seconds(lambda: self._forward(self.dense), self.sync, self.repeats)
        module = median_seconds(lambda: self._forward(self.module), self.sync, self.repeats)
        return dense / module

    track_speedup_over_dense.unit = "x"

    def track_param_bytes_ratio(self, backend_name, d, form):
        def held(module: nn.Module) -> int:
            return sum(t.nbytes for t in list(module.parameters()) + list(module.buffers()))

        return held(self.module) / held(self.dense)

    track_param_bytes_ratio.unit = "fraction"
