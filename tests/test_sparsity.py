"""Sparsity patterns: parsing, exact budgets, exact masks (ties included), gradual masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from matfactor import mask_from_scores, mask_satisfies, nnz_budget, parse_pattern
from matfactor.sparsity import (
    SparsityPattern,
    _cubic_schedule,
    _gradual_mask,
    _keep_count,
    magnitude_scores,
    wanda_scores,
)


@pytest.mark.parametrize("text, expected", [
    ("unstructured", SparsityPattern("unstructured")),
    ("per_output", SparsityPattern("per_output")),
    ("2:4", SparsityPattern("n:m", 2, 4)),
    (" 3 : 8 ", SparsityPattern("n:m", 3, 8)),
])
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["0:4", "5:4", "2:", "a:b", "2:4:1", "dense", "", "2/4"])
def test_malformed_patterns_are_rejected(text):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(text)


def test_pattern_must_be_a_string():
    with pytest.raises(TypeError, match="pattern must be a string"):
        parse_pattern(0.5)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_density_out_of_range(density):
    with pytest.raises(ValueError, match="density must be a real number in \\(0, 1\\]"):
        nnz_budget((8, 4), density, "unstructured")


def test_density_type_and_nm_consistency():
    with pytest.raises(TypeError, match="density must be a real number"):
        nnz_budget((8, 4), "0.5", "per_output")
    with pytest.raises(TypeError, match="density is required"):
        nnz_budget((8, 4), None, "unstructured")
    assert nnz_budget((8, 4), None, "2:4") == nnz_budget((8, 4), 0.5, "2:4") == 16
    with pytest.raises(ValueError, match="contradicts pattern '2:4'"):
        nnz_budget((8, 4), 0.3, "2:4")


def test_keep_count_is_robust_to_rounding():
    assert _keep_count(0.29, 100) == 29   # 0.29 * 100 = 28.999999999999996 in binary
    assert _keep_count(0.5, 7) == 3       # never above the budget
    assert _keep_count(1.0, 7) == 7


def test_nnz_budget():
    assert nnz_budget((8, 5), 0.5, "unstructured") == 20
    assert nnz_budget((8, 5), 0.3, "per_output") == 2 * 5
    assert nnz_budget((8, 5), None, "3:4") == 6 * 5
    with pytest.raises(ValueError, match="d_in divisible by m = 4"):
        nnz_budget((6, 5), None, "2:4")


@given(d_groups=st.integers(1, 6), d_out=st.integers(1, 7),
       pattern=st.sampled_from(["unstructured", "per_output", "1:4", "2:4", "3:4", "4:4"]),
       density=st.floats(0.05, 1.0), data=st.data())
def test_masks_meet_pattern_and_budget_exactly(backend, d_groups, d_out, pattern, density, data):
    d_in = 4 * d_groups
    if ":" in pattern:
        density = None
    else:  # a density that keeps nothing is an error: test_density_that_keeps_nothing
        assume(nnz_budget((d_in, d_out), density, pattern) > 0)
    # Few distinct values: many ties at every threshold.
    ints = data.draw(st.lists(st.integers(0, 3), min_size=d_in * d_out, max_size=d_in * d_out))
    scores = np.array(ints, dtype=np.float64).reshape(d_in, d_out)
    mask = mask_from_scores(backend.asarray(scores), density, pattern)
    assert backend.same_device(mask) and mask.dtype == backend.xp.bool
    assert mask_satisfies(mask, density, pattern)
    mask = backend.to_numpy(mask)
    assert mask.sum() == nnz_budget((d_in, d_out), density, pattern)
    # Optimality: within each selection group, kept scores dominate dropped ones.
    if pattern == "unstructured":
        groups = [(mask.ravel(), scores.ravel())]
    elif pattern == "per_output":
        groups = [(mask[:, j], scores[:, j]) for j in range(d_out)]
    else:
        groups = [(mask[g:g + 4, j], scores[g:g + 4, j]) for g in range(0, d_in, 4) for j in range(d_out)]
    for m, s in groups:
        if m.any() and (~m).any():
            assert s[m].min() >= s[~m].max()


@pytest.mark.parametrize("pattern", ["unstructured", "per_output"])
def test_density_that_keeps_nothing(pattern):
    with pytest.raises(ValueError, match="keeps no entry"):
        mask_from_scores(np.ones((4, 4)), 0.05 if pattern == "unstructured" else 0.1, pattern)


def test_mask_satisfies_validates_its_input():
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        mask_satisfies(np.ones((8, 2)), 0.5, "unstructured")
    with pytest.raises(ValueError, match="d_in divisible by m = 3"):
        mask_satisfies(np.ones((8, 2), dtype=bool), None, "2:3")


def test_mask_satisfies_detects_violations():
    mask = np.zeros((8, 2), dtype=bool)
    mask[:2, :] = True
    assert mask_satisfies(mask, None, "2:4") is False
    assert mask_satisfies(mask, 0.25, "per_output") is True
    assert mask_satisfies(mask, 0.5, "unstructured") is False


@given(pattern=st.sampled_from(["unstructured", "per_output", "2:4", "1:4"]),
       step=st.integers(1, 15), seed=st.integers(0, 2**16))
def test_gradual_mask_follows_the_cubic_schedule(backend, pattern, step, seed):
    d_in, d_out, density = 16, 6, 0.5 if ":" not in pattern else None
    scores = np.random.default_rng(seed).random((d_in, d_out))
    parsed = parse_pattern(pattern)
    density_value = parsed.n / parsed.m if parsed.kind == "n:m" else density
    fraction = _cubic_schedule(step, 15)
    mask = backend.to_numpy(_gradual_mask(backend.xp, backend.asarray(scores), density_value,
                                         parsed, fraction))
    final = nnz_budget((d_in, d_out), density, pattern)
    if pattern == "per_output":
        per_column = _keep_count(density_value, d_in)
        assert np.all(mask.sum(axis=0) == d_in - math.floor(fraction * (d_in - per_column)))
    else:
        assert mask.sum() == d_in * d_out - math.floor(fraction * (d_in * d_out - final))
    if ":" in pattern:  # the n best of every group are never removed
        final_mask = backend.to_numpy(mask_from_scores(backend.asarray(scores), None, pattern))
        assert np.all(mask[final_mask])
    if step == 15:
        assert mask_satisfies(mask, density, pattern)


def test_cubic_schedule_is_monotone_and_ends_at_one():
    values = [_cubic_schedule(t, 15) for t in range(1, 16)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] == 1.0 and values[0] > 0
    # Cubic (Zhu & Gupta, 2018), not any monotone curve: what is left to prune after step t of
    # T is (1 - t/T)³ of it, and the schedule stays at 1 past the end.
    for steps in (2, 4, 15):
        for step in range(1, steps + 1):
            remaining = 1.0 - _cubic_schedule(step, steps)
            assert math.isclose(remaining, (1.0 - step / steps) ** 3, rel_tol=1e-12, abs_tol=1e-15)
    assert _cubic_schedule(20, 15) == 1.0


def test_scores(backend):
    W = np.array([[1.0, -2.0], [3.0, -0.5]])
    H = np.diag([4.0, 0.0])
    np.testing.assert_array_equal(backend.to_numpy(magnitude_scores(backend.asarray(W))), np.abs(W))
    np.testing.assert_array_equal(backend.to_numpy(wanda_scores(backend.asarray(W), backend.asarray(H))),
                                  [[2.0, 4.0], [0.0, 0.0]])
