"""PIFA layer speed against the dense layer and the two-factor low-rank layer.

At the same density, the PIFA layer does ``r (d_in + d_out − r)`` multiply-adds per sample
against ``d_in · d_out`` for the dense layer (PIFA paper, section 3.3); at the same rank the
two-factor layer ``(X @ U) @ Vᵀ`` does ``r (d_in + d_out)``. The targets: a speed-up
over dense within 80% of that FLOP ratio (``track_flop_ratio_attained >= 0.8``), and faster
than the two-factor layer at the same rank (``track_speedup_over_lowrank > 1``).
"""

from __future__ import annotations

import numpy as np

from matfactor.pifa import Pivoted, pifa_from_factors, pifa_rank_for_density
from matfactor.svd import LowRank

from .common import BENCH_BACKENDS, BackendBenchmark, median_seconds

BATCH = 4096
SIZES = [1024, 2048, 4096]
DENSITIES = [0.5, 0.55]

_LAYERS: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}


def _numpy_layer(d: int, rank: int) -> tuple[np.ndarray, ...]:
    """A square rank-``rank`` layer as float32 NumPy arrays: ``(W, U, V, pivots, non_pivots,
    W_p, C)``, built once per process (PIFA on NumPy is LAPACK's, the fastest here)."""
    key = (d, rank)
    if key not in _LAYERS:
        rng = np.random.default_rng(d + rank)
        U = (rng.standard_normal((d, rank)) / np.sqrt(d)).astype(np.float32)
        V = rng.standard_normal((d, rank)).astype(np.float32)
        layer = pifa_from_factors(U, V)
        _LAYERS[key] = (U @ V.T, U, V, layer.pivots, layer.non_pivots, layer.W_p, layer.C)
    return _LAYERS[key]


class PifaLayerSpeed(BackendBenchmark):
    """``Pivoted.matmul`` (Algorithm 1) vs ``X @ W`` vs ``(X @ U) @ Vᵀ`` at the same rank.

    Square ``d x d`` float32 weights, a batch of 4096 inputs, the largest PIFA rank within the
    density that is a multiple of 8 (``pifa_rank_for_density(..., multiple_of=8)``: odd GEMM
    widths run up to 30% slower on CPU BLAS, for both layers). The ``track_*`` ratios are
    measured in one process with :func:`benchmarks.common.median_seconds`.
    """

    params = (BENCH_BACKENDS[:3], SIZES, DENSITIES)
    param_names = ["backend", "d", "density"]
    timeout = 1800

    def setup(self, backend_name, d, density):
        self.setup_backend(backend_name)
        backend = self.backend
        self.rank = pifa_rank_for_density((d, d), density, multiple_of=8)
        W, U, V, pivots, non_pivots, W_p, C = _numpy_layer(d, self.rank)
        self.W = backend.asarray(W)
        self.lowrank = LowRank(backend.asarray(U), backend.asarray(V))
        self.layer = Pivoted(backend.asarray(pivots), backend.asarray(non_pivots),
                             backend.asarray(W_p), backend.asarray(C))
        rng = np.random.default_rng(0)
        self.X = backend.asarray(rng.standard_normal((BATCH, d), dtype=np.float32))
        self.flop_ratio = d * d / (self.rank * (2 * d - self.rank))
        # Fewer repetitions where one dense product takes seconds on a CPU.
        self.repeats = {1024: 7, 2048: 3, 4096: 1}[d]

    def time_pifa(self, backend_name, d, density):
        self.layer.matmul(self.X)
        self.sync()

    def time_dense(self, backend_name, d, density):
        self.X @ self.W
        self.sync()

    def time_lowrank(self, backend_name, d, density):
        self.lowrank.matmul(self.X)
        self.sync()

    def _seconds(self, which: str) -> float:
        run = {"pifa": lambda: self.layer.matmul(self.X), "dense": lambda: self.X @ self.W,
               "lowrank": lambda: self.lowrank.matmul(self.X)}[which]
        return median_seconds(run, self.sync, self.repeats)

    def track_speedup_over_dense(self, backend_name, d, density):
        return self._seconds("dense") / self._seconds("pifa")

    track_speedup_over_dense.unit = "x"

    def track_flop_ratio_attained(self, backend_name, d, density):
        """Measured speed-up over dense / FLOP ratio ``d² / (r (2d − r))``; target >= 0.8."""
        return self._seconds("dense") / self._seconds("pifa") / self.flop_ratio

    track_flop_ratio_attained.unit = "fraction"

    def track_speedup_over_lowrank(self, backend_name, d, density):
        return self._seconds("lowrank") / self._seconds("pifa")

    track_speedup_over_lowrank.unit = "x"


class PifaConstruction(BackendBenchmark):
    """``pifa_from_factors`` at density 0.5: thin QR of ``U``, pivoted QR of the ``(r, d)``
    matrix ``R_U Vᵀ`` (LAPACK on the CPU, the generic on-device path on CUDA), one triangular
    solve, one ``(d, r) x (r, r)`` product."""

    params = (BENCH_BACKENDS[:3], [1024, 4096])
    param_names = ["backend", "d"]
    timeout = 1800

    def setup(self, backend_name, d):
        self.setup_backend(backend_name)
        self.rank = pifa_rank_for_density((d, d), 0.5)
        _, U, V, *_ = _numpy_layer(d, self.rank)
        self.U, self.V = self.backend.asarray(U), self.backend.asarray(V)

    def time_pifa_from_factors(self, backend_name, d):
        pifa_from_factors(self.U, self.V)
        self.sync()
