"""MPIFA reconstruction: streaming statistics, the closed-form factor updates against their
normal equations, the objective, and mpifa against its whitened-SVD starting point."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matfactor.pifa import Pivoted
from matfactor.reconstruct import (
    ReconstructionStatistics,
    mpifa,
    mpifa_lowrank,
    update_U,
    update_V,
)
from matfactor.svd import weighted_lowrank
from matfactor.testing import realistic_layer
from problems import eps


def two_streams(d_in: int, d_out: int, n_samples: int, drift: float, seed: int,
                n_dead: int | None = None):
    """A realistic layer and its inputs in the dense and in the compressed stream.

    The compressed stream carries the error accumulated upstream: a correlated perturbation
    of relative size ``drift`` (dead inputs stay dead in both streams).
    """
    problem = realistic_layer(d_in, d_out, n_samples=n_samples, n_dead=n_dead, seed=seed)
    rng = np.random.default_rng(seed + 1)
    X_dense = problem.X
    mixing = np.eye(d_in) + 0.3 * rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
    X_compressed = X_dense @ mixing + drift * rng.standard_normal(X_dense.shape) * X_dense.std(0)
    X_compressed[:, problem.dead] = 0.0
    return problem.W, X_dense, X_compressed


def accumulate(backend, X_dense, X_compressed, dtype_name, batch, **options):
    statistics = ReconstructionStatistics(**options)
    for start in range(0, X_dense.shape[0], batch):
        statistics.update(backend.asarray(X_dense[start:start + batch], dtype_name),
                          backend.asarray(X_compressed[start:start + batch], dtype_name))
    return statistics


def brute_objective(W, W_hat, X_dense, X_compressed, mix, a=0.0):
    target = (mix * X_dense + (1 - mix) * X_compressed) @ W
    residual = target - X_compressed @ W_hat
    return (np.sum(residual**2) + a * np.sum((W - W_hat)**2)) / np.sum(target**2)


# --------------------------------------------------------------------------- statistics


@settings(max_examples=10)
@given(batch=st.integers(1, 100), seed=st.integers(0, 1000))
def test_batches_accumulate_to_the_statistics_of_all_samples(backend, dtype_name, batch, seed):
    W, X_o, X_u = two_streams(24, 16, 100, 0.2, seed)
    streamed = accumulate(backend, X_o, X_u, dtype_name, batch, track_error_gram=True)
    at_once = accumulate(backend, X_o, X_u, dtype_name, X_o.shape[0], track_error_gram=True)
    assert streamed.n_samples == at_once.n_samples == 100 and streamed.d_in == 24
    error = X_o - X_u
    expected = {"H": X_u.T @ X_u, "error_cross": X_u.T @ error, "error_gram": error.T @ error}
    for name, value in expected.items():
        for statistics in (streamed, at_once):
            got = getattr(statistics, name)
            assert got.dtype == backend.dtype(dtype_name) and backend.same_device(got)
            np.testing.assert_allclose(backend.to_numpy(got), value, rtol=0,
                                       atol=200 * eps(dtype_name) * np.abs(expected["H"]).max())
    target = backend.to_numpy(streamed.target(backend.asarray(W, dtype_name), mix=0.25))
    Y_t = (0.25 * X_o + 0.75 * X_u) @ W
    np.testing.assert_allclose(target, X_u.T @ Y_t, rtol=0,
                               atol=200 * eps(dtype_name) * np.abs(X_u.T @ Y_t).max())


def test_batches_may_have_leading_dimensions_and_one_stream():
    W, X_o, _ = two_streams(16, 8, 60, 0.0, seed=2)
    flat = ReconstructionStatistics().update(X_o)
    shaped = ReconstructionStatistics().update(X_o.reshape(3, 20, 16), X_o.reshape(3, 20, 16))
    np.testing.assert_allclose(shaped.H, flat.H)
    assert np.all(flat.error_cross == 0) and flat.n_samples == 60


def test_to_device_copies_the_sums_and_leaves_the_original(backend):
    _, X_o, X_u = two_streams(12, 4, 40, 0.3, seed=3)
    statistics = accumulate(backend, X_o, X_u, "float64", 40, track_error_gram=True)
    moved = statistics.to_device(backend.device)
    assert moved is not statistics and moved.n_samples == statistics.n_samples == 40
    for name in ("H", "error_cross", "error_gram"):
        assert backend.same_device(getattr(moved, name))
        np.testing.assert_array_equal(backend.to_numpy(getattr(moved, name)),
                                      backend.to_numpy(getattr(statistics, name)))
    moved.update(backend.asarray(X_o, "float64"), backend.asarray(X_u, "float64"))
    assert moved.n_samples == 80 and statistics.n_samples == 40


def test_accumulation_dtype():
    torch = pytest.importorskip("torch")
    X = torch.ones(4, 3, dtype=torch.float16)
    assert ReconstructionStatistics().update(X, X).H.dtype == torch.float32
    X64 = torch.ones(4, 3, dtype=torch.float64)
    assert ReconstructionStatistics().update(X64).H.dtype == torch.float64
    forced = ReconstructionStatistics(dtype="float64").update(torch.ones(4, 3), torch.zeros(4, 3))
    assert forced.H.dtype == torch.float64 and forced.error_cross.dtype == torch.float64
    mixed = ReconstructionStatistics().update(torch.ones(4, 3)).update(X64)  # cast to float32
    assert mixed.H.dtype == torch.float32


def test_objective_matches_its_definition(backend, dtype_name):
    W, X_o, X_u = two_streams(32, 24, 200, 0.3, seed=3)
    statistics = accumulate(backend, X_o, X_u, dtype_name, 64, track_error_gram=True)
    W_hat = W + 0.1 * np.random.default_rng(4).standard_normal(W.shape) * np.abs(W).mean()
    a_relative = 0.01
    a = a_relative * np.mean(np.diag(X_u.T @ X_u))
    for mix in (0.0, 0.25, 1.0):
        got = statistics.objective(backend.asarray(W, dtype_name), backend.asarray(W_hat, dtype_name),
                                   mix, alpha=a_relative)
        expected = brute_objective(W, W_hat, X_o, X_u, mix, a)
        assert got == pytest.approx(expected, rel=1e3 * eps(dtype_name))


@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_target_weight_completes_the_square(backend, dtype_name, mix):
    """``f(Ŵ) = tr((Ŵ − T)ᵀ (H + aI) (Ŵ − T)) + const``: differences of f are quadratic forms in Ŵ − T."""
    W, X_o, X_u = two_streams(32, 24, 200, 0.3, seed=5)
    statistics = accumulate(backend, X_o, X_u, dtype_name, 64)
    alpha = 1e-2
    T = backend.to_numpy(statistics.target_weight(backend.asarray(W, dtype_name), mix, alpha)).astype(float)
    assert T.shape == W.shape and backend.same_device(statistics.target_weight(
        backend.asarray(W, dtype_name), mix, alpha))
    a = alpha * np.mean(np.diag(X_u.T @ X_u))
    H_a = X_u.T @ X_u + a * np.eye(32)
    rng = np.random.default_rng(6)
    target_norm = np.sum(((mix * X_o + (1 - mix) * X_u) @ W) ** 2)
    for _ in range(3):
        W_1, W_2 = (W + 0.2 * rng.standard_normal(W.shape) * np.abs(W).mean() for _ in range(2))
        quadratic = [np.sum((Wh - T) * (H_a @ (Wh - T))) for Wh in (W_1, W_2)]
        brute = [brute_objective(W, Wh, X_o, X_u, mix, a) for Wh in (W_1, W_2)]
        assert (brute[0] - brute[1]) * target_norm == pytest.approx(
            quadratic[0] - quadratic[1], rel=1e4 * eps(dtype_name), abs=1e3 * eps(dtype_name) * target_norm)
    if mix == 0.0:
        np.testing.assert_allclose(T, W, rtol=10 * eps(dtype_name))


# --------------------------------------------------------------------------- factor updates


@pytest.mark.parametrize("alpha", [0.0, 1e-3])
def test_factor_updates_satisfy_their_normal_equations(backend, dtype_name, alpha):
    """Eq. (5) and eqs. (8)–(9) (transposed) are exact block minimisers: the gradient of
    ‖Y_t − X_u U Vᵀ‖² + a‖W − UVᵀ‖² with respect to the updated factor vanishes to rounding
    (against the size of the terms that cancel; a wrong update leaves it of order 1)."""
    W, X_o, X_u = two_streams(48, 40, 400, 0.2, seed=5, n_dead=0)  # full-rank H for alpha = 0
    H_np, G_np = X_u.T @ X_u, X_u.T @ ((0.25 * X_o + 0.75 * X_u) @ W)
    a = alpha * np.mean(np.diag(H_np))
    H_reg, G_reg = H_np + a * np.eye(48), G_np + a * W
    H, G = backend.asarray(H_np, dtype_name), backend.asarray(G_np, dtype_name)
    W_b = backend.asarray(W, dtype_name)
    start = weighted_lowrank(backend.asarray(W, dtype_name), H, 10)
    tol = 100 * eps(dtype_name)

    V = update_V(start.U, H, G, W=W_b, alpha=alpha)
    assert V.shape == (40, 10) and V.dtype == backend.dtype(dtype_name) and backend.same_device(V)
    U_np, V_np = backend.to_numpy(start.U).astype(np.float64), backend.to_numpy(V).astype(np.float64)
    gram = U_np.T @ H_reg @ U_np
    gradient = V_np @ gram - G_reg.T @ U_np
    assert np.abs(gradient).max() <= tol * np.abs(G_reg.T @ U_np).max()

    U = update_U(V, H, G, W=W_b, alpha=alpha)
    assert U.shape == (48, 10) and backend.same_device(U)
    U_np = backend.to_numpy(U).astype(np.float64)
    gradient = H_reg @ U_np @ (V_np.T @ V_np) - G_reg @ V_np
    assert np.abs(gradient).max() <= tol * np.abs(G_reg @ V_np).max()


def test_updates_do_not_depend_on_the_scale_of_the_statistics():
    W, X_o, X_u = two_streams(24, 20, 100, 0.2, seed=6)
    H, G = X_u.T @ X_u, X_u.T @ ((0.25 * X_o + 0.75 * X_u) @ W)
    U = weighted_lowrank(W, H, 6).U
    for scale in (1e-6, 1e6):
        np.testing.assert_allclose(update_V(U, scale * H, scale * G, W=W, alpha=1e-2),
                                   update_V(U, H, G, W=W, alpha=1e-2), rtol=1e-8, atol=1e-12)
        V = update_V(U, H, G, W=W, alpha=1e-2)
        np.testing.assert_allclose(update_U(V, scale * H, scale * G, W=W, alpha=1e-2),
                                   update_U(V, H, G, W=W, alpha=1e-2), rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- mpifa


@pytest.mark.parametrize("mix", [0.0, 0.25, 1.0])
def test_mpifa_never_loses_to_its_whitened_svd_start(backend, dtype_name, mix):
    """On the objective it minimises (eqs. 6, 7, 9), MPIFA is at most the whitened SVD of W
    (its starting point): every block update is an exact minimiser. The closed-form global
    minimiser (init="target") is at most either."""
    W, X_o, X_u = two_streams(40, 32, 150, 0.3, seed=7)
    statistics = accumulate(backend, X_o, X_u, dtype_name, 50, track_error_gram=True)
    W_b = backend.asarray(W, dtype_name)
    rank, alpha = 12, 1e-3

    def objective(lowrank):
        return statistics.objective(W_b, lowrank.dense(), mix, alpha=alpha)

    start = objective(weighted_lowrank(W_b, statistics.H, rank))
    slack = 1 + 1e3 * eps(dtype_name)
    values = [objective(mpifa_lowrank(W_b, statistics, rank, mix=mix, alpha=alpha, iters=iters))
              for iters in (1, 2, 6)]
    exact = objective(mpifa_lowrank(W_b, statistics, rank, mix=mix, alpha=alpha, init="target",
                                    iters=0))
    assert values[0] <= start * slack
    assert values[1] <= values[0] * slack and values[2] <= values[1] * slack
    assert exact <= values[2] * slack
    if mix > 0:  # the whitened SVD ignores the accumulated error; MPIFA corrects it
        assert values[0] < 0.95 * start


def test_mpifa_is_pifa_of_the_reconstructed_factors(backend, dtype_name):
    W, X_o, X_u = two_streams(40, 32, 150, 0.3, seed=8)
    statistics = accumulate(backend, X_o, X_u, dtype_name, 64)
    W_b = backend.asarray(W, dtype_name)
    factors = mpifa_lowrank(W_b, statistics, 10)
    layer = mpifa(W_b, statistics, 10)
    assert isinstance(layer, Pivoted) and layer.rank == 10 and layer.n_params == 10 * (40 + 32 - 10)
    assert layer.W_p.dtype == backend.dtype(dtype_name) and backend.same_device(layer.W_p)
    dense = backend.to_numpy(factors.dense()).astype(np.float64)
    np.testing.assert_allclose(backend.to_numpy(layer.dense()), dense, rtol=0,
                               atol=1e3 * eps(dtype_name) * np.abs(dense).max())


def test_dead_inputs_and_few_samples_need_the_regulariser():
    W, X_o, X_u = two_streams(32, 24, 16, 0.2, seed=9)  # 16 samples < 32 inputs, dead inputs
    statistics = ReconstructionStatistics().update(X_o, X_u)
    assert mpifa(W, statistics, 8).rank == 8
    assert np.all(np.isfinite(mpifa_lowrank(W, statistics, 8).dense()))
    with pytest.raises(ValueError, match="need alpha > 0"):
        mpifa_lowrank(W, statistics, 8, alpha=0.0, init="target")


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_named(backend):
    W, X_o, X_u = two_streams(16, 12, 40, 0.2, seed=10)
    statistics = accumulate(backend, X_o, X_u, "float64", 40)
    W_b = backend.asarray(W)
    with pytest.raises(ValueError, match="no batch has been added"):
        mpifa(W_b, ReconstructionStatistics(), 4)
    with pytest.raises(TypeError, match="statistics must be a ReconstructionStatistics"):
        mpifa(W_b, statistics.H, 4)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, \d+\] \(at most min\(d_in, d_out\)"):
        mpifa(W_b, statistics, 13)
    with pytest.raises(ValueError, match="the statistics were accumulated for d_in = 16"):
        mpifa(backend.asarray(W[:8]), statistics, 4)
    with pytest.raises(ValueError, match=r"mix must be a real number in \[0, 1\]"):
        mpifa(W_b, statistics, 4, mix=1.5)
    with pytest.raises(ValueError, match="alpha must be a real number >= 0"):
        mpifa(W_b, statistics, 4, alpha=-1.0)
    with pytest.raises(ValueError, match="init must be one of"):
        mpifa(W_b, statistics, 4, init="svd")
    with pytest.raises(ValueError, match="iters must be an integer >= 0"):
        mpifa(W_b, statistics, 4, iters=-1)
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        mpifa(backend.asarray(np.full_like(W, np.nan)), statistics, 4)
    with pytest.raises(ValueError, match=r"X_compressed has .* but X_dense has"):
        ReconstructionStatistics().update(backend.asarray(X_o), backend.asarray(X_u[:10]))
    with pytest.raises(ValueError, match="X_dense has d_in = 8"):
        statistics.update(backend.asarray(X_o[:, :8]))
    with pytest.raises(ValueError, match="X_dense must have shape"):
        ReconstructionStatistics().update(backend.asarray(X_o[0]))
    with pytest.raises(ValueError, match="dtype must be None, 'float32' or 'float64'"):
        ReconstructionStatistics(dtype="float16")
    with pytest.raises(ValueError, match="needs error_gram when the two streams differ"):
        statistics.objective(W_b, W_b, 0.25)
    with pytest.raises(ValueError, match="alpha > 0 regularises towards W"):
        update_U(backend.asarray(np.ones((12, 2))), statistics.H, statistics.target(W_b), alpha=0.1)
    with pytest.raises(ValueError, match="U has shape .* U must have 16 rows"):
        update_V(backend.asarray(np.ones((12, 2))), statistics.H, statistics.target(W_b))


def test_non_finite_batches_are_named():
    X = np.ones((4, 3))
    X[1, 2] = np.nan
    with pytest.raises(ValueError, match="X_compressed contains NaN or Inf"):
        ReconstructionStatistics().update(np.ones((4, 3)), X)
    with pytest.raises(ValueError, match="X_dense contains NaN or Inf"):
        ReconstructionStatistics().update(X)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_statistics_of_any_magnitude_accumulate_exactly(dtype_name):
    # Activations at 2**-100 or 2**80 (after an all-zero batch) in float32: H itself is
    # beyond the dtype's range, but the sums are kept as S * 2**e, so MPIFA gets exactly the
    # factors of the unscaled statistics; where H is representable, it is exact.
    problem = realistic_layer(16, 12, seed=5)
    X = problem.X.astype(dtype_name)
    X_compressed = (problem.X * 1.01).astype(dtype_name)
    W = problem.W.astype(dtype_name)
    reference = ReconstructionStatistics().update(X[:20], X_compressed[:20]) \
        .update(X[20:], X_compressed[20:])
    expected = mpifa_lowrank(W, reference, 3)
    for exponent in (-100, -20, 80):
        scale = 2.0 ** exponent
        statistics = ReconstructionStatistics()
        statistics.update(np.zeros((5, 16), dtype=dtype_name))
        statistics.update(X[:20] * scale, X_compressed[:20] * scale)
        statistics.update(X[20:] * scale, X_compressed[20:] * scale)
        assert statistics.n_samples == X.shape[0] + 5
        result = mpifa_lowrank(W, statistics, 3)
        np.testing.assert_array_equal(result.U, expected.U)
        np.testing.assert_array_equal(result.V, expected.V)
        if exponent == -20:
            np.testing.assert_array_equal(statistics.H, reference.H * scale * scale)


def test_weight_init_is_the_whitened_svd_of_w(backend, dtype_name):
    """Step 2 with ``init="weight"`` (the default) is SVD-LLM's truncation-aware whitening of
    ``W`` under ``H``: with no sweep after it, ``mpifa_lowrank`` returns exactly that."""
    W, X_o, X_u = two_streams(40, 32, 150, 0.3, seed=8)
    statistics = accumulate(backend, X_o, X_u, dtype_name, 50)
    W_b = backend.asarray(W, dtype_name)
    start = backend.to_numpy(weighted_lowrank(W_b, statistics.H, 6).dense())
    for init in ("weight", None):
        options = {} if init is None else {"init": init}
        result = backend.to_numpy(mpifa_lowrank(W_b, statistics, 6, iters=0, **options).dense())
        np.testing.assert_allclose(result, start, rtol=0,
                                   atol=1e2 * eps(dtype_name) * np.abs(start).max())
    target = mpifa_lowrank(W_b, statistics, 6, iters=0, init="target")
    assert tuple(target.U.shape) == (40, 6) and tuple(target.V.shape) == (32, 6)
    target = backend.to_numpy(target.dense())
    assert np.linalg.matrix_rank(target) == 6
    assert np.abs(target - start).max() > 1e3 * eps(dtype_name) * np.abs(start).max()


def test_statistics_without_signal_are_an_error_and_one_live_input_is_not(backend):
    """``H = 0`` (every calibration input zero) is an error; one live input of any scale is a
    valid rank-1 problem."""
    rng = np.random.default_rng(10)
    W = backend.asarray(rng.standard_normal((6, 5)))
    zero = accumulate(backend, np.zeros((20, 6)), np.zeros((20, 6)), "float64", 10)
    with pytest.raises(ValueError, match="statistics.H is zero"):
        mpifa_lowrank(W, zero, 1)
    X = np.zeros((16, 6))
    X[:, 2] = 0.25  # H = e₂e₂ᵀ: a power of two, which the scaling of the statistics keeps exact
    one = accumulate(backend, X, X, "float64", 8)
    for init in ("weight", "target"):
        assert mpifa_lowrank(W, one, 1, init=init).rank == 1
