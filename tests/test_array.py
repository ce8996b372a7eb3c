"""The array-API plumbing: namespaces, devices, dtypes and the operations the standard lacks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from matfactor import _array


def test_random_normal_reproducible_on_device(backend, dtype_name):
    xp, dtype = backend.xp, backend.dtype(dtype_name)
    a = _array.random_normal(xp, (64, 32), dtype=dtype, device=backend.device, rng=7)
    b = _array.random_normal(xp, (64, 32), dtype=dtype, device=backend.device, rng=7)
    c = _array.random_normal(xp, (64, 32), dtype=dtype, device=backend.device, rng=8)
    assert a.dtype == dtype and tuple(a.shape) == (64, 32) and backend.same_device(a)
    a_np, c_np = backend.to_numpy(a), backend.to_numpy(c)
    np.testing.assert_array_equal(a_np, backend.to_numpy(b))
    assert not np.array_equal(a_np, c_np)
    # Standard normal: mean ~ 0, variance ~ 1 over 2048 samples (5 sigma bounds).
    assert abs(a_np.mean()) < 5 / np.sqrt(a_np.size)
    assert abs(a_np.var() - 1) < 5 * np.sqrt(2 / a_np.size)


def test_random_normal_rejects_foreign_generator(backend):
    with pytest.raises(TypeError, match="rng must be"):
        _array.random_normal(backend.xp, (2,), dtype=backend.dtype("float64"),
                             device=backend.device, rng="seed")


@given(values=st.lists(st.integers(-3, 3), min_size=1, max_size=40), data=st.data())
def test_kth_largest_matches_sort(backend, values, data):
    k = data.draw(st.integers(1, len(values)))
    x = backend.asarray(np.array(values, dtype=np.float64))
    expected = np.sort(values)[::-1][k - 1]
    assert float(_array.kth_largest(backend.xp, x, k)) == expected


@given(rows=st.integers(1, 6), cols=st.integers(1, 6), data=st.data())
def test_top_k_mask_is_exact_with_ties(backend, rows, cols, data):
    # Small integer scores: plenty of ties at the threshold.
    scores = np.array(data.draw(st.lists(st.integers(0, 2), min_size=rows * cols,
                                         max_size=rows * cols)), dtype=np.float64).reshape(rows, cols)
    axis = data.draw(st.sampled_from([None, 0, 1]))
    size = scores.size if axis is None else scores.shape[axis]
    k = data.draw(st.integers(0, size))
    mask = backend.to_numpy(_array.top_k_mask(backend.xp, backend.asarray(scores), k, axis))
    counts = mask.sum() if axis is None else mask.sum(axis=axis)
    assert np.all(counts == k)
    # Every kept score is >= every dropped score in the same slice.
    slices = [(mask, scores)] if axis is None else \
        [(np.take(mask, i, axis=1 - axis), np.take(scores, i, axis=1 - axis))
         for i in range(scores.shape[1 - axis])]
    for m, s in slices:
        if m.any() and (~m).any():
            assert s[m].min() >= s[~m].max()


def test_top_k_mask_breaks_ties_by_position(backend):
    scores = backend.asarray(np.array([1.0, 2.0, 1.0, 1.0, 2.0]))
    mask = backend.to_numpy(_array.top_k_mask(backend.xp, scores, 3))
    np.testing.assert_array_equal(mask, [True, True, False, False, True])


def test_solve_triangular_and_spd_inverse(backend, dtype_name):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((12, 12))
    spd = A @ A.T + 12 * np.eye(12)
    L = np.linalg.cholesky(spd)
    B = rng.standard_normal((12, 3))
    tol = 100 * np.finfo(dtype_name).eps
    X = backend.to_numpy(_array.solve_triangular(backend.xp, backend.asarray(L, dtype_name),
                                                 backend.asarray(B, dtype_name), lower=True))
    np.testing.assert_allclose(L @ X, B, atol=tol * np.abs(B).max() * 10)
    X = backend.to_numpy(_array.solve_triangular(backend.xp, backend.asarray(L.T, dtype_name),
                                                 backend.asarray(B, dtype_name), lower=False))
    np.testing.assert_allclose(L.T @ X, B, atol=tol * np.abs(B).max() * 10)
    inverse = backend.to_numpy(_array.spd_inverse(backend.xp, backend.asarray(spd, dtype_name)))
    np.testing.assert_allclose(inverse @ spd, np.eye(12), atol=tol * np.linalg.cond(spd))
