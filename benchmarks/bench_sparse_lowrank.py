"""Sparse plus low rank (HASSLE-free paper, section 5 and Figure 1): per-iteration cost
against one GEMM, and layer error of the full-Hessian method against OATS (its diagonal case),
of the exact low-rank step against Low-Rank-GD, in the paper's two budget settings."""

from __future__ import annotations

from matfactor import layer_error, sparsegpt_prune
from matfactor.sparse_lowrank import sparse_lowrank_budget, sparse_plus_lowrank

from .common import BENCH_BACKENDS, REAL_LAYERS, BackendBenchmark, cached_layer, median_seconds, real_layer

# The paper's two settings at the sizes of this machine: "2:4 + rank 64" becomes 2:4 plus a
# rank of min(d)/64 (64 at 4096), and "50% compression with rank ratio κ = 0.3" (appendix A.3).
SETTINGS = ["2:4+r/64", "50%,k=0.3"]
VARIANTS = {
    "oats": dict(hessian="diagonal"),
    "gd": dict(hessian="full", lowrank="gd"),
    "exact": dict(hessian="full", lowrank="exact"),
}


def variant_error(problem, arguments: dict, variant: str) -> float:
    """Relative layer error of one variant after the default 80 iterations."""
    W, H = problem.W, problem.H
    return sparse_plus_lowrank(W, H, **arguments, **VARIANTS[variant]).rel_error(W, H)


def setting_arguments(setting: str, shape: tuple[int, int]) -> dict:
    if setting == "2:4+r/64":
        return dict(rank=max(1, min(shape) // 64), pattern="2:4")
    budget = sparse_lowrank_budget(shape, 0.5, 0.3)
    return dict(rank=budget.rank, density=budget.density, pattern="unstructured")


class SparseLowRankSpeed(BackendBenchmark):
    """Time per alternating-minimisation iteration in units of one ``(d_in, d_in) @ (d_in,
    d_out)`` GEMM, float32, 2:4 plus rank d/64: the difference of 6 and 2 iterations over 4, so
    that the one-off work (factorizations, the first SVD) is excluded."""

    params = (BENCH_BACKENDS, ["1024x1024", "1024x2816"], list(VARIANTS))
    param_names = ["backend", "shape", "variant"]
    timeout = 1800

    def setup(self, backend_name, shape, variant):
        self.setup_backend(backend_name)
        d_in, d_out = (int(v) for v in shape.split("x"))
        self.W, self.H = self.problem_on_backend(cached_layer(d_in, d_out))
        self.arguments = {**setting_arguments("2:4+r/64", (d_in, d_out)), **VARIANTS[variant]}

    def run(self, iters):
        return sparse_plus_lowrank(self.W, self.H, iters=iters, **self.arguments)

    def track_gemm_equivalents_per_iteration(self, backend_name, shape, variant):
        gemm = median_seconds(lambda: self.H @ self.W, self.sync, repeats=5)
        short = median_seconds(lambda: self.run(2), self.sync, repeats=1)
        long = median_seconds(lambda: self.run(6), self.sync, repeats=1)
        return (long - short) / 4 / gemm

    def track_sparsegpt_gemm_equivalents(self, backend_name, shape, variant):
        """The reference: one standalone SparseGPT call, factorization included."""
        gemm = median_seconds(lambda: self.H @ self.W, self.sync, repeats=5)
        prune = median_seconds(lambda: sparsegpt_prune(self.W, self.H, pattern="2:4"), self.sync,
                               repeats=1)
        return prune / gemm

    track_gemm_equivalents_per_iteration.unit = "GEMMs"
    track_sparsegpt_gemm_equivalents.unit = "GEMMs"


SHAPES = {"square": (512, 512), "wide": (512, 1536), "tall": (1536, 512)}


class SparseLowRankQuality(BackendBenchmark):
    """Layer error after 80 iterations (the paper's T_AM) of each variant, relative to OATS
    (< 1: better than OATS), on realistic synthetic layers; and SparseGPT alone at the same
    pattern for scale (the low-rank part's budget on top)."""

    params = (["numpy"], list(SHAPES), SETTINGS, list(VARIANTS))
    param_names = ["backend", "shape", "setting", "variant"]
    timeout = 3600

    def setup(self, backend_name, shape, setting, variant):
        self.setup_backend(backend_name)
        self.problem = cached_layer(*SHAPES[shape], seed=5)
        self.arguments = setting_arguments(setting, SHAPES[shape])

    def error(self, variant):
        return variant_error(self.problem, self.arguments, variant)

    def track_error(self, backend_name, shape, setting, variant):
        return self.error(variant)

    def track_error_over_oats(self, backend_name, shape, setting, variant):
        return self.error(variant) / self.error("oats")

    track_error.unit = "relative layer error"
    track_error_over_oats.unit = "ratio"


class SparseLowRankRealLayers(BackendBenchmark):
    """As :class:`SparseLowRankQuality` on real all-MiniLM-L6-v2 layers (about 4500 tokens of
    pydoc text; needs ``pip install -e ".[hf]"``)."""

    params = (["numpy"], list(REAL_LAYERS), SETTINGS, list(VARIANTS))
    param_names = ["backend", "layer", "setting", "variant"]
    timeout = 3600

    def setup(self, backend_name, layer, setting, variant):
        self.setup_backend(backend_name)
        self.problem = real_layer(layer)
        self.arguments = setting_arguments(setting, self.problem.W.shape)

    def error(self, variant):
        return variant_error(self.problem, self.arguments, variant)

    def track_error_over_oats(self, backend_name, layer, setting, variant):
        return self.error(variant) / self.error("oats")

    def track_error_over_sparsegpt(self, backend_name, layer, setting, variant):
        """Against SparseGPT alone at the sparse part's pattern and density (no low-rank part)."""
        W, H = self.problem.W, self.problem.H
        arguments = {key: value for key, value in self.arguments.items() if key != "rank"}
        return self.error(variant) / layer_error(W, sparsegpt_prune(W, H, **arguments), H)

    track_error_over_oats.unit = "ratio"
    track_error_over_sparsegpt.unit = "ratio"
