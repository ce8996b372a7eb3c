"""The Sylvester-type solve M A N + ρ A = C (DSF paper, appendix A.1)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matfactor.sylvester import SylvesterSolver
from matfactor.testing import load_backend, realistic_layer


def psd(rng: np.random.Generator, n: int, rank: int | None = None, spread: float = 1e3) -> np.ndarray:
    """A PSD matrix with eigenvalues spread over orders of magnitude (rank-deficient if asked)."""
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    eigenvalues = np.exp(rng.uniform(0, np.log(spread), n))
    if rank is not None:
        eigenvalues[rank:] = 0
    return (Q * eigenvalues) @ Q.T


@settings(max_examples=15)
@given(p=st.integers(1, 12), q=st.integers(1, 12), rho=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
       singular=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_residual_is_at_rounding_level(backend, dtype_name, p, q, rho, singular, seed):
    rng = np.random.default_rng(seed)
    M = psd(rng, p, rank=p // 2 if singular else None)
    N = psd(rng, q)
    C = rng.standard_normal((p, q))
    solver = SylvesterSolver(backend.asarray(M, dtype_name), backend.asarray(N, dtype_name))
    A_backend = solver.solve(backend.asarray(C, dtype_name), rho)
    assert A_backend.dtype == backend.dtype(dtype_name) and backend.same_device(A_backend)
    A = backend.to_numpy(A_backend).astype(np.float64)
    residual = np.linalg.norm(M @ A @ N + rho * A - C)
    scale = np.linalg.norm(M, 2) * np.linalg.norm(A) * np.linalg.norm(N, 2) + rho * np.linalg.norm(A) \
        + np.linalg.norm(C)
    assert residual <= 50 * np.finfo(dtype_name).eps * max(p, q) * scale


@pytest.mark.parametrize("p, q", [(1, 1), (3, 5), (6, 4)])
def test_agrees_with_dense_kronecker_solve(backend, p, q):
    rng = np.random.default_rng(p * 10 + q)
    M, N, C = psd(rng, p, spread=10), psd(rng, q, spread=10), rng.standard_normal((p, q))
    solver = SylvesterSolver(backend.asarray(M), backend.asarray(N))
    for rho in (0.0, 0.5):
        # vec(M A N) = (Nᵀ ⊗ M) vec(A) with column-major vec.
        system = np.kron(N.T, M) + rho * np.eye(p * q)
        expected = np.linalg.solve(system, C.flatten(order="F")).reshape((p, q), order="F")
        A = backend.to_numpy(solver.solve(backend.asarray(C), rho))
        np.testing.assert_allclose(A, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_one_decomposition_serves_many_rho_and_right_hand_sides(backend):
    """The DSF use: H A (BBᵀ) + ρA = C for a realistic, singular H (dead inputs)."""
    problem = realistic_layer(32, 24, n_dead=3, seed=1)
    rng = np.random.default_rng(2)
    B = rng.standard_normal((8, 24)) * (rng.random((8, 24)) < 0.5)
    N = B @ B.T
    solver = SylvesterSolver(backend.asarray(problem.H), backend.asarray(N))
    for rho in (0.03, 1.0):
        for _ in range(2):
            C = rng.standard_normal((32, 8))
            A = backend.to_numpy(solver.solve(backend.asarray(C), rho))
            residual = problem.H @ A @ N + rho * A - C
            assert np.linalg.norm(residual) <= 1e-9 * np.linalg.norm(C)


def test_bad_input_is_named(backend):
    M, N = np.eye(3), np.eye(2)
    with pytest.raises(ValueError, match="M must be a square"):
        SylvesterSolver(backend.asarray(np.ones((3, 2))), backend.asarray(N))
    with pytest.raises(ValueError, match="N must be symmetric"):
        SylvesterSolver(backend.asarray(M), backend.asarray(np.array([[1.0, 1.0], [0.0, 1.0]])))
    with pytest.raises(ValueError, match="M contains NaN or Inf"):
        SylvesterSolver(backend.asarray(np.full((3, 3), np.nan)), backend.asarray(N))
    solver = SylvesterSolver(backend.asarray(M), backend.asarray(N))
    with pytest.raises(ValueError, match="C must have shape \\(3, 2\\)"):
        solver.solve(backend.asarray(np.ones((2, 3))), 1.0)
    with pytest.raises(ValueError, match="rho must be a real number >= 0"):
        solver.solve(backend.asarray(np.ones((3, 2))), -1.0)
    singular = SylvesterSolver(backend.asarray(np.diag([1.0, 0.0, 2.0])), backend.asarray(N))
    with pytest.raises(ValueError, match="singular"):
        singular.solve(backend.asarray(np.ones((3, 2))), 0.0)
    assert np.all(np.isfinite(backend.to_numpy(singular.solve(backend.asarray(np.ones((3, 2))), 1.0))))


def test_right_hand_side_from_another_library_is_named(backend):
    """``C`` must come from the library of ``M`` and ``N``: a mixture is a TypeError naming both."""
    other = load_backend("array_api_strict" if backend.name == "numpy" else "numpy")
    solver = SylvesterSolver(backend.asarray(np.eye(3)), backend.asarray(np.eye(2)))
    with pytest.raises(TypeError, match="M and C come from different array libraries"):
        solver.solve(other.asarray(np.ones((3, 2))), 1.0)
