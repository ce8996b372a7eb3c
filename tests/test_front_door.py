"""The private front door (matfactor._validation): the checks every public function uses.

The public contract (every public function, every bad input) is tested in test_validation.py;
these are the building blocks' own properties.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from matfactor import _validation as check


def test_mixed_namespaces_are_a_type_error_naming_both():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="W and H come from different array libraries"):
        check.namespace(W=np.ones((2, 2)), H=torch.ones(2, 2))


def test_mixed_devices_are_a_value_error_naming_both():
    strict = pytest.importorskip("array_api_strict")
    a = strict.asarray([[1.0]], device=strict.Device("CPU_DEVICE"))
    b = strict.asarray([[1.0]], device=strict.Device("device1"))
    with pytest.raises(ValueError, match="W is on device .* but H is on device"):
        check.namespace(W=a, H=b)


def test_non_array_argument_is_named():
    with pytest.raises(TypeError, match="W must be an array"):
        check.namespace(W=[[1.0, 2.0]])


def test_none_arguments_are_skipped(backend):
    xp, device = check.namespace(W=backend.asarray(np.ones((2, 2))), H=None, optional=("H",))
    assert device == backend.device


def test_dtype_policy(backend):
    xp = backend.xp
    for name, expected in [("float32", "float32"), ("float64", "float64")]:
        x = backend.asarray(np.ones(2), name)
        assert check.compute_dtype(xp, x, "W") == backend.dtype(expected)
    if backend.name != "array_api_strict":  # the strict namespace has no half precision
        half = backend.asarray(np.ones(2), "float16")
        assert check.compute_dtype(xp, half, "W") == xp.float32
    with pytest.raises(TypeError, match="W must be a real floating-point array"):
        check.compute_dtype(xp, backend.asarray(np.ones(2, dtype=np.int64)), "W")


def test_bfloat16_computes_in_float32():
    torch = pytest.importorskip("torch")
    xp = check.namespace(W=torch.ones(1))[0]
    assert check.compute_dtype(xp, torch.ones(2, dtype=torch.bfloat16), "W") == torch.float32


def test_non_finite_input_is_named(backend):
    x = backend.asarray(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        check.matrix(backend.xp, x, "W", backend.dtype("float64"))
    x = backend.asarray(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="H contains NaN or Inf"):
        check.matrix(backend.xp, x, "H", backend.dtype("float64"))


@pytest.mark.parametrize("H, message", [
    (np.ones((3, 4)), "H must be a square"),
    (np.eye(4), "H has shape \\(4, 4\\) but W has d_in = 3"),
    (np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "H must be symmetric"),
    (-np.eye(3), "H must be positive semi-definite"),
])
def test_gram_checks(backend, H, message):
    with pytest.raises(ValueError, match=message):
        check.gram(backend.xp, backend.asarray(H), 3)


def test_a_missing_required_array_is_named():
    with pytest.raises(TypeError, match="H is required"):
        check.namespace(W=np.ones((2, 2)), H=None)


def test_scalar_kinds_are_accepted_alike():
    for value in (0.5, np.float32(0.5), np.float64(0.5), Fraction(1, 2)):
        assert check.real("density", value, minimum=0.0, maximum=1.0) == 0.5
    for value in (3, np.int64(3), np.int32(3), np.uint8(3)):
        assert check.integer("rank", value, minimum=1) == 3
    assert check.flag("exact", np.True_) is True and check.flag("exact", False) is False


@pytest.mark.parametrize("value", [True, np.True_, "0.5", None, 1j, [0.5], np.array([0.5])])
def test_non_numbers_are_type_errors_naming_the_argument(value):
    with pytest.raises(TypeError, match="damping must be"):
        check.real("damping", value, minimum=0.0)


@pytest.mark.parametrize("value", [True, 3.0, "3", None, np.float64(3.0)])
def test_non_integers_are_type_errors_naming_the_argument(value):
    with pytest.raises(TypeError, match="iters must be an integer"):
        check.integer("iters", value, minimum=0)


@pytest.mark.parametrize("value", ["no", "yes", 0, 1, None, 1.0])
def test_flags_are_strict(value):
    with pytest.raises(TypeError, match="scaled must be True or False"):
        check.flag("scaled", value)


def test_type_errors_are_also_value_errors():
    # Code written when every bad scalar was a ValueError still catches them.
    with pytest.raises(ValueError):
        check.integer("rank", 2.5, minimum=1)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_non_finite_or_out_of_range_reals_are_value_errors(value):
    with pytest.raises(ValueError, match="damping must be a real number >= 0"):
        check.real("damping", value, minimum=0.0)


@pytest.mark.parametrize("exponent", [-1074, -1000, -149, -3, 0, 5, 127, 1000, 1023])
def test_power_of_two_scaling_is_exact(exponent):
    x = np.array([[1.0, -3.5], [0.1, 2.0 ** -20]])
    up = check.times_power_of_two(np, x, exponent)
    if np.all(np.isfinite(up)) and np.all(np.abs(up[x != 0]) >= np.finfo(np.float64).tiny):
        np.testing.assert_array_equal(check.times_power_of_two(np, up, -exponent), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalised_brings_the_maximum_to_unit_magnitude(dtype):
    tiny = np.finfo(dtype).tiny
    for magnitude in (tiny, 1e-20, 1.0, 3e10, np.finfo(dtype).max / 2):
        x = (np.array([[1.0, -0.25], [0.5, 0.0]]) * magnitude).astype(dtype)
        scaled, exponent = check.normalised(np, x, "W")
        assert 0.5 <= np.max(np.abs(scaled)) < 1
        scaled, exponent = check.normalised(np, x, "H", even=True)
        assert exponent % 2 == 0 and 0.5 <= np.max(np.abs(scaled)) < 2


def test_sparse_and_masked_containers_are_refused():
    scipy_sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match="W is a sparse matrix"):
        check.namespace(W=scipy_sparse.csr_matrix(np.eye(2)))
    with pytest.raises(TypeError, match="W is a NumPy masked array"):
        check.namespace(W=np.ma.masked_array(np.eye(2)))


def test_torch_sparse_and_meta_tensors_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="W is a torch.sparse_coo torch tensor"):
        check.namespace(W=torch.eye(2).to_sparse())
    with pytest.raises(ValueError, match="W is on torch's 'meta' device"):
        check.namespace(W=torch.empty((2, 2), device="meta"))


def test_matrix_converts_np_matrix_and_detaches_torch():
    torch = pytest.importorskip("torch")
    converted = check.matrix(np, np.matrix([[1.0, 2.0], [3.0, 4.0]]), "W", np.float64)
    assert type(converted) is np.ndarray
    weight = torch.nn.Linear(3, 2).weight.T
    assert weight.requires_grad
    assert not check.matrix(torch, weight, "W", torch.float32).requires_grad


# Found by feeding random odd values to every public function: each must be a clear error.

def _problem():
    from matfactor.testing import realistic_layer

    return realistic_layer(16, 12, seed=0)


def test_odd_values_found_by_fuzzing_get_errors_naming_the_argument():
    import matfactor as mf

    problem = _problem()
    W, H = problem.W, problem.H
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="init must be None, 'svd', 'random' or a LowRank"):
        mf.lowrank_gd(W, H, 3, init=np.ones(3))
    with pytest.raises(TypeError, match="dtype must be None, 'float32' or 'float64'"):
        mf.ReconstructionStatistics(dtype=np.ones(2))
    with pytest.raises(ValueError, match="shape must be a pair of positive integers"):
        mf.lowrank_rank_for_density(torch.tensor(0.5), 0.5)
    with pytest.raises(ValueError, match="but G has d_in = 12 rows"):
        mf.update_U(mf.truncated_svd(W, 3).V, H, np.ones((12, 12)))


def test_parameters_that_make_a_valid_problem_singular_are_errors_not_nan():
    import matfactor as mf

    problem = _problem()
    W, H = problem.W, problem.H  # H has dead inputs: singular without damping
    with pytest.raises(ValueError, match="rho=.* or damping=0 is too small"):
        mf.admm_solve(W, H, np.abs(W) > 0.1, rho=5e-324, max_iters=10)
    with pytest.raises(ValueError, match="singular at damping=.*increase damping"):
        mf.double_sparse(W, 0.5, H, damping=5e-324, outer_iters=2)
    rank_one = np.outer(np.arange(1.0, 17.0), np.ones(12))
    statistics = mf.ReconstructionStatistics().update(problem.X)
    with pytest.raises(ValueError, match="pass a lower rank"):
        mf.mpifa_lowrank(rank_one, statistics, 3, alpha=1e-3)
