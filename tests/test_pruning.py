"""The pruners behind the shared signature: patterns, budgets, dtypes, devices, bad input,
invariance to the scale of H, and the quality ordering on realistic layers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matfactor import (
    admm_prune,
    layer_error,
    magnitude_prune,
    mask_satisfies,
    nnz_budget,
    sparsegpt_prune,
    wanda_prune,
)
from matfactor.testing import realistic_layer
from problems import PATTERNS, layer_problems

PRUNERS = {
    "magnitude": magnitude_prune,
    "wanda": wanda_prune,
    "sparsegpt": sparsegpt_prune,
    "admm": admm_prune,
}


def density_for(pattern: str) -> float | None:
    return None if ":" in pattern else 0.5


def assert_within_pattern(W_sparse: np.ndarray, density: float | None, pattern: str) -> None:
    """The support of a pruned weight fits the pattern and never exceeds the budget."""
    d_in, d_out = W_sparse.shape
    nonzero = W_sparse != 0
    assert nonzero.sum() <= nnz_budget((d_in, d_out), density, pattern)
    if pattern == "per_output":
        assert np.all(nonzero.sum(axis=0) <= int(density * d_in))
    elif ":" in pattern:
        n, m = map(int, pattern.split(":"))
        assert np.all(nonzero.reshape(d_in // m, m, d_out).sum(axis=1) <= n)


@pytest.mark.parametrize("name", PRUNERS)
@settings(max_examples=10)
@given(problem=layer_problems(), pattern=st.sampled_from(PATTERNS))
def test_result_meets_pattern_dtype_and_device(backend, dtype_name, name, problem, pattern):
    density = density_for(pattern)
    W, H = backend.asarray(problem.W, dtype_name), backend.asarray(problem.H, dtype_name)
    result = PRUNERS[name](W, H, density=density, pattern=pattern)
    assert result.dtype == backend.dtype(dtype_name)
    assert backend.same_device(result)
    assert tuple(result.shape) == problem.W.shape
    result = backend.to_numpy(result)
    assert np.all(np.isfinite(result))
    assert_within_pattern(result, density, pattern)
    if name in ("magnitude", "wanda"):  # kept weights are unchanged and nonzero
        kept = result != 0
        assert kept.sum() == nnz_budget(problem.W.shape, density, pattern)
        np.testing.assert_array_equal(result[kept], backend.to_numpy(W)[kept])


@pytest.mark.parametrize("name", ["sparsegpt", "admm"])
def test_dead_inputs_get_zero_weights(backend, name):
    problem = realistic_layer(32, 24, n_dead=4, seed=3)
    result = backend.to_numpy(PRUNERS[name](backend.asarray(problem.W), backend.asarray(problem.H),
                                            density=0.5))
    assert np.all(result[problem.dead] == 0)


@pytest.mark.parametrize("name", ["wanda", "sparsegpt", "admm"])
@pytest.mark.parametrize("pattern", ["unstructured", "per_output", "2:4"])
def test_scale_of_H_does_not_change_the_answer(backend, name, pattern):
    problem = realistic_layer(32, 24, seed=4)
    W = backend.asarray(problem.W)
    density = density_for(pattern)
    base = backend.to_numpy(PRUNERS[name](W, backend.asarray(problem.H), density=density,
                                          pattern=pattern))
    for scale in (1e-6, 1e6):
        scaled = backend.to_numpy(PRUNERS[name](W, backend.asarray(scale * problem.H),
                                                density=density, pattern=pattern))
        np.testing.assert_array_equal(scaled != 0, base != 0)
        np.testing.assert_allclose(scaled, base, rtol=1e-8, atol=1e-10 * np.abs(base).max())


def test_half_precision_inputs_compute_in_float32():
    torch = pytest.importorskip("torch")
    problem = realistic_layer(32, 16, seed=5)
    for dtype in (torch.float16, torch.bfloat16):
        W = torch.asarray(problem.W).to(dtype)
        H = torch.asarray(problem.H / np.abs(problem.H).max()).to(dtype)
        H = (H + H.T) / 2
        for prune in PRUNERS.values():
            assert prune(W, H, density=0.5).dtype == torch.float32


@pytest.mark.parametrize("name", PRUNERS)
def test_bad_input_names_the_argument(backend, name):
    prune = PRUNERS[name]
    problem = realistic_layer(16, 8, seed=6)
    W, H = backend.asarray(problem.W), backend.asarray(problem.H)
    W_nan = problem.W.copy()
    W_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        prune(backend.asarray(W_nan), H, density=0.5)
    H_inf = problem.H.copy()
    H_inf[1, 1] = np.inf
    with pytest.raises(ValueError, match="H contains NaN or Inf"):
        prune(W, backend.asarray(H_inf), density=0.5)
    with pytest.raises(ValueError, match="H must be a square"):
        prune(W, backend.asarray(problem.H[:, :8]), density=0.5)
    with pytest.raises(ValueError, match="but W has d_in = 16"):
        prune(W, backend.asarray(problem.H[:8, :8]), density=0.5)
    H_asym = problem.H.copy()
    H_asym[0, 1] += 0.1 * np.abs(problem.H).max()
    with pytest.raises(ValueError, match="H must be symmetric"):
        prune(W, backend.asarray(H_asym), density=0.5)
    for density in (0.0, 1.2):
        with pytest.raises(ValueError, match="density must be a real number in"):
            prune(W, H, density=density)
    with pytest.raises(ValueError, match="d_in divisible by m = 3"):
        prune(W, H, pattern="2:3")
    with pytest.raises(ValueError, match="pattern must be"):
        prune(W, H, density=0.5, pattern="2-4")
    with pytest.raises(ValueError, match="W must be a 2-D matrix"):
        prune(backend.asarray(problem.W[0]), H, density=0.5)
    with pytest.raises(TypeError, match="W must be a real floating-point array"):
        prune(backend.asarray(np.ones((16, 8), dtype=np.int32)), H, density=0.5)


@pytest.mark.parametrize("name", ["wanda", "sparsegpt", "admm"])
def test_pruners_that_need_H_say_so(name):
    with pytest.raises(ValueError, match="H .*is required"):
        PRUNERS[name](np.ones((8, 4)), None, density=0.5)


@pytest.mark.parametrize("pattern", ["unstructured", "per_output", "2:4"])
def test_quality_ordering_on_realistic_layers(pattern):
    """ADMM < SparseGPT < Wanda and magnitude at 50% density, on every pattern (issue 2)."""
    density = density_for(pattern)
    for seed, (d_in, d_out) in enumerate([(256, 256), (256, 512), (512, 256)]):
        problem = realistic_layer(d_in, d_out, seed=seed)
        errors = {name: layer_error(problem.W, prune(problem.W, problem.H, density=density,
                                                     pattern=pattern), problem.H)
                  for name, prune in PRUNERS.items()}
        assert errors["admm"] < errors["sparsegpt"] < min(errors["wanda"], errors["magnitude"]), errors


def test_sparsegpt_recovers_exactly_sparse_weights():
    """With W already in the pattern, the pruner must find it and change nothing."""
    problem = realistic_layer(64, 32, n_dead=0, seed=7)
    W = magnitude_prune(problem.W, density=0.5)
    for prune in (sparsegpt_prune, admm_prune):
        result = prune(W, problem.H, density=0.5)
        assert layer_error(W, result, problem.H) < 1e-12


@pytest.mark.parametrize("block_size", [128, 3])
def test_sparsegpt_is_exact_when_every_pruned_input_precedes_the_kept_one(backend, block_size):
    """Optimal brain surgeon, input after input, is exact least squares on what remains.

    Keeping only the last input of every output (per_output, one of eight, that input made the
    largest), every removal comes before it and is compensated on everything still free: the
    result must be the least-squares weight on that one input, ``(H_λ W)_last / (H_λ)_last,last``
    with SparseGPT's damped ``H_λ = H + λ·mean(diag H)·I``. A compensation that is skipped (for
    the last pair of a block, or across blocks) or mis-scaled misses it.
    """
    problem = realistic_layer(8, 5, n_dead=0, seed=3)
    W = problem.W.copy()
    W[-1] *= 100.0  # the last input wins every column
    damping = 0.01
    H_damped = problem.H + damping * np.mean(np.diag(problem.H)) * np.eye(8)
    expected = np.zeros_like(W)
    expected[-1] = (H_damped @ W)[-1] / H_damped[-1, -1]
    result = backend.to_numpy(sparsegpt_prune(backend.asarray(W), backend.asarray(problem.H),
                                              density=1 / 8, pattern="per_output",
                                              damping=damping, block_size=block_size))
    np.testing.assert_array_equal(result[:-1], 0.0)
    np.testing.assert_allclose(result[-1], expected[-1], rtol=1e-10, atol=0)


@pytest.mark.parametrize("block_size", [1, 5, 6, 7])
def test_sparsegpt_n_m_blocks_are_whole_groups(block_size):
    """For n:m the lazy-update block is rounded down to a multiple of m (at least m): a block
    that cut a group would choose its n from part of it and break the pattern. Lazy updates are
    exact re-associations, so every such block size gives the same result."""
    problem = realistic_layer(24, 10, n_dead=0, seed=18)
    reference = sparsegpt_prune(problem.W, problem.H, pattern="2:4", block_size=4)
    result = sparsegpt_prune(problem.W, problem.H, pattern="2:4", block_size=block_size)
    assert mask_satisfies(result != 0, None, "2:4")
    np.testing.assert_allclose(result, reference, rtol=1e-10, atol=1e-12 * np.abs(reference).max())


@pytest.mark.parametrize("name", ["sparsegpt", "admm"])
def test_indefinite_H_is_named_not_a_backend_crash(backend, name):
    # Symmetric with a positive diagonal, but eigenvalues 6 and -4: not a Gram matrix.
    H = np.kron(np.eye(4), np.array([[1.0, 5.0], [5.0, 1.0]]))
    W = np.random.default_rng(0).standard_normal((8, 4))
    with pytest.raises(ValueError, match="H is not positive semi-definite"):
        PRUNERS[name](backend.asarray(W), backend.asarray(H), density=0.5)


@pytest.mark.parametrize("name", ["wanda", "sparsegpt", "admm"])
def test_all_dead_inputs_are_an_error(name):
    with pytest.raises(ValueError, match="every input is dead"):
        PRUNERS[name](np.ones((8, 4)), np.zeros((8, 8)), density=0.5)
