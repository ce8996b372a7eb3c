"""Double sparse factorization: speed against one GEMM, quality against pruning and low rank,
and the default/fast settings trade-off (DSF paper, appendices A.2 and A.6)."""

from __future__ import annotations

import numpy as np

from matfactor import admm_prune, layer_error, magnitude_prune
from matfactor.dsf import double_sparse
from matfactor.sparsity import _keep_count

from .common import BENCH_BACKENDS, REAL_LAYERS, BackendBenchmark, cached_layer, median_seconds, real_layer

SETTINGS = {"default": dict(outer_iters=40, inner_iters=5), "fast": dict(outer_iters=10, inner_iters=5)}
SHAPES = {"square": (256, 256), "wide": (256, 768), "tall": (768, 256)}


class DsfSpeed(BackendBenchmark):
    """Layer-wise DSF at 50% density, float32; time in units of one GEMM of the same size.

    The reference GEMM is the product of a ``(k, k)`` Gram with a ``(k, m)`` factor, the
    dominant operation of a factor update (k = min(d_in, d_out), m = max).
    """

    params = (BENCH_BACKENDS, ["1024x1024", "1024x2816"], list(SETTINGS))
    param_names = ["backend", "shape", "setting"]
    timeout = 1800

    def setup(self, backend_name, shape, setting):
        self.setup_backend(backend_name)
        d_in, d_out = (int(v) for v in shape.split("x"))
        self.W, self.H = self.problem_on_backend(cached_layer(d_in, d_out))
        k, m = min(d_in, d_out), max(d_in, d_out)
        xp = self.backend.xp
        self.gram = xp.asarray(self.H[:k, :k], copy=True)
        self.factor = xp.asarray(self.W if d_in <= d_out else self.W.T, copy=True)[:k, :m]

    def time_double_sparse(self, backend_name, shape, setting):
        double_sparse(self.W, 0.5, self.H, **SETTINGS[setting])
        self.sync()

    def track_gemm_equivalents(self, backend_name, shape, setting):
        gemm = median_seconds(lambda: self.gram @ self.factor, self.sync, repeats=5)
        dsf = median_seconds(lambda: double_sparse(self.W, 0.5, self.H, **SETTINGS[setting]),
                             self.sync, repeats=1)
        return dsf / gemm

    track_gemm_equivalents.unit = "GEMMs"


class DsfQuality(BackendBenchmark):
    """Layer error of DSF relative to ADMM pruning at the same number of nonzeros (< 1: DSF is
    better), for each budget split and setting, on square, wide and tall realistic layers."""

    params = (["numpy"], list(SHAPES), [0.5, 0.3, 0.25], ["auto", "paper"], list(SETTINGS))
    param_names = ["backend", "shape", "density", "split", "setting"]
    timeout = 1800

    def setup(self, backend_name, shape, density, split, setting):
        self.setup_backend(backend_name)
        self.problem = cached_layer(*SHAPES[shape], seed=3)

    def track_error_over_admm(self, backend_name, shape, density, split, setting):
        W, H = self.problem.W, self.problem.H
        dsf = double_sparse(W, density, H, split=split, **SETTINGS[setting]).rel_error(W, H)
        return dsf / layer_error(W, admm_prune(W, H, density=density), H)

    track_error_over_admm.unit = "ratio"


class DsfProjection(BackendBenchmark):
    """Projection problem at 25% density (appendix A.2, Figure 4): DSF's Frobenius error
    relative to magnitude pruning and to the truncated SVD with the same parameter count."""

    params = (["numpy"], list(SHAPES))
    param_names = ["backend", "shape"]
    timeout = 1800

    def setup(self, backend_name, shape):
        self.setup_backend(backend_name)
        self.W = cached_layer(*SHAPES[shape], seed=4).W
        self.error = double_sparse(self.W, 0.25).rel_error(self.W)

    def track_error_over_magnitude(self, backend_name, shape):
        return self.error / layer_error(self.W, magnitude_prune(self.W, density=0.25))

    def track_error_over_svd(self, backend_name, shape):
        d_in, d_out = self.W.shape
        rank = _keep_count(0.25, d_in * d_out) // (d_in + d_out)
        singular_values = np.linalg.svd(self.W, compute_uv=False)
        return self.error / (np.sum(singular_values[rank:] ** 2) / np.sum(singular_values ** 2))

    track_error_over_magnitude.unit = "ratio"
    track_error_over_svd.unit = "ratio"


class DsfRealLayers(BackendBenchmark):
    """Layer error of DSF over ADMM pruning at the same nonzeros on real all-MiniLM-L6-v2 layers
    (about 4500 tokens of pydoc text; needs ``pip install -e ".[hf]"``).

    DSF is expected clearly below 1 on square and wide layers at 0.5 and 0.25.
    """

    params = (["numpy"], list(REAL_LAYERS), [0.5, 0.3, 0.25], ["auto", "paper"])
    param_names = ["backend", "layer", "density", "split"]
    timeout = 1800

    def setup(self, backend_name, layer, density, split):
        self.setup_backend(backend_name)
        self.problem = real_layer(layer)

    def track_error_over_admm(self, backend_name, layer, density, split):
        W, H = self.problem.W, self.problem.H
        dsf = double_sparse(W, density, H, split=split).rel_error(W, H)
        return dsf / layer_error(W, admm_prune(W, H, density=density), H)

    track_error_over_admm.unit = "ratio"
