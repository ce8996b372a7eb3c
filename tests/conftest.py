"""Shared fixtures: one test suite over every backend and compute dtype.

``backend`` runs a test on NumPy, array_api_strict (which proves the core uses only the array
API standard) and PyTorch on the CPU, plus CuPy and PyTorch on CUDA when a GPU is present
(skipped, with the reason, when not). ``dtype_name`` runs it in float32 and float64.

Threads: the suite's problems are small, and on a small machine shared with other work the
thread pools of the BLAS under NumPy and of PyTorch fight each other and the other processes
for the cores (a 0.15 s test took 38 s under load). So the whole session runs them with
``MATFACTOR_TEST_THREADS`` threads, 1 by default; commands the tests start inherit it
through the usual environment variables.
"""

from __future__ import annotations

import os

_THREADS = os.environ.get("MATFACTOR_TEST_THREADS", "1")
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = _THREADS

import hypothesis  # noqa: E402  (after the thread settings, which libraries read on import)
import pytest  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from matfactor.testing import BACKEND_NAMES, BackendUnavailable, load_backend  # noqa: E402

DTYPE_NAMES = ["float32", "float64"]

# The backend fixtures are stateless, so sharing them across examples is safe.
# The suite draws the same examples on every run (derandomize), so that CI and a developer see
# the same result; MATFACTOR_HYPOTHESIS=explore draws new ones, and more, to look for failures.
_SUPPRESSED = [hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.function_scoped_fixture]
hypothesis.settings.register_profile("default", max_examples=25, deadline=None, derandomize=True,
                                     suppress_health_check=_SUPPRESSED)
hypothesis.settings.register_profile("explore", max_examples=200, deadline=None,
                                     suppress_health_check=_SUPPRESSED)
hypothesis.settings.load_profile(os.environ.get("MATFACTOR_HYPOTHESIS", "default"))


@pytest.fixture(params=BACKEND_NAMES)
def backend(request):
    try:
        return load_backend(request.param)
    except BackendUnavailable as reason:
        pytest.skip(str(reason))


@pytest.fixture(params=DTYPE_NAMES)
def dtype_name(request):
    return request.param


@pytest.fixture
def xp(backend):
    """The array namespace of the backend under test."""
    return backend.xp


@pytest.fixture(scope="session", autouse=True)
def limited_threads():
    """BLAS and PyTorch thread pools of this process limited to ``MATFACTOR_TEST_THREADS``."""
    threads = int(_THREADS)
    with threadpool_limits(limits=threads):
        try:
            import torch
        except ImportError:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        yield
        torch.set_num_threads(previous)
