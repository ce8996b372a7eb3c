"""Realistic test problems on a backend, and hypothesis strategies for them."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from matfactor.testing import LayerProblem, realistic_layer

PATTERNS = ["unstructured", "per_output", "2:4", "1:4", "3:8"]


def eps(dtype_name: str) -> float:
    return float(np.finfo(dtype_name).eps)


@st.composite
def layer_problems(draw, *, min_dim: int = 8, max_dim: int = 48, multiple_of: int = 8) -> LayerProblem:
    """Small realistic problems: correlated inputs, spread norms, outliers, dead inputs."""
    d_in = multiple_of * draw(st.integers(max(1, min_dim // multiple_of), max_dim // multiple_of))
    d_out = draw(st.integers(min_dim, max_dim))
    n_samples = draw(st.sampled_from([d_in // 2, 2 * d_in, 8 * d_in]))
    return realistic_layer(d_in, d_out, n_samples=max(2, n_samples),
                           n_dead=draw(st.integers(0, max(1, d_in // 8))),
                           n_outliers=draw(st.integers(0, 2)),
                           norm_spread=draw(st.sampled_from([1.0, 30.0, 1e3])),
                           seed=draw(st.integers(0, 2**31 - 1)))


def direct_masked_solution(W: np.ndarray, H: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The normal-equation solution on ``mask``, column by column (float64 reference).

    Minimises ``tr((Ŵ−W)ᵀ H (Ŵ−W))`` with ``Ŵ = 0`` off ``mask``; each output column j solves
    ``H[S,S] ŵ_S = (H W)[S, j]`` on its support S (least squares, so a singular block is fine).
    """
    target = H @ W
    solution = np.zeros_like(W)
    for j in range(W.shape[1]):
        support = np.flatnonzero(mask[:, j])
        if support.size:
            solution[support, j] = np.linalg.lstsq(H[np.ix_(support, support)], target[support, j],
                                                   rcond=None)[0]
    return solution
