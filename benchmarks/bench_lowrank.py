"""Low rank: randomized against full SVD, and the Hessian-weighted solvers.

- ``RandomizedSvdSpeed`` / ``FullSvdSpeed``: time of each at transformer sizes, float32, ranks
  ``d/8`` and ``d/16`` (``d = min(d_in, d_out)``);
- ``SvdSpeedup.track_speedup_over_full_svd``: time(full) / time(randomized), both measured in one
  process (absolute times on shared machines are not comparable between runs; this ratio is);
- ``RandomizedSvdQuality.track_rel_error_over_optimum``: Frobenius error of the randomized SVD
  at its defaults over the Eckart–Young optimum (1 is optimal; a few percent above at most);
- ``WeightedLowRankQuality``: Low-Rank-GD (HASSLE-free Algorithm 1) against the exact
  whitening solution of the same objective (ratio >= 1; how close the paper's first-order
  method gets), and the gain of the data-aware solution over the plain truncated SVD;
- ``WeightedLowRankSpeed``: time of both.
"""

from __future__ import annotations

import numpy as np

from matfactor.lowrank_descent import lowrank_gd
from matfactor.svd import randomized_svd, truncated_svd, weighted_lowrank
from matfactor.testing import realistic_layer

from .common import BENCH_BACKENDS, BackendBenchmark, cached_layer, median_seconds

SHAPES = ["1024x1024", "4096x4096", "4096x11008"]
DIVISORS = [8, 16]
# A full SVD this large takes minutes on a CPU (about 130 s for 4096x11008 with one NumPy
# thread): skipped there, run on GPUs.
_TOO_BIG_FOR_CPU_FULL_SVD = {"4096x11008"}


def parse_shape(shape: str) -> tuple[int, int]:
    d_in, d_out = shape.split("x")
    return int(d_in), int(d_out)


_WEIGHTS: dict[tuple[int, int], np.ndarray] = {}


def cached_weight(d_in: int, d_out: int) -> np.ndarray:
    """A realistic weight alone (its calibration set is not needed for the plain SVDs)."""
    if (d_in, d_out) not in _WEIGHTS:
        _WEIGHTS[(d_in, d_out)] = realistic_layer(d_in, d_out, n_samples=2, seed=0).W
    return _WEIGHTS[(d_in, d_out)]


class _SvdBenchmark(BackendBenchmark):
    params = (BENCH_BACKENDS, SHAPES, DIVISORS)
    param_names = ["backend", "shape", "rank_divisor"]
    timeout = 1800
    number = 1
    warmup_time = 0

    def setup(self, backend_name, shape, divisor):
        self.setup_backend(backend_name)
        d_in, d_out = parse_shape(shape)
        self.W = self.backend.asarray(cached_weight(d_in, d_out), "float32")
        self.rank = min(d_in, d_out) // divisor

    def skip_full_svd_on_cpu(self, shape):
        if shape in _TOO_BIG_FOR_CPU_FULL_SVD and self.backend.name in ("numpy", "torch-cpu"):
            raise NotImplementedError(f"a full SVD of {shape} takes minutes on a CPU")


class RandomizedSvdSpeed(_SvdBenchmark):
    """randomized_svd at its defaults (oversampling 10, automatic power iterations)."""

    def time_randomized_svd(self, backend_name, shape, divisor):
        randomized_svd(self.W, self.rank, rng=0)
        self.sync()

    def peakmem_randomized_svd(self, backend_name, shape, divisor):
        randomized_svd(self.W, self.rank, rng=0)


class FullSvdSpeed(_SvdBenchmark):
    """truncated_svd: a full SVD whatever the rank (one rank divisor suffices)."""

    params = (BENCH_BACKENDS, SHAPES)
    param_names = ["backend", "shape"]
    repeat = (1, 3, 60.0)

    def setup(self, backend_name, shape):
        super().setup(backend_name, shape, 8)
        self.skip_full_svd_on_cpu(shape)

    def time_truncated_svd(self, backend_name, shape):
        truncated_svd(self.W, self.rank)
        self.sync()


class SvdSpeedup(_SvdBenchmark):
    """time(truncated_svd) / time(randomized_svd), in one process (higher is better)."""

    rounds = 1

    def setup(self, backend_name, shape, divisor):
        super().setup(backend_name, shape, divisor)
        self.skip_full_svd_on_cpu(shape)

    def track_speedup_over_full_svd(self, backend_name, shape, divisor):
        randomized = median_seconds(lambda: randomized_svd(self.W, self.rank, rng=0), self.sync,
                                    repeats=3)
        full = median_seconds(lambda: truncated_svd(self.W, self.rank), self.sync, repeats=1)
        return full / randomized

    track_speedup_over_full_svd.unit = "x"


class RandomizedSvdQuality(_SvdBenchmark):
    """‖W − Ŵ_randomized‖_F / ‖W − C_r(W)‖_F at the defaults (1 = optimal)."""

    rounds = 1

    def setup(self, backend_name, shape, divisor):
        super().setup(backend_name, shape, divisor)
        W = cached_weight(*parse_shape(shape)).astype(np.float32)
        singular_values = np.linalg.svd(W, compute_uv=False).astype(np.float64)
        self.optimum = float(np.sqrt(np.sum(singular_values[self.rank:] ** 2)))
        self.W_host = W.astype(np.float64)

    def track_rel_error_over_optimum(self, backend_name, shape, divisor):
        result = randomized_svd(self.W, self.rank, rng=0)
        U = self.backend.to_numpy(result.U).astype(np.float64)
        V = self.backend.to_numpy(result.V).astype(np.float64)
        return float(np.linalg.norm(self.W_host - U @ V.T)) / self.optimum

    track_rel_error_over_optimum.unit = "ratio"


class WeightedLowRankQuality(BackendBenchmark):
    """Low-Rank-GD against the exact weighted minimiser on a realistic 512x1024 layer.

    ``track_gd_over_exact``: layer error of lowrank_gd / that of weighted_lowrank (>= 1; the
    exact one is the global minimum).
    """

    params = (["numpy"], [32, 128], [50, 200, 1000], [True, False])
    param_names = ["backend", "rank", "iters", "scaled"]
    rounds = 1

    def setup(self, backend_name, rank, iters, scaled):
        self.setup_backend(backend_name)
        problem = cached_layer(512, 1024, seed=1)
        self.W, self.H = self.problem_on_backend(problem)
        self.exact = weighted_lowrank(self.W, self.H, rank).rel_error(self.W, self.H)

    def track_gd_over_exact(self, backend_name, rank, iters, scaled):
        result = lowrank_gd(self.W, self.H, rank, iters=iters, scaled=scaled)
        return result.rel_error(self.W, self.H) / self.exact

    track_gd_over_exact.unit = "ratio"


class DataAwareGain(BackendBenchmark):
    """Layer error of the data-free truncated SVD / that of weighted_lowrank: what H buys."""

    params = (["numpy"], [32, 128])
    param_names = ["backend", "rank"]
    rounds = 1

    def setup(self, backend_name, rank):
        self.setup_backend(backend_name)
        self.W, self.H = self.problem_on_backend(cached_layer(512, 1024, seed=1))

    def track_svd_over_exact(self, backend_name, rank):
        exact = weighted_lowrank(self.W, self.H, rank).rel_error(self.W, self.H)
        return truncated_svd(self.W, rank).rel_error(self.W, self.H) / exact

    track_svd_over_exact.unit = "ratio"


class WeightedLowRankSpeed(BackendBenchmark):
    """weighted_lowrank (eigh + SVD) and lowrank_gd (200 Adam steps) at rank d/8, float32."""

    params = (BENCH_BACKENDS, SHAPES[:2])
    param_names = ["backend", "shape"]
    timeout = 1800
    number = 1
    warmup_time = 0

    def setup(self, backend_name, shape):
        self.setup_backend(backend_name)
        d_in, d_out = parse_shape(shape)
        self.W, self.H = self.problem_on_backend(cached_layer(d_in, d_out))
        self.rank = min(d_in, d_out) // 8

    def time_weighted_lowrank(self, backend_name, shape):
        weighted_lowrank(self.W, self.H, self.rank)
        self.sync()

    def time_lowrank_gd(self, backend_name, shape):
        lowrank_gd(self.W, self.H, self.rank)
        self.sync()
