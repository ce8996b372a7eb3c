"""ADMM: the fixed-mask solve meets the optimality conditions of its convex problem and equals
the direct normal-equation solution; the gradual pruner meets its pattern; warm starts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matfactor import (
    AdmmState,
    ConvergenceWarning,
    admm_prune,
    admm_solve,
    layer_error,
    mask_satisfies,
    nnz_budget,
    wanda_prune,
)
from matfactor.testing import realistic_layer
from problems import PATTERNS, direct_masked_solution, layer_problems

# Relative size of the gradient on the support that counts as zero: the solver's default
# tolerance, times a margin for the conditioning of realistic Gram matrices.
GRADIENT_TOL = {"float64": 1e-8, "float32": 1e-3}


def damped(H: np.ndarray, damping: float) -> np.ndarray:
    """The Gram matrix of the objective ADMM minimises: H + λ·Diag(H)."""
    return H + damping * np.diag(np.diag(H))


@settings(max_examples=15)
@given(problem=layer_problems(), pattern=st.sampled_from(PATTERNS),
       damping=st.sampled_from([0.0, 0.01]))
def test_fixed_mask_solution_meets_optimality_conditions(backend, dtype_name, problem, pattern,
                                                         damping):
    density = None if ":" in pattern else 0.5
    if damping == 0:  # undamped rank-deficient H: see test_rank_deficient_undamped_...
        problem = realistic_layer(*problem.W.shape, n_samples=2 * problem.W.shape[0],
                                  seed=int(problem.W.shape[1]))
    W, H = backend.asarray(problem.W, dtype_name), backend.asarray(problem.H, dtype_name)
    mask = wanda_prune(W, H, density=density, pattern=pattern) != 0
    state = admm_solve(W, H, mask, damping=damping, return_state=True)
    assert state.converged
    assert state.Z.dtype == backend.dtype(dtype_name) and backend.same_device(state.Z)
    Z, mask = backend.to_numpy(state.Z).astype(np.float64), backend.to_numpy(mask)
    assert np.all(Z[~mask] == 0)                                     # exact zeros off the support
    H_obj = damped(problem.H, damping)
    gradient = H_obj @ (Z - problem.W)
    scale = np.abs(H_obj @ problem.W).max()
    assert np.abs(gradient[mask]).max() <= GRADIENT_TOL[dtype_name] * scale  # stationary on it


def test_rank_deficient_undamped_problem_warns_instead_of_failing_silently():
    """Fewer samples than inputs and no damping: ADMM converges sublinearly. Within a small
    iteration budget it must say so; with damping it converges."""
    problem = realistic_layer(16, 12, n_samples=8, n_dead=1, norm_spread=1.0, seed=4)
    mask = wanda_prune(problem.W, problem.H, density=0.5) != 0
    with pytest.warns(ConvergenceWarning, match="damping > 0"):
        state = admm_solve(problem.W, problem.H, mask, max_iters=50, return_state=True)
    assert not state.converged and state.iterations == 50
    assert admm_solve(problem.W, problem.H, mask, damping=0.01, return_state=True).converged


@pytest.mark.parametrize("pattern", ["unstructured", "per_output", "2:4"])
def test_fixed_mask_equals_direct_normal_equation_solution(backend, pattern):
    problem = realistic_layer(64, 48, seed=11)
    density = None if ":" in pattern else 0.5
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)
    mask = backend.to_numpy(wanda_prune(W, H, density=density, pattern=pattern) != 0)
    for damping in (0.0, 0.05):
        H_obj = damped(problem.H, damping)
        direct = direct_masked_solution(problem.W, H_obj, mask)
        solved = backend.to_numpy(admm_solve(W, H, backend.asarray(mask), damping=damping, tol=1e-13))
        # Same objective to rounding; the solution itself to the conditioning of H.
        assert layer_error(problem.W, solved, H_obj) == pytest.approx(
            layer_error(problem.W, direct, H_obj), rel=1e-10)
        np.testing.assert_allclose(solved, direct, atol=1e-6 * np.abs(direct).max())


@settings(max_examples=10)
@given(problem=layer_problems(min_dim=16), pattern=st.sampled_from(PATTERNS))
def test_admm_prune_meets_pattern_exactly_and_returns_its_state(backend, problem, pattern):
    density = None if ":" in pattern else 0.5
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)
    state = admm_prune(W, H, density=density, pattern=pattern, return_state=True)
    assert isinstance(state, AdmmState)
    assert mask_satisfies(state.mask, density, pattern)
    Z, mask = backend.to_numpy(state.Z), backend.to_numpy(state.mask)
    assert np.all(Z[~mask] == 0)
    assert np.all(Z[problem.dead] == 0)
    np.testing.assert_array_equal(Z, backend.to_numpy(admm_prune(W, H, density=density,
                                                                 pattern=pattern)))


@pytest.mark.parametrize("pattern", ["unstructured", "per_output", "2:4"])
def test_polishing_the_admm_mask_never_increases_the_error(backend, pattern):
    problem = realistic_layer(96, 64, seed=12)
    density = None if ":" in pattern else 0.5
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)
    state = admm_prune(W, H, density=density, pattern=pattern, return_state=True)
    polished = admm_solve(W, H, state.mask, warm_start=state, return_state=True)
    assert polished.converged
    before = layer_error(problem.W, backend.to_numpy(state.Z), problem.H)
    after = layer_error(problem.W, backend.to_numpy(polished.Z), problem.H)
    assert after <= before * (1 + 1e-12)
    np.testing.assert_array_equal(backend.to_numpy(polished.mask), backend.to_numpy(state.mask))


def test_warm_start_continues_the_iteration():
    """Ten iterations, then ten more from the state, equal twenty at once on a fixed mask."""
    problem = realistic_layer(48, 32, seed=13)
    first = admm_prune(problem.W, problem.H, density=0.5, iters=10, gradual_iters=0,
                       return_state=True)
    resumed = admm_prune(problem.W, problem.H, density=0.5, iters=10, gradual_iters=0,
                         warm_start=first, return_state=True)
    straight = admm_prune(problem.W, problem.H, density=0.5, iters=20, gradual_iters=0,
                          return_state=True)
    np.testing.assert_array_equal(resumed.mask, straight.mask)
    np.testing.assert_allclose(resumed.Z, straight.Z, rtol=1e-9, atol=1e-12)


def reference_admm_prune(W, H, density, iters, gradual_iters, damping=0.1, rho=1.0):
    """Eq. (1) of the DSF paper, section 3.1, written out in NumPy for an unstructured budget:
    ``diag(H) = 1`` preconditioning, damping on that diagonal, cold start ``Ŵ = W, U = 0``, the
    mask of step ``t < gradual_iters`` removing ``⌊(1 − (1 − (t+1)/g)³) P⌋`` of the ``P`` entries
    the final mask removes (smallest ``|Ŵ + U|``), then fixed."""
    scale = np.sqrt(np.diag(H))
    H_n = H / np.outer(scale, scale) + damping * np.eye(len(H))
    W_n = W * scale[:, None]
    inverse, target = np.linalg.inv(H_n + rho * np.eye(len(H))), H_n @ W_n
    size, keep = W.size, nnz_budget(W.shape, density, "unstructured")

    def top(V, count):
        mask = np.zeros(size, dtype=bool)
        mask[np.argsort(-np.abs(V), axis=None)[:count]] = True
        return mask.reshape(V.shape)

    W_hat, U = W_n, np.zeros_like(W_n)
    for t in range(iters + 1):
        V = W_hat + U
        if t < gradual_iters:
            fraction = 1.0 - (1.0 - (t + 1) / gradual_iters) ** 3
            mask = top(V, size - math.floor(fraction * (size - keep)))
        elif t == 0:
            mask = top(V, keep)
        Z, U = np.where(mask, V, 0.0), np.where(mask, 0.0, V)
        if t == iters:
            return Z / scale[:, None], mask
        W_hat = inverse @ (target + rho * (Z - U))


@pytest.mark.parametrize("iters, gradual_iters", [(6, 4), (3, 3), (4, 0), (1, 1)])
def test_admm_prune_is_equation_1_with_the_cubic_schedule(backend, iters, gradual_iters):
    """Every iteration, every schedule step and the final Z-update, against a plain reference:
    an iteration too many or too few, a schedule shifted by one step or a dropped update all
    change the result far above rounding."""
    problem = realistic_layer(16, 12, n_dead=0, seed=15)
    expected, expected_mask = reference_admm_prune(problem.W, problem.H, 0.5, iters, gradual_iters)
    state = admm_prune(backend.asarray(problem.W), backend.asarray(problem.H), density=0.5,
                       iters=iters, gradual_iters=gradual_iters, return_state=True)
    assert state.iterations == iters
    np.testing.assert_array_equal(backend.to_numpy(state.mask), expected_mask)
    np.testing.assert_allclose(backend.to_numpy(state.Z), expected, rtol=1e-9,
                               atol=1e-12 * np.abs(expected).max())


def test_gradual_selection_beats_a_fixed_initial_mask():
    """The cubic schedule must actually act, in every pattern: it finds better masks than
    fixing the Wanda mask at the start (gradual_iters=0) with the same iteration count."""
    for pattern in ("unstructured", "per_output", "2:4"):
        density = None if ":" in pattern else 0.5
        problem = realistic_layer(128, 128, seed=14)
        gradual = admm_prune(problem.W, problem.H, density=density, pattern=pattern)
        fixed = admm_prune(problem.W, problem.H, density=density, pattern=pattern, gradual_iters=0)
        assert layer_error(problem.W, gradual, problem.H) < layer_error(problem.W, fixed, problem.H)


def test_bad_parameters_are_named():
    problem = realistic_layer(16, 8, seed=15)
    W, H = problem.W, problem.H
    with pytest.raises(ValueError, match="gradual_iters must be an integer in \\[0, 3\\] \\(at most iters = 3\\), got 5"):
        admm_prune(W, H, density=0.5, iters=3, gradual_iters=5)
    with pytest.raises(ValueError, match="rho must be a real number > 0"):
        admm_prune(W, H, density=0.5, rho=0.0)
    with pytest.raises(ValueError, match="damping must be a real number >= 0"):
        admm_solve(W, H, W != 0, damping=-1.0)
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        admm_solve(W, H, np.ones_like(W))
    with pytest.raises(ValueError, match="mask must have shape"):
        admm_solve(W, H, np.ones((8, 8), dtype=bool))
    with pytest.raises(TypeError, match="warm_start must be an AdmmState"):
        admm_prune(W, H, density=0.5, warm_start=(W, W))
    with pytest.raises(ValueError, match="iters must be an integer >= 1"):
        admm_prune(W, H, density=0.5, iters=0, gradual_iters=0)
