"""Double sparse factorization: budgets and masks exact, fixed-mask variant, density 1, the
budget split, quality against pruning and low rank, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from matfactor import layer_error, magnitude_prune
from matfactor.dsf import (DoubleSparse, _finalize_input_factor, _sparse_regression, double_sparse,
                           dsf_budget_split)
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
    # a square layer: a quarter of the budget, in both problems
    assert dsf_budget_split((96, 96), 0.5, "auto") == (1152, 4608 - 1152)
    assert dsf_budget_split((96, 96), 0.5, "auto", layerwise=True) == (1152, 4608 - 1152)
    assert dsf_budget_split((96, 96), 0.25, "auto", layerwise=True) == (576, 2304 - 576)
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
    final_error = final.rel_error(problem.W, problem.H)
    # Each finalization is a descent on a convex problem from a point that is not its optimum
    # here: it must lower the error, not merely keep it (a skipped finalization keeps it).
    assert final_error < raw_error
    assert both.rel_error(problem.W, problem.H) < final_error
    for result in (raw, final, both):  # finalization keeps the masks
        np.testing.assert_array_equal(result.A != 0, raw.A != 0)
        np.testing.assert_array_equal(result.B != 0, raw.B != 0)


@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (64, 64)])
def test_finalized_output_factor_meets_the_optimality_conditions(backend, shape):
    """The output factor's finalization solves ``min tr((AB − W)ᵀ H (AB − W))`` over ``B`` on its
    mask: with the default iterations the gradient ``Aᵀ H (AB − W)`` vanishes on the support
    (conjugate gradients reach rounding level here, about 1e-16 relative in float64 and 1e-7 in
    float32; 20 ADMM iterations, the previous method, stopped near 4e-4)."""
    problem = realistic_layer(*shape, seed=5)
    result = double_sparse(backend.asarray(problem.W), 0.4, backend.asarray(problem.H), **FAST)
    A, B = backend.to_numpy(result.A), backend.to_numpy(result.B)
    gradient = A.T @ problem.H @ (A @ B - problem.W)
    tolerance = 1e-10 if B.dtype == np.float64 else 1e-5
    assert np.linalg.norm(gradient[B != 0]) <= tolerance * np.linalg.norm(A.T @ problem.H @ problem.W)


def test_output_factor_finalization_is_monotone_and_reaches_the_least_squares_solution():
    """Conjugate gradients minimise over growing Krylov spaces from the same start: the layer
    error never rises with ``finalize_iters``, and converges to the exact per-column solution
    ``G_SS b = (AᵀHW)_S`` on each output's support (computed here directly)."""
    problem = realistic_layer(48, 80, seed=2)
    W, H = problem.W, problem.H
    errors = [double_sparse(W, 0.4, H, finalize_iters=iters, **FAST).rel_error(W, H)
              for iters in (1, 2, 5, 10, 20, 40)]
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(errors, errors[1:])), errors
    result = double_sparse(W, 0.4, H, **FAST)
    G, target = result.A.T @ H @ result.A, result.A.T @ H @ W
    exact = np.zeros_like(result.B)
    for j in range(W.shape[1]):
        support = np.flatnonzero(result.B[:, j])
        exact[support, j] = np.linalg.solve(G[np.ix_(support, support)], target[support, j])
    np.testing.assert_allclose(result.B, exact, rtol=0, atol=1e-6 * np.abs(exact).max())
    assert result.rel_error(W, H) <= layer_error(W, result.A @ exact, H) * (1 + 1e-9)


def test_a_single_inner_iteration_is_one_regression_solve(backend):
    """``inner_iters=1``: each factor update is the one ρ₀-solve, then the mask; still exact on
    the budget."""
    problem = realistic_layer(32, 48, seed=6)
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)
    result = double_sparse(W, 0.5, H, outer_iters=3, inner_iters=1, mask_iters=1)
    nnz = int(np.count_nonzero(backend.to_numpy(result.A))
              + np.count_nonzero(backend.to_numpy(result.B)))
    assert nnz <= _keep_count(0.5, 32 * 48)
    assert result.rel_error(W, H) < 1.0


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
    with pytest.raises(ValueError,
                       match="mask_iters must be an integer in \\[0, 5\\] \\(at most inner_iters = 5\\)"):
        double_sparse(W, 0.5, mask_iters=6)
    with pytest.raises(ValueError, match="damping must be a real number > 0"):
        double_sparse(W, 0.5, damping=0.0)
    with pytest.raises(TypeError, match="square_mask must be a boolean array"):
        double_sparse(W, 0.5, square_mask=np.ones((16, 16)))
    with pytest.raises(ValueError, match="every input is dead"):
        double_sparse(W, 0.5, np.zeros_like(H))


def test_sparse_regression_on_a_full_mask_is_the_ridge_solution(backend):
    """The factor regression's ridge is ``damping · mean(diag G_n)`` in the coordinates where the
    live columns of ``F`` have unit norm (a dead column: zero row, no share of the ridge): on a
    mask that keeps everything, ADMM converges to that ridge regression's solution."""
    rng = np.random.default_rng(11)
    F = rng.standard_normal((40, 4)) * [1.0, 3.0, 0.0, 0.5]  # one dead column
    T = rng.standard_normal((40, 5))
    G, FtT = F.T @ F, F.T @ T
    damping = 0.5
    norms = np.where(np.diag(G) > 0, np.sqrt(np.diag(G)), 1.0)
    G_n = G / np.outer(norms, norms) + damping * 0.75 * np.eye(4)
    expected = np.linalg.solve(G_n, FtT / norms[:, None]) / norms[:, None]
    xp = backend.xp
    Z, _ = _sparse_regression(xp, backend.asarray(G), backend.asarray(FtT),
                              backend.asarray(np.zeros((4, 5))), backend.asarray(np.zeros((4, 5))),
                              20, 1.0, 80, 0, damping, backend.asarray(np.ones((4, 5), dtype=bool)))
    np.testing.assert_allclose(backend.to_numpy(Z), expected, rtol=0, atol=1e-9)


def reference_sparse_regression(G, FtT, Z, U, nnz, rho0, inner_iters, mask_iters, damping):
    """The factor regression written out in NumPy (no dead columns): unit-diagonal ``G`` with
    the ridge ``damping``, one Ŵ-update with ``ρ₀``, then eq. (1) with ``ρ = 1`` for the other
    ``inner_iters − 1``, the mask the ``nnz`` largest ``|Ŵ + U|`` for the first
    ``max(1, mask_iters)`` mask updates, then fixed."""
    scale = np.sqrt(np.diag(G))
    G_n = G / np.outer(scale, scale) + damping * np.eye(len(G))
    target, Z, U = FtT / scale[:, None], Z * scale[:, None], U * scale[:, None]
    W_hat = np.linalg.solve(G_n + rho0 * np.eye(len(G)), target + rho0 * (Z - U))
    inverse = np.linalg.inv(G_n + np.eye(len(G)))
    for t in range(inner_iters):
        V = W_hat + U
        if t < max(1, mask_iters):
            mask = np.zeros(V.size, dtype=bool)
            mask[np.argsort(-np.abs(V), axis=None)[:nnz]] = True
            mask = mask.reshape(V.shape)
        Z, U = np.where(mask, V, 0.0), np.where(mask, 0.0, V)
        if t == inner_iters - 1:
            return Z / scale[:, None], U / scale[:, None]
        W_hat = inverse @ (target + Z - U)


@pytest.mark.parametrize("inner_iters, mask_iters", [(4, 1), (5, 2), (3, 0), (1, 1)])
def test_sparse_regression_is_equation_1_with_its_mask_phase(backend, inner_iters, mask_iters):
    """Every Ŵ-update, the ρ₀ first step and the end of the mask phase, against a reference."""
    rng = np.random.default_rng(12)
    F = rng.standard_normal((30, 6)) * np.linspace(0.3, 3.0, 6)
    T = F @ rng.standard_normal((6, 8)) + 0.5 * rng.standard_normal((30, 8))
    G, FtT = F.T @ F, F.T @ T
    Z0, U0 = rng.standard_normal((6, 8)), 0.1 * rng.standard_normal((6, 8))
    expected = reference_sparse_regression(G, FtT, Z0, U0, 20, 0.3, inner_iters, mask_iters, 0.01)
    result = _sparse_regression(backend.xp, backend.asarray(G), backend.asarray(FtT),
                                backend.asarray(Z0), backend.asarray(U0), 20, 0.3, inner_iters,
                                mask_iters, 0.01, None)
    for got, want in zip(result, expected):
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-9, atol=1e-12)


def test_input_factor_finalization_keeps_dead_inputs_zero_and_needs_a_nonzero_b(backend):
    """Dead inputs (``H_ii = 0``) keep exactly zero rows in ``A``; with ``B = 0`` there is nothing
    to fit (``BBᵀ = 0``, the Sylvester system is singular) and ``A`` is returned as it is."""
    problem = realistic_layer(48, 64, n_dead=3, seed=16)
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)
    result = double_sparse(W, 0.4, H, finalize_input_factor=True, **FAST)
    assert np.all(backend.to_numpy(result.A)[problem.dead] == 0)
    xp = backend.xp
    A = backend.asarray(np.random.default_rng(17).standard_normal((48, 48)))
    same = _finalize_input_factor(xp, W, H, A, xp.zeros((48, 64), dtype=A.dtype), 5)
    np.testing.assert_array_equal(backend.to_numpy(same), backend.to_numpy(A))
