"""Low-rank approximation: Eckart–Young optimality of the truncated SVD, exactness and accuracy
of the randomized SVD, the exact Hessian-weighted minimiser (singular H included), signs,
reproducibility, dtypes, devices and input errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matfactor.svd import (
    LowRank,
    lowrank_rank_for_density,
    randomized_svd,
    truncated_svd,
    weighted_lowrank,
)
from matfactor.testing import realistic_layer
from problems import eps, layer_problems

SOLVERS = {
    "truncated": lambda W, r: truncated_svd(W, r),
    "randomized": lambda W, r: randomized_svd(W, r, rng=0),
}


def weighted_objective(W: np.ndarray, M: np.ndarray, H: np.ndarray) -> float:
    D = W - M
    return float(np.sum(D * (H @ D)))


def optimal_weighted_objective(X: np.ndarray, W: np.ndarray, rank: int) -> float:
    """Reference computed another way than whitening H: since H = XᵀX, the objective is
    ‖XW − XM‖²_F, and XM ranges over the rank-r matrices in range(X), which contain C_r(XW):
    the minimum is the sum of the discarded σ_i²(XW) (float64 NumPy)."""
    s = np.linalg.svd(X @ W, compute_uv=False)
    return float(np.sum(s[rank:] ** 2))


def as_float64(backend, x) -> np.ndarray:
    return backend.to_numpy(x).astype(np.float64)


def assert_result_on_backend(backend, result: LowRank, dtype_name: str) -> None:
    for factor in (result.U, result.V):
        assert factor.dtype == backend.dtype(dtype_name)
        assert backend.same_device(factor)


def assert_sign_rule(V: np.ndarray) -> None:
    """The largest-magnitude entry of each column of V is positive (ties: positive wins)."""
    assert np.all(V.max(axis=0) >= -V.min(axis=0))


# --------------------------------------------------------------------------- truncated SVD


@settings(max_examples=20)
@given(problem=layer_problems(), data=st.data())
def test_truncated_svd_meets_the_eckart_young_bound(backend, dtype_name, problem, data):
    W64 = problem.W
    rank = data.draw(st.integers(1, min(W64.shape)), label="rank")
    W = backend.asarray(W64, dtype_name)
    result = truncated_svd(W, rank)
    assert_result_on_backend(backend, result, dtype_name)
    assert result.rank == rank and result.shape == W64.shape
    W_in = as_float64(backend, W)
    U, V = as_float64(backend, result.U), as_float64(backend, result.V)
    tol = 50 * eps(dtype_name) * max(W_in.shape)
    # error² = sum of the discarded σ² (Eckart–Young), to rounding of the whole matrix.
    tail = np.sum(np.linalg.svd(W_in, compute_uv=False)[rank:] ** 2)
    error = np.sum((W_in - U @ V.T) ** 2)
    assert abs(error - tail) <= tol * np.sum(W_in ** 2)
    # V orthonormal, the singular values folded into U = W V, and the sign rule.
    np.testing.assert_allclose(V.T @ V, np.eye(rank), atol=tol)
    np.testing.assert_allclose(U, W_in @ V, atol=tol * np.abs(W_in).sum(axis=1).max())
    assert_sign_rule(V)


def test_truncated_svd_is_the_same_on_every_backend(backend, dtype_name):
    """Distinct singular values + the sign rule: the factors themselves agree with NumPy."""
    W64 = realistic_layer(48, 40, seed=21).W
    result = truncated_svd(backend.asarray(W64, dtype_name), 6)
    reference = truncated_svd(W64, 6)
    tol = 1e3 * eps(dtype_name)
    np.testing.assert_allclose(as_float64(backend, result.V), reference.V, atol=tol)
    np.testing.assert_allclose(as_float64(backend, result.U), reference.U,
                               atol=tol * np.abs(reference.U).max())


# --------------------------------------------------------------------------- randomized SVD


@settings(max_examples=20)
@given(d_in=st.integers(4, 64), d_out=st.integers(4, 64), data=st.data())
def test_randomized_svd_is_exact_on_exactly_low_rank_input(backend, dtype_name, d_in, d_out,
                                                            data):
    true_rank = data.draw(st.integers(1, min(d_in, d_out)), label="true_rank")
    rank = data.draw(st.integers(true_rank, min(d_in, d_out)), label="rank")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rng = np.random.default_rng(seed)
    # Factors with spread singular values and correlated rows, not white noise.
    spectrum = np.exp(-np.arange(true_rank) / 2.0)
    W64 = (rng.standard_normal((d_in, true_rank)) * spectrum) @ rng.standard_normal((true_rank, d_out))
    W = backend.asarray(W64, dtype_name)
    result = randomized_svd(W, rank, oversampling=data.draw(st.integers(0, 5), label="oversampling"),
                            power_iters=data.draw(st.integers(0, 2), label="power_iters"),
                            rng=seed)
    assert_result_on_backend(backend, result, dtype_name)
    W_in = as_float64(backend, W)
    M = as_float64(backend, result.dense())
    assert np.linalg.norm(W_in - M) <= 100 * eps(dtype_name) * np.sqrt(max(d_in, d_out)) \
        * np.linalg.norm(W_in)
    assert_sign_rule(as_float64(backend, result.V))


@pytest.mark.parametrize("shape", [(256, 192), (160, 320)])
@pytest.mark.parametrize("divisor", [8, 16])
def test_randomized_svd_is_near_optimal_on_a_realistic_spectrum(backend, dtype_name, shape,
                                                                divisor):
    W64 = realistic_layer(*shape, seed=22).W
    rank = min(shape) // divisor
    W = backend.asarray(W64, dtype_name)
    optimum = np.sqrt(np.sum(np.linalg.svd(W64, compute_uv=False)[rank:] ** 2))
    error = np.linalg.norm(W64 - as_float64(backend, randomized_svd(W, rank, rng=1).dense()))
    assert optimum <= error * (1 + 1e-6) and error <= 1.03 * optimum


def test_randomized_svd_same_seed_same_result(backend):
    W = backend.asarray(realistic_layer(64, 48, seed=23).W, "float32")
    first = randomized_svd(W, 5, rng=7)
    second = randomized_svd(W, 5, rng=7)
    np.testing.assert_array_equal(backend.to_numpy(first.U), backend.to_numpy(second.U))
    np.testing.assert_array_equal(backend.to_numpy(first.V), backend.to_numpy(second.V))
    other = randomized_svd(W, 5, rng=8, power_iters=0)
    assert not np.array_equal(backend.to_numpy(first.U), backend.to_numpy(other.U))


def test_randomized_svd_signs_agree_with_the_exact_svd(backend, dtype_name):
    """On a rank-r input the sketch finds the exact subspace: whatever the sketch (seed,
    backend), the sign rule makes the factors equal to the truncated SVD's."""
    rng = np.random.default_rng(24)
    W64 = (rng.standard_normal((40, 5)) * [5.0, 4.0, 3.0, 2.0, 1.0]) @ rng.standard_normal((5, 30))
    W = backend.asarray(W64, dtype_name)
    exact = truncated_svd(W, 5)
    tol = 1e3 * eps(dtype_name)
    for seed in (0, 1):
        sketched = randomized_svd(W, 5, rng=seed)
        np.testing.assert_allclose(as_float64(backend, sketched.V), as_float64(backend, exact.V),
                                   atol=tol)


def test_randomized_svd_sketches_the_same_side_of_w_and_its_transpose(backend, dtype_name):
    """The range finder always sketches the tall orientation, so for one seed the approximation
    of ``Wᵀ`` is the transpose of that of ``W`` (to rounding), though neither is exact here."""
    W64 = realistic_layer(24, 40, seed=26).W  # wide: d_in < d_out
    W = backend.asarray(W64, dtype_name)
    wide = as_float64(backend, randomized_svd(W, 3, power_iters=0, rng=5).dense())
    tall = as_float64(backend, randomized_svd(backend.asarray(W64.T, dtype_name), 3,
                                              power_iters=0, rng=5).dense())
    np.testing.assert_allclose(tall, wide.T, rtol=0, atol=1e3 * eps(dtype_name) * np.abs(W64).max())


def test_randomized_svd_with_full_width_sketch_equals_truncated_svd():
    W = realistic_layer(24, 20, seed=25).W
    sketched = randomized_svd(W, 4, oversampling=100, power_iters=0, rng=0)  # width capped at 20
    exact = truncated_svd(W, 4)
    np.testing.assert_allclose(sketched.U, exact.U, atol=1e-10)
    np.testing.assert_allclose(sketched.V, exact.V, atol=1e-10)


# --------------------------------------------------------------------------- weighted low rank


@settings(max_examples=25)
@given(problem=layer_problems(), data=st.data())
def test_weighted_lowrank_is_the_global_minimiser(backend, dtype_name, problem, data):
    """Against a float64 reference through X (a different route), singular H included: dead
    inputs and fewer samples than inputs (layer_problems draws both)."""
    rank = data.draw(st.integers(1, min(problem.W.shape)), label="rank")
    W, H = backend.asarray(problem.W, dtype_name), backend.asarray(problem.H, dtype_name)
    result = weighted_lowrank(W, H, rank)
    assert_result_on_backend(backend, result, dtype_name)
    W_in, H_in = as_float64(backend, W), as_float64(backend, H)
    # The product in float64: a float32 U Vᵀ is rank r only up to its rounding.
    M = as_float64(backend, result.U) @ as_float64(backend, result.V).T
    total = weighted_objective(W_in, 0 * W_in, H_in)
    found = weighted_objective(problem.W, M, problem.H)
    optimum = optimal_weighted_objective(problem.X, problem.W, rank)
    # Rounding of the float32 inputs moves the optimum by O(eps · tr(WᵀHW)).
    tol = 200 * eps(dtype_name) * total
    assert found <= optimum + tol
    assert found >= optimum - 1e-9 * total
    assert np.all(M[problem.dead] == 0)                  # dead inputs: exact zero rows
    assert np.linalg.matrix_rank(M, tol=1e-6 * np.abs(M).max()) <= rank
    assert_sign_rule(as_float64(backend, result.V))


@settings(max_examples=20)
@given(problem=layer_problems(), data=st.data())
def test_weighted_lowrank_beats_every_other_candidate(problem, data):
    """Never beaten by random rank-r candidates, nor by the truncated SVD of W or the
    diagonal-Hessian solution of Theorem 4.1, nor by perturbations of itself."""
    W, H = problem.W, problem.H
    rank = data.draw(st.integers(1, min(W.shape)), label="rank")
    best = weighted_lowrank(W, H, rank)
    optimum = weighted_objective(W, best.dense(), H)
    slack = 1e-10 * weighted_objective(W, 0 * W, H)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    D = np.sqrt(np.diag(H))
    live = D > 0
    diagonal = truncated_svd(np.where(live[:, None], W * D[:, None], 0.0), rank)
    candidates = [truncated_svd(W, rank).dense(),
                  np.where(live[:, None], diagonal.dense() / np.where(live, D, 1.0)[:, None], 0.0)]
    for _ in range(5):
        candidates.append(rng.standard_normal((W.shape[0], rank)) @ rng.standard_normal((rank, W.shape[1]))
                          * np.abs(W).mean())
        step = 1e-3 * np.abs(best.U).max()
        candidates.append((best.U + step * rng.standard_normal(best.U.shape))
                          @ (best.V + 1e-3 * rng.standard_normal(best.V.shape)).T)
    for M in candidates:
        assert weighted_objective(W, M, H) >= optimum - slack


@pytest.mark.parametrize("c", [1e-3, 1.0, 7e4])
def test_weighted_lowrank_with_identity_gram_is_the_truncated_svd(backend, dtype_name, c):
    W64 = realistic_layer(40, 32, seed=26).W
    W = backend.asarray(W64, dtype_name)
    H = backend.asarray(c * np.eye(40), dtype_name)
    weighted, exact = weighted_lowrank(W, H, 7), truncated_svd(W, 7)
    tol = 1e3 * eps(dtype_name)
    np.testing.assert_allclose(as_float64(backend, weighted.V), as_float64(backend, exact.V),
                               atol=tol)
    np.testing.assert_allclose(as_float64(backend, weighted.U), as_float64(backend, exact.U),
                               atol=tol * np.abs(W64).max())


def test_weighted_lowrank_does_not_depend_on_the_scale_of_H(backend, dtype_name):
    problem = realistic_layer(48, 40, seed=27)
    W, H = backend.asarray(problem.W, dtype_name), backend.asarray(problem.H, dtype_name)
    reference = weighted_lowrank(W, H, 6)
    tol = 1e3 * eps(dtype_name)
    for c in (1e-4, 1e4):
        scaled = weighted_lowrank(W, backend.asarray(c * problem.H, dtype_name), 6)
        assert scaled.rel_error(W, H) == pytest.approx(reference.rel_error(W, H), rel=tol)
        np.testing.assert_allclose(as_float64(backend, scaled.dense()),
                                   as_float64(backend, reference.dense()),
                                   atol=tol * np.abs(problem.W).max())


def test_weighted_lowrank_null_space_component_is_zero():
    """Fewer samples than inputs: the minimiser is not unique; the one returned has no
    component in the null space of H (in the diagonally scaled coordinates D M)."""
    problem = realistic_layer(32, 24, n_samples=12, n_dead=2, seed=28)
    result = weighted_lowrank(problem.W, problem.H, 5)
    D = np.sqrt(np.diag(problem.H))
    _, s, Vt = np.linalg.svd(problem.X / np.where(D > 0, D, 1.0))
    null_basis = Vt[np.sum(s > 1e-10 * s[0]):]               # null space of D⁻¹ H D⁻¹
    assert np.abs(null_basis @ (D[:, None] * result.dense())).max() <= 1e-10 * np.abs(problem.W).max()


def test_weighted_lowrank_damping_minimises_the_damped_objective():
    problem = realistic_layer(40, 30, n_samples=20, seed=29)
    H = problem.H
    live = np.diag(H) > 0
    lam = 0.1 * np.diag(H)[live].mean()
    H_damped = H + lam * np.diag(live.astype(float))
    damped = weighted_lowrank(problem.W, H, 5, damping=0.1)
    W_live = np.where(live[:, None], problem.W, 0.0)
    direct = weighted_lowrank(W_live, H_damped, 5)
    assert weighted_objective(W_live, damped.dense(), H_damped) == pytest.approx(
        weighted_objective(W_live, direct.dense(), H_damped), rel=1e-10)


# --------------------------------------------------------------------------- result type, dtypes


def test_lowrank_result_methods(backend):
    problem = realistic_layer(24, 16, seed=30)
    W = backend.asarray(problem.W)
    result = truncated_svd(W, 4)
    assert result.rank == 4 and result.shape == (24, 16) and result.n_params == 4 * (24 + 16)
    assert result.history is None
    X = backend.asarray(problem.X[:5])
    np.testing.assert_allclose(backend.to_numpy(result.matmul(X)),
                               problem.X[:5] @ backend.to_numpy(result.dense()), rtol=1e-12,
                               atol=1e-12 * np.abs(problem.X).max())
    dense = backend.to_numpy(result.dense())
    assert result.rel_error(W) == pytest.approx(np.sum((dense - problem.W) ** 2)
                                                / np.sum(problem.W ** 2), rel=1e-12)
    assert result.rel_error(W, backend.asarray(problem.H)) == pytest.approx(
        weighted_objective(problem.W, dense, problem.H)
        / weighted_objective(problem.W, 0 * dense, problem.H), rel=1e-10)
    with pytest.raises(ValueError, match="X must have shape"):
        result.matmul(backend.asarray(np.ones((3, 5))))
    with pytest.raises(ValueError, match="LowRank needs U"):
        LowRank(result.U, result.V[:, :2])


@pytest.mark.parametrize("solver", ["truncated", "randomized", "weighted"])
def test_half_precision_input_computes_in_float32_on_its_device(backend, solver):
    if backend.name == "array_api_strict":
        pytest.skip("the strict namespace has no half precision")
    problem = realistic_layer(32, 24, seed=31)
    for half in ("float16", "bfloat16") if backend.name.startswith("torch") else ("float16",):
        W = backend.asarray(problem.W, half)
        if solver == "weighted":
            result = weighted_lowrank(W, backend.asarray(problem.H, half), 4)
        else:
            result = SOLVERS[solver](W, 4)
        assert_result_on_backend(backend, result, "float32")
        X = backend.asarray(problem.X[:3], half)
        assert result.matmul(X).dtype == backend.dtype("float32")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("solver", ["truncated", "randomized", "weighted"])
def test_bad_input_is_named(backend, solver):
    problem = realistic_layer(12, 8, seed=32)
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)

    def call(W=W, H=H, rank=3):
        if solver == "weighted":
            return weighted_lowrank(W, H, rank)
        return SOLVERS[solver](W, rank)

    for rank in (0, 9, -1):
        with pytest.raises(ValueError, match=r"rank must be an integer in \[1, \d+\] \(at most min\(d_in, d_out\)"):
            call(rank=rank)
    for rank in (2.5, True, "3", None):
        with pytest.raises(ValueError, match="rank must be an integer"):
            call(rank=rank)
    bad = problem.W.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        call(W=backend.asarray(bad))
    with pytest.raises(ValueError, match="W must be a 2-D matrix"):
        call(W=backend.asarray(problem.W[0]))
    if solver == "weighted":
        with pytest.raises(ValueError, match="H has shape"):
            call(H=backend.asarray(problem.H[:6, :6]))
        with pytest.raises(ValueError, match="H must be symmetric"):
            call(H=backend.asarray(problem.H + np.triu(np.ones((12, 12)), 1)))
        with pytest.raises(ValueError, match="H has an all-zero diagonal"):
            call(H=backend.asarray(np.zeros((12, 12))))
        with pytest.raises(ValueError, match="damping must be a real number >= 0"):
            weighted_lowrank(W, H, 3, damping=-1.0)


def test_mixed_namespaces_are_named():
    torch = pytest.importorskip("torch")
    problem = realistic_layer(12, 8, seed=33)
    with pytest.raises(TypeError, match="W and H come from different array libraries"):
        weighted_lowrank(problem.W, torch.asarray(problem.H), 3)


def test_randomized_svd_parameters_are_named():
    W = realistic_layer(12, 8, seed=34).W
    with pytest.raises(ValueError, match="oversampling must be an integer >= 0"):
        randomized_svd(W, 3, oversampling=-1)
    with pytest.raises(ValueError, match="power_iters must be an integer >= 0"):
        randomized_svd(W, 3, power_iters=1.5)
    with pytest.raises(TypeError, match="rng must be"):
        randomized_svd(W, 3, rng="seed")


# --------------------------------------------------------------------------- budget helper


@given(d_in=st.integers(1, 20000), d_out=st.integers(1, 20000),
       density=st.floats(1e-4, 1.0, exclude_min=False))
def test_rank_for_density_is_the_largest_that_fits(d_in, d_out, density):
    rank = lowrank_rank_for_density((d_in, d_out), density)
    assert 0 <= rank <= min(d_in, d_out)
    assert rank * (d_in + d_out) <= density * d_in * d_out
    assert (rank + 1) * (d_in + d_out) > density * d_in * d_out


def test_rank_for_density_examples_and_errors():
    assert lowrank_rank_for_density((4096, 4096), 0.5) == 1024
    assert lowrank_rank_for_density((4096, 11008), 0.25) == 4096 * 11008 // 4 // (4096 + 11008)
    assert lowrank_rank_for_density((2, 2), 0.5) == 0
    for density in (0.0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="density must be a real number in \\(0, 1\\]"):
            lowrank_rank_for_density((8, 8), density)
    with pytest.raises(ValueError, match="shape must be a pair of positive integers"):
        lowrank_rank_for_density((8, 0), 0.5)
    with pytest.raises(ValueError, match="shape must be a pair of positive integers"):
        lowrank_rank_for_density((8, 8, 8), 0.5)
