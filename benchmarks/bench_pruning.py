"""Pruning: ADMM speed against one GEMM, and the quality of every pruner."""

from __future__ import annotations

import numpy as np

from matfactor import (
    admm_prune,
    admm_solve,
    layer_error,
    magnitude_prune,
    sparsegpt_prune,
    wanda_prune,
)

from .common import BENCH_BACKENDS, BackendBenchmark, cached_layer, median_seconds

PRUNERS = {"magnitude": magnitude_prune, "wanda": wanda_prune, "sparsegpt": sparsegpt_prune,
           "admm": admm_prune}
SHAPES = ["1024x1024", "4096x4096", "4096x11008"]


def parse_shape(shape: str) -> tuple[int, int]:
    d_in, d_out = shape.split("x")
    return int(d_in), int(d_out)


class AdmmSpeed(BackendBenchmark):
    """ADMM pruning (20 iterations, unstructured 50%) at transformer sizes, float32.

    ``track_gemm_equivalents`` is the ratio time(admm_prune) / time(one GEMM of the ADMM step,
    (d_in x d_in) @ (d_in x d_out)), both measured in the same process: about 20 for 20
    iterations when the GEMMs dominate, as they should.
    """

    params = (BENCH_BACKENDS, SHAPES)
    param_names = ["backend", "shape"]
    timeout = 1800

    def setup(self, backend_name, shape):
        self.setup_backend(backend_name)
        d_in, d_out = parse_shape(shape)
        self.W, self.H = self.problem_on_backend(cached_layer(d_in, d_out))
        xp = self.backend.xp
        self.A = xp.asarray(self.H, copy=True)

    def time_admm_prune(self, backend_name, shape):
        admm_prune(self.W, self.H, density=0.5)
        self.sync()

    def time_gemm(self, backend_name, shape):
        self.A @ self.W
        self.sync()

    def peakmem_admm_prune(self, backend_name, shape):
        admm_prune(self.W, self.H, density=0.5)

    def track_gemm_equivalents(self, backend_name, shape):
        repeats = 1 if shape == "4096x11008" else 3
        gemm = median_seconds(lambda: self.A @ self.W, self.sync, repeats=5)
        admm = median_seconds(lambda: admm_prune(self.W, self.H, density=0.5), self.sync, repeats)
        return admm / gemm

    track_gemm_equivalents.unit = "GEMMs"


class SparseGptSpeed(BackendBenchmark):
    """SparseGPT at transformer sizes, float32, and its time in GEMM equivalents."""

    params = (BENCH_BACKENDS, SHAPES[:2])
    param_names = ["backend", "shape"]
    timeout = 1800

    def setup(self, backend_name, shape):
        self.setup_backend(backend_name)
        self.W, self.H = self.problem_on_backend(cached_layer(*parse_shape(shape)))
        self.A = self.backend.xp.asarray(self.H, copy=True)

    def time_sparsegpt_prune(self, backend_name, shape):
        sparsegpt_prune(self.W, self.H, density=0.5)
        self.sync()

    def track_gemm_equivalents(self, backend_name, shape):
        gemm = median_seconds(lambda: self.A @ self.W, self.sync, repeats=5)
        pruned = median_seconds(lambda: sparsegpt_prune(self.W, self.H, density=0.5), self.sync, 1)
        return pruned / gemm

    track_gemm_equivalents.unit = "GEMMs"


class PruningQuality(BackendBenchmark):
    """Relative layer error at 50% density of every pruner and pattern (lower is better).

    Expected ordering on every pattern: admm < sparsegpt < min(wanda, magnitude).
    """

    params = (["numpy"], ["unstructured", "per_output", "2:4"], list(PRUNERS))
    param_names = ["backend", "pattern", "pruner"]

    def setup(self, backend_name, pattern, pruner):
        self.setup_backend(backend_name)
        self.problem = cached_layer(512, 1024, seed=1)

    def track_layer_error(self, backend_name, pattern, pruner):
        density = None if ":" in pattern else 0.5
        W_sparse = PRUNERS[pruner](self.problem.W, self.problem.H, density=density, pattern=pattern)
        return layer_error(self.problem.W, W_sparse, self.problem.H)

    track_layer_error.unit = "relative error"


class FixedMaskExactness(BackendBenchmark):
    """admm_solve against the direct normal-equation solution on the same (Wanda) mask.

    ``track_objective_gap`` is (error(ADMM) − error(direct)) / error(direct): rounding level.
    """

    params = (["numpy"], ["unstructured", "2:4"])
    param_names = ["backend", "pattern"]

    def setup(self, backend_name, pattern):
        self.setup_backend(backend_name)
        self.problem = cached_layer(128, 96, seed=2)
        density = None if ":" in pattern else 0.5
        self.mask = wanda_prune(self.problem.W, self.problem.H, density=density,
                                pattern=pattern) != 0

    def track_objective_gap(self, backend_name, pattern):
        W, H, mask = self.problem.W, self.problem.H, self.mask
        target = H @ W
        direct = np.zeros_like(W)
        for j in range(W.shape[1]):
            support = np.flatnonzero(mask[:, j])
            direct[support, j] = np.linalg.solve(H[np.ix_(support, support)], target[support, j])
        solved = admm_solve(W, H, mask)
        reference = layer_error(W, direct, H)
        return (layer_error(W, solved, H) - reference) / reference

    track_objective_gap.unit = "relative"
