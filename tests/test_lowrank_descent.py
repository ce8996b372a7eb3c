"""Low-Rank-GD (HASSLE-free, Algorithm 1): it decreases the objective from its start, keeps the
best iterate, recovers from diverging steps, approaches the exact minimiser and never beats it,
does not depend on the scales of W and H, and names bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matfactor.lowrank_descent import _adam_lowrank, _balance_columns, hassle_free_learning_rate, lowrank_gd
from matfactor.svd import LowRank, truncated_svd, weighted_lowrank
from matfactor.testing import load_backend, realistic_layer
from problems import eps, layer_problems


def relative_objective(W: np.ndarray, U: np.ndarray, V: np.ndarray, H: np.ndarray) -> float:
    D = W - U @ V.T
    return float(np.sum(D * (H @ D)) / np.sum(W * (H @ W)))


def factors(backend, result: LowRank) -> tuple[np.ndarray, np.ndarray]:
    return (backend.to_numpy(result.U).astype(np.float64),
            backend.to_numpy(result.V).astype(np.float64))


@settings(max_examples=10)
@given(problem=layer_problems(), data=st.data())
def test_decreases_the_objective_and_returns_the_best_iterate(backend, dtype_name, problem, data):
    rank = data.draw(st.integers(1, min(problem.W.shape)), label="rank")
    init = data.draw(st.sampled_from([None, "random"]), label="init")
    scaled = data.draw(st.booleans(), label="scaled")
    W, H = backend.asarray(problem.W, dtype_name), backend.asarray(problem.H, dtype_name)
    result = lowrank_gd(W, H, rank, iters=60, init=init, scaled=scaled, rng=3)
    assert result.U.dtype == backend.dtype(dtype_name) and backend.same_device(result.U)
    assert result.V.dtype == backend.dtype(dtype_name) and backend.same_device(result.V)
    history = np.asarray(result.history)
    assert history.shape == (61,) and np.all(np.isfinite(history))
    U, V = factors(backend, result)
    W_in, H_in = (backend.to_numpy(a).astype(np.float64) for a in (W, H))
    found = relative_objective(W_in, U, V, H_in)
    tol = 100 * eps(dtype_name)      # the objective's expanded form: accurate to eps · tr(WᵀHW)
    # The result is the best evaluated iterate, and no worse than the start.
    assert found == pytest.approx(history.min(), abs=tol)
    assert found <= history[0] + tol
    # ... and it is a rank-r matrix with zero rows for dead inputs.
    assert np.all(U[problem.dead] == 0)
    # Never better than the exact minimiser (up to the objective's rounding).
    optimum = weighted_lowrank(W, H, rank).rel_error(W, H)
    assert found >= optimum - tol


def test_approaches_the_exact_minimiser_at_defaults(backend, dtype_name):
    problem = realistic_layer(96, 80, seed=41)
    W, H = backend.asarray(problem.W, dtype_name), backend.asarray(problem.H, dtype_name)
    optimum = weighted_lowrank(W, H, 10).rel_error(W, H)
    result = lowrank_gd(W, H, 10)
    start = result.history[0]
    assert optimum * (1 - 1e-4) <= result.rel_error(W, H) <= 1.01 * optimum
    assert start > 1.2 * optimum       # the diagonal-Hessian start was far from it


@pytest.mark.parametrize("scaled", [True, False])
def test_unscaled_and_random_start_also_converge(scaled):
    problem = realistic_layer(64, 48, seed=42)
    optimum = weighted_lowrank(problem.W, problem.H, 6).rel_error(problem.W, problem.H)
    for init in (None, "random"):
        result = lowrank_gd(problem.W, problem.H, 6, iters=600, init=init, scaled=scaled, rng=0)
        assert result.rel_error(problem.W, problem.H) <= 1.05 * optimum


def test_warm_start_at_the_optimum_keeps_it():
    """Adam's first steps kick the iterate off the optimum; the best iterate is kept."""
    problem = realistic_layer(48, 40, n_samples=24, seed=43)
    exact = weighted_lowrank(problem.W, problem.H, 5)
    optimum = exact.rel_error(problem.W, problem.H)
    result = lowrank_gd(problem.W, problem.H, 5, iters=30, init=exact)
    assert result.history[0] == pytest.approx(optimum, abs=1e-12)
    assert result.rel_error(problem.W, problem.H) == pytest.approx(optimum, rel=1e-9)


def test_recovers_from_a_diverging_learning_rate(backend):
    problem = realistic_layer(48, 40, seed=44)
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)
    result = lowrank_gd(W, H, 5, iters=200, lr=30.0, check_every=5)
    history = np.asarray(result.history)
    assert np.all(np.isfinite(backend.to_numpy(result.U)))
    assert history.max() > 2 * history.min()                       # it did diverge ...
    assert result.rel_error(W, H) == pytest.approx(history.min(), abs=1e-12)
    assert result.rel_error(W, H) < history[0]                      # ... and recovered
    optimum = weighted_lowrank(W, H, 5).rel_error(W, H)
    assert result.rel_error(W, H) <= 1.1 * optimum                 # halving found a working rate


def test_does_not_depend_on_the_scales_of_W_and_H(backend):
    problem = realistic_layer(40, 32, seed=45)
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)
    reference = lowrank_gd(W, H, 4, iters=40)
    for c_W, c_H in ((1.0, 1e-5), (1e4, 1.0), (1e-3, 1e6)):
        result = lowrank_gd(backend.asarray(c_W * problem.W), backend.asarray(c_H * problem.H), 4,
                            iters=40)
        # Equal to rounding, which Adam's normalised steps amplify on near-zero gradients.
        np.testing.assert_allclose(result.history, reference.history, rtol=1e-5)
        np.testing.assert_allclose(backend.to_numpy(result.dense()),
                                   c_W * backend.to_numpy(reference.dense()),
                                   atol=1e-5 * c_W * np.abs(problem.W).max())


def test_damping_minimises_the_damped_objective():
    problem = realistic_layer(40, 30, n_samples=20, seed=46)
    live = np.diag(problem.H) > 0
    H_damped = problem.H + 0.05 * np.diag(problem.H)[live].mean() * np.diag(live.astype(float))
    W_live = np.where(live[:, None], problem.W, 0.0)
    result = lowrank_gd(problem.W, problem.H, 4, damping=0.05, iters=400)
    optimum = weighted_lowrank(W_live, H_damped, 4).rel_error(W_live, H_damped)
    assert result.history[-1] >= optimum - 1e-12
    assert optimum - 1e-12 <= result.rel_error(W_live, H_damped) <= 1.01 * optimum


def test_random_start_is_reproducible(backend):
    problem = realistic_layer(32, 24, seed=47)
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)
    first = lowrank_gd(W, H, 3, iters=10, init="random", rng=5)
    second = lowrank_gd(W, H, 3, iters=10, init="random", rng=5)
    np.testing.assert_array_equal(backend.to_numpy(first.U), backend.to_numpy(second.U))
    assert first.history == second.history
    assert lowrank_gd(W, H, 3, iters=10, return_history=False).history is None


def test_half_precision_input_computes_in_float32(backend):
    if backend.name == "array_api_strict":
        pytest.skip("the strict namespace has no half precision")
    problem = realistic_layer(32, 24, seed=48)
    H_unit = problem.H / np.abs(problem.H).max()          # within float16's range
    W, H = backend.asarray(problem.W, "float16"), backend.asarray(H_unit, "float16")
    init = truncated_svd(W, 3)
    result = lowrank_gd(W, H, 3, iters=5, init=init)
    assert result.U.dtype == backend.dtype("float32") and backend.same_device(result.U)


def test_target_invisible_to_H_gives_the_exact_zero_solution(backend):
    """W nonzero only on dead inputs: tr(WᵀHW) = 0 and M = 0 is optimal."""
    problem = realistic_layer(16, 12, n_dead=3, seed=50)
    W64 = np.zeros_like(problem.W)
    W64[problem.dead] = 1.0
    result = lowrank_gd(backend.asarray(W64), backend.asarray(problem.H), 2)
    assert np.all(backend.to_numpy(result.dense()) == 0) and result.history == (0.0,)


def test_learning_rate_schedule_of_algorithm_2():
    assert hassle_free_learning_rate(1) == pytest.approx(1e-2 / 11)
    assert hassle_free_learning_rate(10, base_lr=0.1) == pytest.approx(0.1 / 20)
    assert hassle_free_learning_rate(0) == pytest.approx(1e-2 / 10)  # t = 0 is valid
    with pytest.raises(ValueError, match="iteration must be an integer >= 0"):
        hassle_free_learning_rate(-1)
    for base_lr in (0.0, -1e-2):
        with pytest.raises(ValueError, match="base_lr must be a real number > 0"):
            hassle_free_learning_rate(1, base_lr=base_lr)


def test_explicit_svd_init_is_the_default(backend):
    problem = realistic_layer(12, 8, seed=50)
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)
    default, explicit = lowrank_gd(W, H, 3, iters=5), lowrank_gd(W, H, 3, iters=5, init="svd")
    np.testing.assert_array_equal(backend.to_numpy(default.U), backend.to_numpy(explicit.U))
    np.testing.assert_array_equal(backend.to_numpy(default.V), backend.to_numpy(explicit.V))


def test_init_from_another_library_is_named(backend):
    """A LowRank ``init`` must come from ``W``'s library: a mixture is a TypeError naming both."""
    other = load_backend("array_api_strict" if backend.name == "numpy" else "numpy")
    problem = realistic_layer(12, 8, seed=51)
    init = truncated_svd(other.asarray(problem.W), 2)
    with pytest.raises(TypeError, match="W and init.U come from different array libraries"):
        lowrank_gd(backend.asarray(problem.W), backend.asarray(problem.H), 2, init=init)


def test_bad_input_is_named(backend):
    problem = realistic_layer(12, 8, seed=49)
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)
    for rank in (0, 9, 2.0):
        with pytest.raises(ValueError, match="rank must be an integer"):
            lowrank_gd(W, H, rank)
    with pytest.raises(ValueError, match="iters must be an integer >= 0"):
        lowrank_gd(W, H, 2, iters=-1)
    with pytest.raises(ValueError, match="lr must be a real number > 0"):
        lowrank_gd(W, H, 2, lr=0.0)
    with pytest.raises(ValueError, match="check_every must be an integer >= 1"):
        lowrank_gd(W, H, 2, check_every=0)
    with pytest.raises(ValueError, match="damping must be a real number >= 0"):
        lowrank_gd(W, H, 2, damping=float("nan"))
    with pytest.raises(ValueError, match="init must be None, 'svd', 'random' or a LowRank"):
        lowrank_gd(W, H, 2, init="zeros")
    with pytest.raises(ValueError, match="init has shape .* and rank 3, expected shape"):
        lowrank_gd(W, H, 2, init=truncated_svd(W, 3))
    with pytest.raises(ValueError, match="H has shape"):
        lowrank_gd(W, backend.asarray(problem.H[:4, :4]), 2)
    bad = problem.H.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="H contains NaN or Inf"):
        lowrank_gd(W, backend.asarray(bad), 2)


def reference_adam(H, T, U, V, iters, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """Adam (Kingma & Ba, 2015, Algorithm 1, bias-corrected) on ``f = tr(Dᵀ H D)``,
    ``D = T − U Vᵀ``, written out in NumPy: the history of ``f / f(0, 0)`` and the best iterate."""
    reference = np.sum(T * (H @ T))
    moments = [np.zeros_like(U), np.zeros_like(U), np.zeros_like(V), np.zeros_like(V)]
    history, best = [], (np.inf, U, V)
    for k in range(iters + 1):
        D = T - U @ V.T
        history.append(np.sum(D * (H @ D)) / reference)
        if history[-1] < best[0]:
            best = (history[-1], U, V)
        if k == iters:
            break
        grad_U, grad_V = -2 * H @ D @ V, -2 * (H @ D).T @ U
        step = k + 1
        new = []
        for (m, v), (x, g) in zip([moments[:2], moments[2:]], [(U, grad_U), (V, grad_V)]):
            m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
            m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
            new.append((x - lr * m_hat / (np.sqrt(v_hat) + eps), m, v))
        (U, m_U, v_U), (V, m_V, v_V) = new
        moments = [m_U, v_U, m_V, v_V]
    return np.asarray(history), best[1], best[2]


@pytest.mark.parametrize("check_every", [1, 4, 100])
def test_adam_engine_is_bias_corrected_adam(backend, check_every):
    """The engine's every step against Adam written out: a wrong moment, bias correction, step
    count, gradient or a spurious restart changes the history far above rounding."""
    rng = np.random.default_rng(52)
    X = rng.standard_normal((40, 10)) * np.linspace(0.2, 2.0, 10)
    H, T = X.T @ X, rng.standard_normal((10, 7))
    U0, V0 = 0.3 * rng.standard_normal((10, 3)), 0.3 * rng.standard_normal((7, 3))
    expected, U_best, V_best = reference_adam(H, T, U0, V0, iters=12, lr=0.05)
    assert np.all(np.diff(expected) < 0)  # a descent at this step size: no restart expected
    xp = backend.xp
    H_b, T_b = backend.asarray(H), backend.asarray(T)
    HT = H_b @ T_b
    U, V, history = _adam_lowrank(xp, H_b, HT, xp.sum(T_b * HT), backend.asarray(U0),
                                  backend.asarray(V0), iters=12, lr=0.05, check_every=check_every)
    np.testing.assert_allclose(history, expected, rtol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(U), U_best, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(V), V_best, rtol=1e-9, atol=1e-12)


def test_balance_columns_equalises_each_pair_and_keeps_the_product(backend):
    U = np.array([[3.0, 0.02, 0.0, 1.0], [4.0, 0.0, 0.0, 2.0]])
    V = np.array([[0.5, 0.1, 1.0, 0.0], [0.0, 0.3, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    U_b, V_b = (backend.to_numpy(x) for x in _balance_columns(backend.xp, backend.asarray(U),
                                                               backend.asarray(V)))
    np.testing.assert_allclose(U_b @ V_b.T, U @ V.T, rtol=1e-14, atol=1e-15)
    # Pairs 0 and 1 (norms far above and below 1) are balanced column by column ...
    np.testing.assert_allclose(np.linalg.norm(U_b[:, :2], axis=0), np.linalg.norm(V_b[:, :2], axis=0),
                               rtol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(U_b[:, :2], axis=0) ** 2,
                               np.linalg.norm(U[:, :2], axis=0) * np.linalg.norm(V[:, :2], axis=0),
                               rtol=1e-14)
    # ... and pairs with a zero column are left as they are.
    np.testing.assert_array_equal(U_b[:, 2:], U[:, 2:])
    np.testing.assert_array_equal(V_b[:, 2:], V[:, 2:])
