"""Double sparse factorization: budgets and masks exact, fixed-mask variant, density 1, the
budget split, quality against pruning and low rank, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from matfactor import layer_error, magnitude_prune
from matfactor.dsf import DoubleSparse, double_sparse, dsf_budget_split
from matfactor.sparsity import _keep_count
from matfactor.testing import realistic_layer
from problems import layer_problems

FAST = dict(outer_iters=6, inner_iters=3, mask_iters=2)


@settings(max_examples=8)
@given(problem=layer_problems(min_dim=8, max_dim=32), density=st.sampled_from([0.25, 0.5, 0.8]),
       layerwise=st.booleans(), split=st.sampled_from(["auto", "paper", 0.2]))
def test_budget_and_masks_are_exact(backend, dtype_name, problem, density, layerwise, split):
    d_in, d_out = problem.W.shape
    k = min(d_in, d_out)
    try:
        nnz_square, nnz_other = dsf_budget_split((d_in, d_out), density, split, layerwise)
    except ValueError:
        assume(False)  # a split that leaves a factor empty is an error: test_split_rules
    W = backend.asarray(problem.W, dtype_name)
    H = backend.asarray(problem.H, dtype_name) if layerwise else None
    result = double_sparse(W, density, H, split=split, **FAST)
    assert isinstance(result, DoubleSparse)
    assert tuple(result.A.shape) == (d_in, k) and tuple(result.B.shape) == (k, d_out)
    assert result.A.dtype == backend.dtype(dtype_name) and backend.same_device(result.A)
    A, B = backend.to_numpy(result.A), backend.to_numpy(result.B)
    square, other = (A, B) if d_in <= d_out else (B, A)
    assert np.count_nonzero(square) <= nnz_square and np.count_nonzero(other) <= nnz_other
    assert result.n_params <= _keep_count(density, d_in * d_out)
    assert np.all(np.isfinite(A)) and np.all(np.isfinite(B))
    X = np.random.default_rng(0).standard_normal((5, d_in))
    np.testing.assert_allclose(backend.to_numpy(result.matmul(backend.asarray(X, dtype_name))),
                               X @ (A @ B), rtol=1e-4, atol=1e-4 * np.abs(X @ A @ B).max())


def test_density_one_nearly_reproduces_W(backend):
    """Exact reproduction needs nnz(A) + nnz(B) >= d_in·d_out + k (the diagonal scaling
    A D, D⁻¹ B leaves only d_in·d_out − k free values at density 1), so it is near, not exact."""
    problem = realistic_layer(48, 64, seed=1)
    result = double_sparse(backend.asarray(problem.W), 1.0)
    assert layer_error(problem.W, backend.to_numpy(result.dense())) < 1e-3


@pytest.mark.parametrize("shape", [(32, 48), (48, 32)])
def test_fixed_square_mask_is_kept(backend, shape):
    problem = realistic_layer(*shape, seed=2)
    k = min(shape)
    mask = np.random.default_rng(3).random((k, k)) < 0.2
    np.fill_diagonal(mask, True)
    result = double_sparse(backend.asarray(problem.W), 0.5, backend.asarray(problem.H),
                           square_mask=backend.asarray(mask), **FAST)
    square = backend.to_numpy(result.A if shape[0] <= shape[1] else result.B)
    assert np.all(square[~mask] == 0)
    assert result.n_params <= _keep_count(0.5, shape[0] * shape[1])


def test_scale_of_H_does_not_change_the_answer():
    problem = realistic_layer(32, 48, seed=4)
    base = double_sparse(problem.W, 0.5, problem.H, **FAST)
    scaled = double_sparse(problem.W, 0.5, 1e4 * problem.H, **FAST)
    np.testing.assert_allclose(scaled.dense(), base.dense(), rtol=1e-6,
                               atol=1e-8 * np.abs(base.dense()).max())


@pytest.mark.parametrize("shape", [(16, 8), (8, 16)])
def test_a_weight_that_vanishes_on_the_live_inputs_gives_zero_factors(backend, shape):
    problem = realistic_layer(*shape, seed=7)
    on_dead_inputs = np.zeros(shape)
    on_dead_inputs[problem.dead, :] = 1.0  # reaches the output for no calibration sample
    for W, H in ((np.zeros(shape), None), (on_dead_inputs, problem.H)):
        result = double_sparse(backend.asarray(W), 0.5,
                               None if H is None else backend.asarray(H), outer_iters=3)
        assert not np.any(backend.to_numpy(result.dense()))
        assert result.A.shape == (shape[0], min(shape)) and result.B.shape == (min(shape), shape[1])


def test_split_rules():
    assert dsf_budget_split((96, 96), 0.5, "auto") == (921, 4608 - 921)
    assert dsf_budget_split((96, 192), 0.5, "auto", layerwise=True) == (1843, 9216 - 1843)
    assert dsf_budget_split((192, 96), 0.5, "auto", layerwise=True) == (3072, 9216 - 3072)
    assert dsf_budget_split((192, 96), 0.5, "auto") == (1843, 9216 - 1843)
    assert dsf_budget_split((96, 96), 0.5, "paper") == (int(0.16 * 96 * 96), 4608 - int(0.16 * 96 * 96))
    assert dsf_budget_split((64, 128), 0.5, "paper")[0] == int(0.25 * 64 * 64)
    assert dsf_budget_split((64, 128), 0.5, 0.1) == (409, 4096 - 409)
    square, other = dsf_budget_split((64, 128), 1.0, "auto")
    assert square + other == 64 * 128 and square <= 64 * 64 and other <= 64 * 128
    with pytest.raises(ValueError, match="leaves a factor"):
        dsf_budget_split((100, 100), 0.1, "paper")   # 16% of the square factor > the budget
    with pytest.raises(ValueError, match="split must be"):
        dsf_budget_split((8, 8), 0.5, 1.5)
    with pytest.raises(ValueError, match="density must be a real number in"):
        dsf_budget_split((8, 8), 0.0)


def test_finalization_never_increases_the_layer_error():
    problem = realistic_layer(64, 96, seed=5)
    raw = double_sparse(problem.W, 0.4, problem.H, finalize=False, **FAST)
    final = double_sparse(problem.W, 0.4, problem.H, **FAST)
    both = double_sparse(problem.W, 0.4, problem.H, finalize_input_factor=True, **FAST)
    raw_error = raw.rel_error(problem.W, problem.H)
    assert final.rel_error(problem.W, problem.H) <= raw_error
    assert both.rel_error(problem.W, problem.H) <= raw_error


@pytest.mark.parametrize("shape", [(128, 128), (96, 192), (192, 96)])
def test_projection_beats_magnitude_and_svd_at_25_percent(shape):
    """Appendix A.2 / Figure 4: at 25% density DSF is clearly below magnitude pruning and the
    truncated SVD with the same number of parameters."""
    W = realistic_layer(*shape, seed=6).W
    d_in, d_out = shape
    dsf_error = double_sparse(W, 0.25).rel_error(W)
    magnitude_error = layer_error(W, magnitude_prune(W, density=0.25))
    rank = _keep_count(0.25, d_in * d_out) // (d_in + d_out)
    singular_values = np.linalg.svd(W, compute_uv=False)
    svd_error = np.sum(singular_values[rank:] ** 2) / np.sum(singular_values ** 2)
    assert dsf_error < 0.8 * magnitude_error and dsf_error < 0.8 * svd_error


def test_bad_input_is_named():
    problem = realistic_layer(16, 24, seed=7)
    W, H = problem.W, problem.H
    with pytest.raises(ValueError, match="density must be a real number in"):
        double_sparse(W, 1.5)
    with pytest.raises(ValueError, match="H has shape"):
        double_sparse(W, 0.5, H[:8, :8])
    with pytest.raises(ValueError, match="W contains NaN"):
        double_sparse(np.full_like(W, np.nan), 0.5)
    with pytest.raises(ValueError, match="outer_iters must be an integer >= 1"):
        double_sparse(W, 0.5, outer_iters=0)
    with pytest.raises(ValueError, match="mask_iters must be an integer in \\[0, 5\\] \\(at most inner_iters = 5\\)"):
        double_sparse(W, 0.5, mask_iters=6)
    with pytest.raises(ValueError, match="damping must be a real number > 0"):
        double_sparse(W, 0.5, damping=0.0)
    with pytest.raises(TypeError, match="square_mask must be a boolean array"):
        double_sparse(W, 0.5, square_mask=np.ones((16, 16)))
    with pytest.raises(ValueError, match="every input is dead"):
        double_sparse(W, 0.5, np.zeros_like(H))
