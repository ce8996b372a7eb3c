"""Shared fixtures: one test suite over every backend and compute dtype.

``backend`` runs a test on NumPy, array_api_strict (which proves the core uses only the array
API standard) and PyTorch on the CPU, plus CuPy and PyTorch on CUDA when a GPU is present
(skipped, with the reason, when not). ``dtype_name`` runs it in float32 and float64.
"""

from __future__ import annotations

import os

import hypothesis
import pytest

from matfactor.testing import BACKEND_NAMES, BackendUnavailable, load_backend

DTYPE_NAMES = ["float32", "float64"]

# The backend fixtures are stateless, so sharing them across examples is safe.
_SUPPRESSED = [hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.function_scoped_fixture]
hypothesis.settings.register_profile("default", max_examples=25, deadline=None,
                                     suppress_health_check=_SUPPRESSED)
hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                                     suppress_health_check=_SUPPRESSED)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "default")


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


@pytest.fixture(scope="module")
def torch_one_thread():
    """Small torch problems in one thread: more only contend with the rest of a loaded machine."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
