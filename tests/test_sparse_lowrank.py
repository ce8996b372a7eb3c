"""Sparse plus low-rank (HASSLE-free, Algorithm 2; OATS as its diagonal case): the sparse part
meets its pattern and budget, the low-rank part its rank, the result is the best iterate by the
true objective and never worse than the start, the diagonal and identity variants are the OATS
and data-free computations done by hand, the full Hessian beats the diagonal one, each
factorization is done once, and bad input is named."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import eps, layer_problems

import matfactor.sparse_lowrank as sparse_lowrank_module
from matfactor.pruning import magnitude_prune, wanda_prune
from matfactor.sparse_lowrank import (
    SparsePlusLowRank,
    sparse_lowrank_budget,
    sparse_lowrank_rank,
    sparse_plus_lowrank,
)
from matfactor.sparsity import mask_satisfies, nnz_budget
from matfactor.svd import LowRank
from matfactor.testing import realistic_layer

PRUNERS = ["magnitude", "wanda", "sparsegpt", "admm"]


def to64(backend, x) -> np.ndarray:
    return backend.to_numpy(x).astype(np.float64)


def relative_objective(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray | None) -> float:
    D = W - W_hat
    if H is None:
        return float(np.sum(D * D) / np.sum(W * W))
    return float(np.sum(D * (H @ D)) / np.sum(W * (H @ W)))


@settings(max_examples=8)
@given(problem=layer_problems(max_dim=32), data=st.data())
def test_meets_pattern_rank_and_returns_the_best_iterate(backend, dtype_name, problem, data):
    pattern = data.draw(st.sampled_from(["unstructured", "per_output", "2:4", "1:4"]), label="pattern")
    density = None if ":" in pattern else data.draw(st.sampled_from([0.3, 0.5]), label="density")
    pruner = data.draw(st.sampled_from(PRUNERS), label="pruner")
    lowrank = data.draw(st.sampled_from(["gd", "exact"]), label="lowrank")
    hessian = data.draw(st.sampled_from(["full", "diagonal", "identity"]), label="hessian")
    rank = data.draw(st.integers(1, max(1, min(problem.W.shape) // 4)), label="rank")
    W, H = backend.asarray(problem.W, dtype_name), backend.asarray(problem.H, dtype_name)
    iters = 4
    result = sparse_plus_lowrank(W, H, rank, density=density, pattern=pattern, pruner=pruner,
                                 lowrank=lowrank, hessian=hessian, iters=iters, lowrank_iters=10)
    for part in (result.S, result.U, result.V):
        assert part.dtype == backend.dtype(dtype_name) and backend.same_device(part)
    S, U, V = to64(backend, result.S), to64(backend, result.U), to64(backend, result.V)
    # The sparse part is within its pattern and never above its budget; the low-rank part has
    # r columns (so rank at most r).
    assert mask_satisfies(S != 0, density, pattern, exact=False)
    assert np.count_nonzero(S) <= nnz_budget(S.shape, density, pattern)
    assert U.shape == (problem.W.shape[0], rank) and V.shape == (problem.W.shape[1], rank)
    assert np.linalg.matrix_rank(U @ V.T) <= rank
    # The result is the iterate of least true objective, and no worse than the start (S = 0, M = 0).
    history = np.asarray(result.history)
    assert history.shape == (iters + 1,) and np.all(np.isfinite(history))
    assert history[0] == 1.0
    assert result.best_iteration == int(np.argmin(history))
    found = relative_objective(to64(backend, W), S + U @ V.T, to64(backend, H))
    assert found == pytest.approx(history.min(), rel=1e-4 if dtype_name == "float32" else 1e-10)
    assert found <= history[0]


def test_exact_budget_on_a_layer_without_dead_inputs(backend, dtype_name):
    problem = realistic_layer(64, 40, n_dead=0, seed=7)
    W, H = backend.asarray(problem.W, dtype_name), backend.asarray(problem.H, dtype_name)
    for pattern, density in [("unstructured", 0.4), ("per_output", 0.5), ("2:4", None)]:
        result = sparse_plus_lowrank(W, H, 3, density=density, pattern=pattern, iters=3,
                                     lowrank_iters=5)
        assert mask_satisfies(to64(backend, result.S) != 0, density, pattern)


@pytest.mark.parametrize("pruner", PRUNERS)
def test_warm_start_is_iterate_zero_and_never_lost(backend, pruner):
    """Continuing from a good decomposition with any pruner never returns anything worse."""
    problem = realistic_layer(48, 40, seed=11)
    W, H = backend.asarray(problem.W, "float64"), backend.asarray(problem.H, "float64")
    good = sparse_plus_lowrank(W, H, 4, pattern="2:4", lowrank="exact", iters=6)
    continued = sparse_plus_lowrank(W, H, 4, pattern="2:4", pruner=pruner, iters=2,
                                    lowrank_iters=5, init=good)
    assert continued.history[0] == pytest.approx(min(good.history), rel=1e-12)
    assert min(continued.history) <= continued.history[0]
    assert continued.rel_error(W, H) <= good.rel_error(W, H) * (1 + 1e-12)
    from_lowrank = sparse_plus_lowrank(W, H, 4, pattern="2:4", iters=2, lowrank_iters=5,
                                       init=good.lowrank)
    expected = relative_objective(to64(backend, W), to64(backend, good.lowrank.dense()),
                                  to64(backend, H))
    assert from_lowrank.history[0] == pytest.approx(expected, rel=1e-12)


def _hard_threshold(A: np.ndarray, scores: np.ndarray, density: float | None, pattern: str) -> np.ndarray:
    """Keep the top scores under the pattern (ties cannot occur on these continuous inputs)."""
    d_in, d_out = A.shape
    keep = np.zeros(A.shape, dtype=bool)
    if pattern == "unstructured":
        count = math.floor(density * d_in * d_out + 1e-9)
        keep.flat[np.argsort(-scores, axis=None)[:count]] = True
    elif pattern == "per_output":
        count = math.floor(density * d_in + 1e-9)
        rows = np.argsort(-scores, axis=0)[:count]
        keep[rows, np.arange(d_out)[None, :]] = True
    else:
        n, m = (int(v) for v in pattern.split(":"))
        groups = scores.reshape(d_in // m, m, d_out)
        order = np.argsort(-groups, axis=1)[:, :n, :]
        group_keep = np.zeros(groups.shape, dtype=bool)
        np.put_along_axis(group_keep, order, True, axis=1)
        keep = group_keep.reshape(d_in, d_out)
    return np.where(keep, A, 0.0)


def _by_hand(W: np.ndarray, H: np.ndarray | None, rank: int, density: float | None,
             pattern: str, iters: int, hessian: str) -> tuple[list, list]:
    """OATS (Corollary 4.2) or its data-free version, written out: scale by D = √diag(H) (or 1),
    hard-threshold, truncated SVD, alternate from M = 0; iterates judged by the true objective."""
    D = np.sqrt(np.diag(H)) if hessian == "diagonal" else np.ones(W.shape[0])
    W_scaled = D[:, None] * W
    M_scaled = np.zeros_like(W)
    iterates, history = [], [1.0]
    for _ in range(iters):
        residual = W_scaled - M_scaled
        S_scaled = _hard_threshold(residual, np.abs(residual), density, pattern)
        A, s, Bh = np.linalg.svd(W_scaled - S_scaled, full_matrices=False)
        M_scaled = (A[:, :rank] * s[:rank]) @ Bh[:rank, :]
        S, M = S_scaled / D[:, None], M_scaled / D[:, None]
        iterates.append((S, M))
        history.append(relative_objective(W, S + M, H))
    return iterates, history


@pytest.mark.parametrize("hessian", ["diagonal", "identity"])
@pytest.mark.parametrize("pattern,density", [("unstructured", 0.4), ("per_output", 0.5), ("2:4", None)])
def test_diagonal_and_identity_variants_are_oats_and_data_free_by_hand(backend, hessian, pattern,
                                                                       density):
    """float64 only: in float32 a near-tie of two scores may flip one mask decision, which is a
    different but equally valid iterate, not an error."""
    problem = realistic_layer(32, 24, n_dead=0, seed=5)
    iterates, history = _by_hand(problem.W, problem.H, 3, density, pattern, 6, hessian)
    W, H = backend.asarray(problem.W, "float64"), backend.asarray(problem.H, "float64")
    result = sparse_plus_lowrank(W, H, 3, density=density, pattern=pattern, hessian=hessian,
                                 iters=6)
    np.testing.assert_allclose(result.history, history, rtol=1e-9)
    best = int(np.argmin(history))
    assert result.best_iteration == best
    S, M = iterates[best - 1]
    np.testing.assert_allclose(to64(backend, result.S), S, atol=1e-10 * np.abs(S).max())
    np.testing.assert_allclose(to64(backend, result.lowrank.dense()), M,
                               atol=1e-10 * np.abs(M).max())


def test_data_free_variant_needs_no_H(backend):
    problem = realistic_layer(32, 24, n_dead=0, seed=5)
    _, history = _by_hand(problem.W, None, 3, 0.5, "unstructured", 4, "identity")
    result = sparse_plus_lowrank(backend.asarray(problem.W, "float64"), None, 3, density=0.5,
                                 hessian="identity", iters=4)
    np.testing.assert_allclose(result.history, history, rtol=1e-9)


@pytest.mark.parametrize("lowrank", ["gd", "exact"])
def test_full_hessian_beats_the_diagonal_one(lowrank):
    """Figure 1 of the paper on a realistic layer: 2:4 plus a rank of d/64 (rank 64 at 4096)."""
    problem = realistic_layer(256, 192, seed=21)
    full = sparse_plus_lowrank(problem.W, problem.H, 4, pattern="2:4", lowrank=lowrank, iters=20)
    oats = sparse_plus_lowrank(problem.W, problem.H, 4, pattern="2:4", hessian="diagonal",
                               iters=20)
    assert full.rel_error(problem.W, problem.H) < 0.8 * oats.rel_error(problem.W, problem.H)


def test_never_worse_than_its_pruner_followed_by_a_lowrank_fit():
    """Iterate 1 is the pruner on W plus the exact low-rank fit of the remainder."""
    problem = realistic_layer(64, 48, seed=2)
    result = sparse_plus_lowrank(problem.W, problem.H, 4, pattern="2:4", lowrank="exact", iters=5)
    assert result.history[1] == min(result.history[:2])
    assert min(result.history) <= result.history[1]


def test_each_factorization_is_done_once(monkeypatch):
    calls = {"_sparsegpt_factor": 0, "_admm_factor": 0, "_whiten": 0}
    for name in calls:
        original = getattr(sparse_lowrank_module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(sparse_lowrank_module, name, counted)
    problem = realistic_layer(32, 24, seed=3)
    sparse_plus_lowrank(problem.W, problem.H, 2, pattern="2:4", pruner="sparsegpt",
                        lowrank="exact", iters=5)
    sparse_plus_lowrank(problem.W, problem.H, 2, pattern="2:4", pruner="admm", iters=5,
                        lowrank_iters=5)
    assert calls == {"_sparsegpt_factor": 1, "_admm_factor": 1, "_whiten": 1}


def test_a_callable_pruner_is_called_once_per_iteration_and_checked(backend):
    problem = realistic_layer(32, 24, seed=8)
    W, H = backend.asarray(problem.W, "float64"), backend.asarray(problem.H, "float64")
    seen = []

    def my_wanda(W, H, *, density=None, pattern="unstructured"):
        seen.append(pattern)
        return wanda_prune(W, H, density=density, pattern=pattern)

    mine = sparse_plus_lowrank(W, H, 2, pattern="2:4", pruner=my_wanda, lowrank="exact", iters=3)
    builtin = sparse_plus_lowrank(W, H, 2, pattern="2:4", pruner="wanda", lowrank="exact", iters=3)
    assert seen == ["2:4"] * 3
    np.testing.assert_allclose(mine.history, builtin.history, rtol=1e-12)

    def dense_pruner(W, H, *, density=None, pattern="unstructured"):
        return W
    with pytest.raises(ValueError, match="pruner returned a weight outside pattern '2:4'"):
        sparse_plus_lowrank(W, H, 2, pattern="2:4", pruner=dense_pruner, iters=2)


def test_a_callable_pruner_receives_the_density_and_its_options(backend):
    """A user pruner gets the problem's density and pattern and every ``pruner_options`` entry."""
    problem = realistic_layer(32, 24, seed=8)
    W, H = backend.asarray(problem.W, "float64"), backend.asarray(problem.H, "float64")
    seen = []

    def my_magnitude(W, H, *, density=None, pattern="unstructured", scale=1.0):
        seen.append((density, pattern, scale))
        return magnitude_prune(W, density=density, pattern=pattern)

    sparse_plus_lowrank(W, H, 2, density=0.4, pruner=my_magnitude, lowrank="exact", iters=2,
                        pruner_options={"scale": 3.0})
    assert seen == [(0.4, "unstructured", 3.0)] * 2


def test_random_start_is_reproducible(backend):
    problem = realistic_layer(32, 24, seed=9)
    W, H = backend.asarray(problem.W, "float64"), backend.asarray(problem.H, "float64")
    runs = [sparse_plus_lowrank(W, H, 2, pattern="2:4", init="random", rng=5, iters=3,
                                lowrank_iters=5) for _ in range(2)]
    assert runs[0].history == runs[1].history


def test_dense_matmul_pifa_and_parameter_count(backend, dtype_name):
    problem = realistic_layer(48, 40, seed=4)
    W, H = backend.asarray(problem.W, dtype_name), backend.asarray(problem.H, dtype_name)
    result = sparse_plus_lowrank(W, H, 5, density=0.3, iters=3, lowrank_iters=5)
    X = backend.asarray(problem.X[:16], dtype_name)
    tol = 100 * eps(dtype_name)
    dense = to64(backend, result.dense())
    product = to64(backend, result.matmul(X))
    np.testing.assert_allclose(product, to64(backend, X) @ dense, atol=tol * np.abs(product).max())
    pivoted = result.pifa()
    lowrank = to64(backend, result.lowrank.dense())
    np.testing.assert_allclose(to64(backend, pivoted.dense()), lowrank,
                               atol=1e3 * eps(dtype_name) * np.abs(lowrank).max())
    nnz = int(np.count_nonzero(to64(backend, result.S)))
    assert result.nnz == nnz
    assert result.n_params == nnz + 5 * (48 + 40)
    assert pivoted.n_params == result.n_params - nnz - 5 * 5


def test_budget_helpers_follow_the_paper():
    # Section 5: r = ⌊(1 − ρ − N/M) d_in d_out / (d_in + d_out)⌋ (Llama-3-8B, 2:8 at ρ = 0.5).
    assert sparse_lowrank_rank((4096, 4096), 0.5, pattern="2:8") == 512
    assert sparse_lowrank_rank((4096, 14336), 0.5, pattern="4:8") == 0
    # Appendix A.3: κ = 0.3, ρ = 0.5.
    budget = sparse_lowrank_budget((4096, 4096), 0.5, 0.3)
    assert budget.rank == math.floor(0.3 * 0.5 * 4096 * 4096 / 8192)
    assert budget.nnz == math.floor(0.7 * 0.5 * 4096 * 4096)
    assert nnz_budget((4096, 4096), budget.density, "unstructured") == budget.nnz


@given(d_in=st.integers(1, 5000), d_out=st.integers(1, 5000),
       compression=st.floats(0.0, 0.99), pattern=st.sampled_from(["1:4", "2:4", "2:8", "3:8"]),
       rank_ratio=st.floats(0.01, 0.99))
def test_budgets_fit_and_are_the_largest_that_do(d_in, d_out, compression, pattern, rank_ratio):
    m = int(pattern.split(":")[1])
    d_in = m * max(1, d_in // m)
    size, kept = d_in * d_out, (1 - compression) * d_in * d_out
    sparse = nnz_budget((d_in, d_out), None, pattern)
    if sparse > kept + 1e-9 * size:
        with pytest.raises(ValueError, match="alone keeps"):
            sparse_lowrank_rank((d_in, d_out), compression, pattern=pattern)
        return
    rank = sparse_lowrank_rank((d_in, d_out), compression, pattern=pattern)
    assert 0 <= rank <= min(d_in, d_out)
    assert sparse + rank * (d_in + d_out) <= kept + 1e-6 * size
    if rank < min(d_in, d_out):
        assert sparse + (rank + 1) * (d_in + d_out) > kept - 1e-6 * size
    budget = sparse_lowrank_budget((d_in, d_out), compression, rank_ratio)
    assert budget.nnz + budget.rank * (d_in + d_out) <= kept + 1e-6 * size
    assert nnz_budget((d_in, d_out), budget.density, "unstructured") == budget.nnz


def test_bad_input_is_named():
    problem = realistic_layer(32, 24, seed=1)
    W, H = problem.W, problem.H
    cases = [
        (dict(rank=0), ValueError, "rank"),
        (dict(rank=25), ValueError, "rank"),
        (dict(rank=2.5), ValueError, "rank"),
        (dict(pattern="3:2", density=None), ValueError, "pattern"),
        (dict(pattern="2:5", density=None), ValueError, "d_in divisible by m = 5"),
        (dict(density=1.5), ValueError, "density"),
        (dict(density=0.3, pattern="2:4"), ValueError, "density=0.3 contradicts"),
        (dict(pruner="obs"), ValueError, "pruner"),
        (dict(lowrank="svd"), ValueError, "lowrank"),
        (dict(hessian="block"), ValueError, "hessian"),
        (dict(iters=0), ValueError, "iters"),
        (dict(lowrank_iters=0), ValueError, "lowrank_iters"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(pruner_options={"dampening": 0.1}), TypeError, "dampening"),
        (dict(pruner_options={"damping": -0.1}), ValueError, "damping must be a real number > 0"),
        (dict(pruner="admm", pruner_options={"gradual_iters": 30}), ValueError, "gradual_iters"),
        (dict(init="svd"), ValueError, "init"),
        (dict(init=LowRank(np.zeros((32, 3)), np.zeros((24, 3)))), ValueError, "init"),
    ]
    for changes, error, message in cases:
        arguments = dict(rank=2, density=0.5, pattern="unstructured", iters=1, lowrank_iters=1)
        arguments.update(changes)
        rank = arguments.pop("rank")
        with pytest.raises(error, match=message):
            sparse_plus_lowrank(W, H, rank, **arguments)
    with pytest.raises(ValueError, match="H has shape"):
        sparse_plus_lowrank(W, H[:16, :16], 2, density=0.5)
    with pytest.raises(ValueError, match="W contains NaN"):
        sparse_plus_lowrank(np.where(W > 1, np.nan, W), H, 2, density=0.5)
    with pytest.raises(ValueError, match="H .*is required with hessian='full'"):
        sparse_plus_lowrank(W, None, 2, density=0.5)
    with pytest.raises(ValueError, match="zero norm"):
        sparse_plus_lowrank(np.zeros_like(W), H, 2, density=0.5)
    with pytest.raises(ValueError, match="compression"):
        sparse_lowrank_rank((32, 24), 1.0)
    with pytest.raises(ValueError, match="rank_ratio"):
        sparse_lowrank_budget((32, 24), 0.5, 0.0)
    with pytest.raises(ValueError, match="shape"):
        sparse_lowrank_budget((0, 24), 0.5, 0.3)
    with pytest.raises(ValueError, match="SparsePlusLowRank needs"):
        SparsePlusLowRank(np.zeros((4, 3)), np.zeros((4, 2)), np.zeros((4, 2)))


def test_half_precision_input_is_computed_in_float32(backend):
    if backend.name == "array_api_strict":
        pytest.skip("the strict namespace has no half precision")
    problem = realistic_layer(32, 24, seed=6)
    W, H = backend.asarray(problem.W, "float16"), backend.asarray(problem.H, "float32")
    result = sparse_plus_lowrank(W, H, 2, pattern="2:4", iters=2, lowrank_iters=5)
    for part in (result.S, result.U, result.V):
        assert part.dtype == backend.dtype("float32") and backend.same_device(part)
    assert np.all(np.isfinite(result.history)) and min(result.history) < 1.0
