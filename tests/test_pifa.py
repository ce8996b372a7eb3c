"""PIFA: pivoted QR on every backend, the lossless round trip for any rank-r input from both
constructors, the PIFA layer, parameter counts, rank checks and bad input."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import eps

from matfactor import _array
from matfactor.pifa import Pivoted, pifa_from_dense, pifa_from_factors, pifa_rank_for_density

# Relative Frobenius error ‖Ŵ − W‖ / ‖W‖ of a round trip, per compute dtype.
ROUND_TRIP_TOL = {"float32": 1e-5, "float64": 1e-12}


def rank_r_factors(d_in: int, d_out: int, rank: int, decades: float, seed: int,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Exactly rank-``rank`` factors with realistic scales, float64.

    Singular values spread over ``decades`` decades and heavy per-input and per-output scales
    (as in trained weights), with conditioning controlled so that the product is genuinely of
    rank ``rank`` in the dtype under test.
    """
    rng = np.random.default_rng(seed)
    Q_in = np.linalg.qr(rng.standard_normal((d_in, rank)))[0]
    Q_out = np.linalg.qr(rng.standard_normal((d_out, rank)))[0]
    singular = np.logspace(0, -decades, rank)
    U = np.exp(0.5 * rng.standard_normal((d_in, 1))) * Q_in * singular
    V = np.exp(0.5 * rng.standard_normal((d_out, 1))) * Q_out
    return U, V


@st.composite
def rank_r_problems(draw, max_dim: int = 32):
    d_in = draw(st.integers(2, max_dim))
    d_out = draw(st.integers(2, max_dim))
    rank = draw(st.integers(1, min(d_in, d_out)))
    decades = draw(st.sampled_from([0.0, 1.0, 2.0]))
    return rank_r_factors(d_in, d_out, rank, decades, draw(st.integers(0, 2**31 - 1)))


def relative_error(W_hat: np.ndarray, W: np.ndarray) -> float:
    return float(np.linalg.norm(W_hat.astype(np.float64) - W) / np.linalg.norm(W))


# --------------------------------------------------------------------------- pivoted QR


@settings(max_examples=10)
@given(factors=rank_r_problems())
def test_pivoted_qr_selects_independent_columns_with_non_increasing_r_diag(backend, dtype_name,
                                                                          factors):
    U, V = factors
    A_np = U @ V.T
    k = U.shape[1]
    A = backend.asarray(A_np, dtype_name)
    pivots, R = _array.pivoted_qr(backend.xp, A, k)
    _, R_diag = _array.pivoted_qr_pivots(backend.xp, A, k)
    assert backend.same_device(pivots) and backend.same_device(R)
    pivots, R, R_diag = backend.to_numpy(pivots), backend.to_numpy(R), backend.to_numpy(R_diag)
    assert pivots.shape == (k,) and R.shape == (k, A_np.shape[1])
    assert len(set(pivots.tolist())) == k and pivots.min() >= 0 and pivots.max() < A_np.shape[1]
    tol = 100 * eps(dtype_name)
    # |R_11| is the largest column norm, and |R_jj| never increases.
    assert R_diag[0] == pytest.approx(np.linalg.norm(A_np, axis=0).max(), rel=tol)
    assert np.all(R_diag[1:] <= R_diag[:-1] * (1 + tol))
    # The pivot columns are independent: A[:, pivots] = Q R11 with Q orthonormal.
    R11 = np.triu(R[:, pivots].astype(np.float64))
    Q = np.linalg.solve(R11.T, A_np[:, pivots].T).T
    np.testing.assert_allclose(Q.T @ Q, np.eye(k), atol=1e3 * eps(dtype_name) * np.linalg.cond(R11))
    assert np.linalg.matrix_rank(A_np[:, pivots]) == k
    # Q R is A (exactly rank k): R carries every column, in the original order.
    np.testing.assert_allclose(Q @ R, A_np, atol=1e3 * eps(dtype_name) * np.abs(A_np).max()
                               * np.linalg.cond(R11))


def test_generic_pivoted_qr_matches_lapack_on_nearly_dependent_columns():
    """At a numerical rank (here 3, the rest 1e-7 below) downdated column norms cancel; the
    generic path's exact norms pick the same pivots as LAPACK's xGEQP3, and |R_jj| stays
    non-increasing past the rank. Downdating alone (a large ``refresh``) still finds the rank
    but orders the noise pivots wrongly, which is why it is not the default."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 60))
    A = base + 1e-7 * rng.standard_normal((40, 60)) * np.logspace(0, -2, 60)
    xp = array_api_compat.array_namespace(A)
    lapack_pivots, lapack = _array.pivoted_qr_pivots(xp, A, 8)
    pivots, R = _array._generic_pivoted_qr(xp, A, 8, refresh=1)
    generic = np.abs(np.diag(R[:, pivots]))
    np.testing.assert_array_equal(pivots, lapack_pivots)
    np.testing.assert_allclose(generic, lapack, rtol=1e-6)
    assert np.all(np.diff(generic) <= 0)
    pivots, R = _array._generic_pivoted_qr(xp, A, 8, refresh=100)
    downdated = np.abs(np.diag(R[:, pivots]))
    np.testing.assert_allclose(downdated[:3], lapack[:3], rtol=1e-12)
    assert np.all(downdated[3:] < 1e-6)


def test_generic_pivoted_qr_on_torch_matches_lapack():
    """The on-device path that CUDA runs, exercised with PyTorch on the CPU (where
    pivoted_qr itself calls LAPACK)."""
    torch = pytest.importorskip("torch")
    U, V = rank_r_factors(24, 50, 9, 2.0, seed=13)
    A = U @ V.T
    xp = array_api_compat.array_namespace(torch.asarray(A))
    pivots, R = _array._generic_pivoted_qr(xp, torch.asarray(A), 9, 1)
    lapack_pivots, lapack_R = _array.pivoted_qr(xp, torch.asarray(A), 9)
    np.testing.assert_array_equal(pivots.numpy(), lapack_pivots.numpy())
    # Householder signs may differ: compare |R| in the original column order.
    np.testing.assert_allclose(np.abs(R.numpy()), np.abs(lapack_R.numpy()), atol=1e-12)


def test_pivoted_qr_rejects_bad_k():
    A = np.ones((3, 5))
    xp = array_api_compat.array_namespace(A)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, min\(m, n\) = 3\]"):
        _array.pivoted_qr(xp, A, 4)
    with pytest.raises(ValueError, match="A must be a 2-D matrix"):
        _array.pivoted_qr(xp, np.ones(3), 1)


# --------------------------------------------------------------------------- round trip


@settings(max_examples=10)
@given(factors=rank_r_problems())
def test_round_trip_is_lossless_for_any_rank_r_input(backend, dtype_name, factors):
    U_np, V_np = factors
    U, V = backend.asarray(U_np, dtype_name), backend.asarray(V_np, dtype_name)
    # The reference is the product of the factors as the backend holds them.
    U_np, V_np = backend.to_numpy(U).astype(np.float64), backend.to_numpy(V).astype(np.float64)
    W_np = U_np @ V_np.T
    rank = U_np.shape[1]
    for result in (pifa_from_dense(U @ V.T, rank), pifa_from_factors(U, V)):
        assert isinstance(result, Pivoted) and result.rank == rank
        assert result.W_p.dtype == backend.dtype(dtype_name) and backend.same_device(result.W_p)
        assert backend.same_device(result.pivots) and backend.same_device(result.C)
        assert relative_error(backend.to_numpy(result.dense()), W_np) <= ROUND_TRIP_TOL[dtype_name]
        # W_p holds the pivot columns themselves.
        pivots = backend.to_numpy(result.pivots)
        assert relative_error(backend.to_numpy(result.W_p), W_np[:, pivots]) \
            <= ROUND_TRIP_TOL[dtype_name]
        non_pivots = backend.to_numpy(result.non_pivots)
        np.testing.assert_array_equal(np.sort(np.concatenate([pivots, non_pivots])),
                                      np.arange(W_np.shape[1]))
        assert np.all(np.diff(non_pivots) > 0)


@pytest.mark.parametrize("shape", [(24, 24), (16, 40), (40, 16)])
def test_full_rank_pifa_reproduces_any_matrix(backend, shape):
    W = np.random.default_rng(1).standard_normal(shape)
    result = pifa_from_dense(backend.asarray(W), min(shape))
    assert result.C.shape == (min(shape), shape[1] - min(shape))
    assert relative_error(backend.to_numpy(result.dense()), W) <= 1e-12


def test_higher_rank_input_gives_the_least_squares_fit_on_the_pivot_columns():
    """Beyond its rank, pifa is the column-subset (interpolative) approximation: C is the
    least-squares fit of the other columns on the pivot columns."""
    W = np.random.default_rng(2).standard_normal((30, 20))
    result = pifa_from_dense(W, 8)
    pivots, non_pivots = result.pivots, result.non_pivots
    C_ls = np.linalg.lstsq(W[:, pivots], W[:, non_pivots], rcond=None)[0]
    np.testing.assert_allclose(result.C, C_ls, atol=1e-10)


def test_factors_and_dense_constructors_agree(backend):
    U, V = rank_r_factors(48, 36, 12, 2.0, seed=3)
    from_dense = pifa_from_dense(backend.asarray(U @ V.T), 12)
    from_factors = pifa_from_factors(backend.asarray(U), backend.asarray(V))
    np.testing.assert_allclose(backend.to_numpy(from_factors.dense()),
                               backend.to_numpy(from_dense.dense()), atol=1e-12)


# --------------------------------------------------------------------------- the layer


def test_matmul_is_the_dense_layer(backend, dtype_name):
    U, V = rank_r_factors(40, 56, 17, 1.0, seed=4)
    W = U @ V.T
    result = pifa_from_factors(backend.asarray(U, dtype_name), backend.asarray(V, dtype_name))
    X = np.random.default_rng(5).standard_normal((33, 40))
    Y = backend.to_numpy(result.matmul(backend.asarray(X, dtype_name))).astype(np.float64)
    assert relative_error(Y, X @ W) <= ROUND_TRIP_TOL[dtype_name]
    # Leading batch dimensions, as a layer sees them.
    X3 = X.reshape(3, 11, 40)
    Y3 = backend.to_numpy(result.matmul(backend.asarray(X3, dtype_name)))
    assert Y3.shape == (3, 11, 56)
    np.testing.assert_allclose(Y3.reshape(33, 56), Y, rtol=0, atol=10 * eps(dtype_name) * np.abs(Y).max())
    with pytest.raises(ValueError, match=r"X must have shape \(\.\.\., d_in\) with d_in = 40"):
        result.matmul(backend.asarray(X[:, :39], dtype_name))


def test_half_precision_is_computed_in_float32():
    torch = pytest.importorskip("torch")
    U, V = rank_r_factors(32, 24, 6, 1.0, seed=6)
    for half, half_eps in ((torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)):
        W = torch.asarray(U @ V.T).to(half)
        result = pifa_from_dense(W, 6)
        assert result.W_p.dtype == torch.float32 and result.C.dtype == torch.float32
        factors = pifa_from_factors(torch.asarray(U).to(half), torch.asarray(V).to(half))
        assert factors.W_p.dtype == torch.float32
        Y = result.matmul(torch.ones(5, 32, dtype=half))  # X is cast to the factors' dtype
        assert Y.dtype == torch.float32
        # Rounded to half precision, W is of rank 6 only to that precision.
        assert relative_error(result.dense().numpy(), W.float().numpy()) < 10 * half_eps


def test_counts(backend):
    U, V = rank_r_factors(50, 30, 9, 0.0, seed=7)
    result = pifa_from_factors(backend.asarray(U), backend.asarray(V))
    assert result.shape == (50, 30) and result.rank == 9
    assert result.n_params == 9 * (50 + 30 - 9)
    assert result.n_params == result.W_p.shape[0] * result.W_p.shape[1] \
        + result.C.shape[0] * result.C.shape[1]
    assert result.n_indices == 9
    assert result.rel_error(backend.asarray(U @ V.T)) < 1e-24
    H = np.eye(50)
    assert result.rel_error(backend.asarray(U @ V.T), backend.asarray(H)) < 1e-24


# --------------------------------------------------------------------------- rank checks


def test_rank_deficient_input_is_rejected_naming_the_rank(backend, dtype_name):
    U, V = rank_r_factors(30, 25, 6, 1.0, seed=8)
    W = backend.asarray(U @ V.T, dtype_name)     # rank 6, asked for rank 7
    with pytest.raises(ValueError, match="rank=7 exceeds the numerical rank of W"):
        pifa_from_dense(W, 7)
    U_deficient = U.copy()
    U_deficient[:, -1] = U[:, :-1] @ np.arange(1.0, 6.0)  # U of rank 5
    with pytest.raises(ValueError, match=r"rank=6 exceeds the numerical rank of U @ V.T"):
        pifa_from_factors(backend.asarray(U_deficient, dtype_name), backend.asarray(V, dtype_name))
    V_deficient = V.copy()
    V_deficient[:, 0] = V[:, 1] - V[:, 2]                   # V of rank 5
    with pytest.raises(ValueError, match="rank=6 exceeds"):
        pifa_from_factors(backend.asarray(U, dtype_name), backend.asarray(V_deficient, dtype_name))
    with pytest.raises(ValueError, match="W is zero"):
        pifa_from_dense(backend.asarray(np.zeros((4, 5)), dtype_name), 2)
    # rtol = 0 accepts anything but an exactly singular block.
    assert pifa_from_dense(W, 7, rtol=0.0).rank == 7


@pytest.mark.parametrize("rtol", [None, 1e-6])
def test_rank_test_is_the_pivot_ratio_against_rtol(backend, rtol):
    """The rank test is ``|R_rr| / |R_11| > rtol``, relative to the largest pivot, with the
    documented default ``rtol = 10·√max(m, n)·eps``: two orthogonal columns of norms ``c`` and
    ``c·δ`` pass just above ``rtol`` and fail just below it."""
    m, n = 64, 2
    threshold = 10 * np.sqrt(m) * np.finfo(np.float64).eps if rtol is None else rtol
    Q = np.linalg.qr(np.random.default_rng(9).standard_normal((m, n)))[0]
    for factor, passes in ((1.05, True), (0.9, False)):
        W = backend.asarray(Q * [3.0, 3.0 * factor * threshold], "float64")
        if passes:
            assert pifa_from_dense(W, 2, rtol=rtol).rank == 2
        else:
            with pytest.raises(ValueError, match="rank=2 exceeds the numerical rank of W"):
                pifa_from_dense(W, 2, rtol=rtol)
    # pifa_from_factors applies the same test to U Vᵀ, with the rtol it is given.
    U, V = Q * [3.0, 3.0 * 1e-3], np.linalg.qr(np.random.default_rng(10).standard_normal((5, 2)))[0]
    U, V = backend.asarray(U, "float64"), backend.asarray(V, "float64")
    assert pifa_from_factors(U, V, rtol=1e-4).rank == 2
    with pytest.raises(ValueError, match="rank=2 exceeds the numerical rank of U @ V.T"):
        pifa_from_factors(U, V, rtol=1e-2)
    # rtol = 0 still rejects an exactly singular pivot block.
    with pytest.raises(ValueError, match="rank=2 exceeds the numerical rank of W"):
        pifa_from_dense(backend.asarray(Q * [3.0, 0.0], "float64"), 2, rtol=0.0)


# --------------------------------------------------------------------------- budget


@given(d_in=st.integers(1, 5000), d_out=st.integers(1, 5000),
       density=st.floats(0.0, 1.0, exclude_min=True))
def test_rank_for_density_is_the_largest_rank_within_budget(d_in, d_out, density):
    budget = density * d_in * d_out
    try:
        r = pifa_rank_for_density((d_in, d_out), density)
    except ValueError as error:
        assert "too small" in str(error) and d_in + d_out - 1 > budget
        return
    assert 1 <= r <= min(d_in, d_out)
    assert r * (d_in + d_out - r) <= budget * (1 + 1e-12)
    assert r == min(d_in, d_out) or (r + 1) * (d_in + d_out - r - 1) > budget


def test_rank_for_density_examples():
    assert pifa_rank_for_density((1024, 1024), 1.0) == 1024
    assert pifa_rank_for_density((4096, 11008), 1.0) == 4096
    # Square d at density ρ: r ≈ d (1 − √(1 − ρ)), against d ρ / 2 for two factors.
    assert pifa_rank_for_density((4096, 4096), 0.5) == 1199
    with pytest.raises(ValueError, match=r"density must be a real number in \(0, 1\]"):
        pifa_rank_for_density((8, 8), 1.5)
    with pytest.raises(ValueError, match="shape must be"):
        pifa_rank_for_density((8,), 0.5)
    with pytest.raises(ValueError, match="too small"):
        pifa_rank_for_density((100, 100), 1e-3)
    assert pifa_rank_for_density((4096, 4096), 0.5, multiple_of=8) == 1192
    assert pifa_rank_for_density((1024, 1024), 0.5, multiple_of=64) == 256
    with pytest.raises(ValueError, match="rank 8 already needs"):
        pifa_rank_for_density((100, 100), 0.1, multiple_of=8)
    with pytest.raises(ValueError, match="multiple_of must be an integer >= 1"):
        pifa_rank_for_density((8, 8), 0.5, multiple_of=0)


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_named(backend):
    W = backend.asarray(np.ones((6, 5)))
    for rank in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 5\]"):
            pifa_from_dense(W, rank)
    with pytest.raises(ValueError, match="W must be a 2-D matrix"):
        pifa_from_dense(backend.asarray(np.ones(6)), 1)
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        pifa_from_dense(backend.asarray(np.full((6, 5), np.nan)), 1)
    with pytest.raises(ValueError, match="rtol must be a real number in"):
        pifa_from_dense(W, 1, rtol=-1.0)
    U, V = backend.asarray(np.ones((6, 2))), backend.asarray(np.ones((5, 3)))
    with pytest.raises(ValueError, match="U has shape .* and V has shape .* both must have r columns"):
        pifa_from_factors(U, V)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 2\].*U.shape\[1\]"):
        pifa_from_factors(backend.asarray(np.ones((2, 3))), backend.asarray(np.ones((5, 3))))
    with pytest.raises(ValueError, match="V contains NaN or Inf"):
        pifa_from_factors(backend.asarray(np.ones((6, 2))), backend.asarray(np.full((5, 2), np.inf)))
    with pytest.raises(TypeError, match="W must be an array"):
        pifa_from_dense([[1.0, 2.0]], 1)


def test_inconsistent_pivoted_is_rejected():
    with pytest.raises(ValueError, match="C must have shape"):
        Pivoted(np.arange(2), np.arange(2, 5), np.ones((4, 2)), np.ones((2, 2)))


def test_matmul_differentiates_through_the_factors():
    """The in-place fast path yields to autograd: a PIFA layer can be fine-tuned (appendix
    B.3 fine-tunes W_p and C)."""
    torch = pytest.importorskip("torch")
    U, V = rank_r_factors(12, 10, 4, 0.0, seed=11)
    layer = pifa_from_factors(torch.asarray(U), torch.asarray(V))
    W_p = layer.W_p.clone().requires_grad_(True)
    C = layer.C.clone().requires_grad_(True)
    trainable = Pivoted(layer.pivots, layer.non_pivots, W_p, C)
    X = torch.asarray(np.random.default_rng(12).standard_normal((7, 12)))
    trainable.matmul(X).square().sum().backward()
    assert W_p.grad is not None and C.grad is not None
    with torch.no_grad():
        np.testing.assert_allclose(trainable.matmul(X).numpy(), layer.matmul(X).numpy(), atol=1e-12)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_round_trip_through_the_generic_path_on_torch(monkeypatch, dtype_name):
    """What CUDA runs (PyTorch on the CPU otherwise calls LAPACK for the pivots)."""
    torch = pytest.importorskip("torch")
    import matfactor.pifa as pifa_module

    monkeypatch.setattr(pifa_module, "pivoted_qr",
                        lambda xp, A, k: _array._generic_pivoted_qr(xp, A, k, 1))
    U, V = rank_r_factors(40, 64, 15, 2.0, seed=14)
    dtype = getattr(torch, dtype_name)
    U_t, V_t = torch.asarray(U).to(dtype), torch.asarray(V).to(dtype)
    W = (U_t.double() @ V_t.double().T).numpy()
    for result in (pifa_from_dense(U_t @ V_t.T, 15), pifa_from_factors(U_t, V_t)):
        assert relative_error(result.dense().numpy(), W) <= ROUND_TRIP_TOL[dtype_name]
    with pytest.raises(ValueError, match="rank=16 exceeds"):
        pifa_from_dense(U_t @ V_t.T, 16)
