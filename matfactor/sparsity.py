"""Sparsity patterns, budgets and masks.

A weight is a ``(d_in, d_out)`` matrix (``Y = X @ W``). Three patterns are supported:

``"unstructured"``
    One budget over the whole matrix: ``floor(density * d_in * d_out)`` kept entries.
``"per_output"``
    The same count, ``floor(density * d_in)``, kept in every output column.
``"n:m"`` (e.g. ``"2:4"``)
    In every group of ``m`` consecutive inputs of every output column, exactly ``n`` entries are
    kept (``n`` counts what is kept, as in "2:4" hardware sparsity). ``m`` must divide ``d_in``;
    the density is ``n / m``.

Masks are exact: they meet their pattern and budget exactly, ties included (ties are broken by
position, so every backend returns the same mask for the same scores).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from . import _validation as check
from ._array import top_k_mask
from ._contract import Parameter, contract, declare
from ._hessian import input_norms

__all__ = [
    "SparsityPattern",
    "magnitude_scores",
    "mask_from_scores",
    "mask_satisfies",
    "nnz_budget",
    "parse_pattern",
    "wanda_scores",
]

_KINDS = ("unstructured", "per_output", "n:m")

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@declare(Parameter("kind", "choice", choices=_KINDS),
         Parameter("n", "integer", minimum=1, maximum="m", what="(kept per group of m: 1 <= n <= m)"),
         Parameter("m", "integer", minimum=1, what="(the group size of an 'n:m' pattern)"))
@dataclass(frozen=True)
class SparsityPattern:
    """A parsed sparsity pattern.

    Attributes
    ----------
    kind
        ``"unstructured"``, ``"per_output"`` or ``"n:m"``.
    n, m
        For ``"n:m"``: ``n`` entries kept in every ``m`` consecutive inputs; ``None`` otherwise.
    """

    kind: Literal["unstructured", "per_output", "n:m"]
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        declared = contract(SparsityPattern)
        declared.validate(kind=self.kind)
        if self.kind != "n:m":
            if self.n is not None or self.m is not None:
                raise ValueError(f"n and m belong to the 'n:m' pattern only; pattern "
                                 f"'{self.kind}' got n={self.n!r}, m={self.m!r}")
            return
        m, n = declared.validate(m=self.m, n=self.n).values()
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind


# The kind "pattern" of a contract is this parser: it validates its argument itself.
@declare(Parameter("pattern", "pattern", doc="The pattern to parse, or a SparsityPattern (returned)."))
def parse_pattern(pattern: str | SparsityPattern) -> SparsityPattern:
    """Parse ``"unstructured"``, ``"per_output"`` or ``"n:m"`` (``1 <= n <= m``).

    Raises
    ------
    ValueError
        If ``pattern`` is none of these forms.
    """
    if isinstance(pattern, SparsityPattern):
        return pattern  # validated when it was constructed
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string such as 'unstructured', 'per_output' or '2:4', "
                        f"or a SparsityPattern, got {pattern!r} ({check.type_name(pattern)})")
    if pattern in ("unstructured", "per_output"):
        return SparsityPattern(pattern)
    match = _NM_RE.match(pattern)
    if match is None:
        raise ValueError(f"pattern must be 'unstructured', 'per_output' or 'n:m' such as '2:4', "
                         f"got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n <= m:
        raise ValueError(f"pattern {pattern!r}: an n:m pattern keeps n of every m inputs and needs "
                         f"1 <= n <= m")
    return SparsityPattern("n:m", n, m)



def _keep_count(density: float, size: int) -> int:
    """``floor(density * size)``, robust to the rounding of ``density`` (0.29 * 100 keeps 29)."""
    return min(size, math.floor(density * size + 1e-9))


_DENSITY = Parameter("density", "density",
                     doc="Kept fraction in (0, 1]; ``None`` for ``'n:m'`` (implied n/m).")
_PATTERN = Parameter("pattern", "pattern", doc="``'unstructured'``, ``'per_output'`` or ``'n:m'``.")


@declare(Parameter("shape", "shape", doc="``(d_in, d_out)`` of the matrix."), _DENSITY, _PATTERN)
def nnz_budget(shape: tuple[int, int], density: float | None, pattern: str | SparsityPattern) -> int:
    """The exact number of entries a mask of ``pattern`` keeps in a ``(d_in, d_out)`` matrix."""
    (d_in, d_out), pattern, density = contract(nnz_budget).validate(
        shape=shape, pattern=pattern, density=density).values()
    _check_shape_fits(pattern, d_in)
    if pattern.kind == "unstructured":
        return _keep_count(density, d_in * d_out)
    if pattern.kind == "per_output":
        return _keep_count(density, d_in) * d_out
    return pattern.n * (d_in // pattern.m) * d_out


def _check_shape_fits(pattern: SparsityPattern, d_in: int) -> None:
    if pattern.kind == "n:m" and d_in % pattern.m != 0:
        raise ValueError(f"pattern '{pattern}' needs d_in divisible by m = {pattern.m}, "
                         f"got d_in = {d_in}")


def _check_keeps_something(count: int, density: float, pattern: SparsityPattern, what: str) -> None:
    if count == 0:
        raise ValueError(f"density={density} keeps no entry of {what} under pattern '{pattern}'; "
                         f"increase density")


def _cubic_schedule(step: int, steps: int) -> float:
    """Fraction of the final pruning reached at ``step`` (1-based) of ``steps``.

    The cubic schedule of Zhu & Gupta (2018): ``1 - (1 - step/steps)**3``, reaching 1 at
    ``step = steps`` (DSF paper, section 3.1).
    """
    return 1.0 - (1.0 - min(step, steps) / steps) ** 3


@declare(Parameter("scores", "array"), _DENSITY, _PATTERN)
def mask_from_scores(scores: Any, density: float | None = None,
                     pattern: str | SparsityPattern = "unstructured") -> Any:
    """Keep the highest ``scores`` under ``pattern``: a boolean mask of the scores' shape.

    Parameters
    ----------
    scores
        ``(d_in, d_out)`` non-negative importance of each weight (e.g. ``magnitude_scores``).
    density
        Kept fraction in (0, 1]; ``None`` for ``"n:m"`` (implied ``n/m``).
    pattern
        ``"unstructured"``, ``"per_output"`` or ``"n:m"``.

    Returns
    -------
    mask
        Boolean array, same namespace and device as ``scores``, meeting the pattern and
        ``nnz_budget`` exactly.
    """
    xp, _ = check.namespace(scores=scores)
    scores = check.matrix(xp, scores, "scores", check.common_dtype(xp, scores=scores))
    pattern, density = contract(mask_from_scores).validate(pattern=pattern, density=density).values()
    return _mask(xp, scores, density, pattern)


def _mask(xp: Any, scores: Any, density: float, pattern: SparsityPattern) -> Any:
    d_in, d_out = scores.shape
    _check_shape_fits(pattern, d_in)
    if pattern.kind == "unstructured":
        count = _keep_count(density, d_in * d_out)
        _check_keeps_something(count, density, pattern, "the matrix")
        return top_k_mask(xp, scores, count)
    if pattern.kind == "per_output":
        count = _keep_count(density, d_in)
        _check_keeps_something(count, density, pattern, "an output column")
        return top_k_mask(xp, scores, count, axis=0)
    groups = xp.reshape(scores, (d_in // pattern.m, pattern.m, d_out))
    return xp.reshape(top_k_mask(xp, groups, pattern.n, axis=1), (d_in, d_out))


def _gradual_mask(xp: Any, scores: Any, density: float, pattern: SparsityPattern,
                 fraction: float) -> Any:
    """Mask that has done ``fraction`` of the pruning from dense to ``pattern``.

    Used by gradual pruning (ADMM's cubic schedule): with ``P`` the number of entries the final
    mask removes, this mask removes ``floor(fraction * P)`` of them, the lowest-scoring ones,
    subject to the pattern's shape:

    - unstructured: over the whole matrix;
    - per_output: the same count in every output column;
    - n:m: the ``n`` best of every group are always kept; the removal happens among the others,
      over the whole matrix, so that at ``fraction = 1`` exactly the ``n:m`` mask remains.
    """
    d_in, d_out = scores.shape
    if fraction >= 1.0:
        return _mask(xp, scores, density, pattern)
    if pattern.kind == "per_output":
        removed = math.floor(fraction * (d_in - _keep_count(density, d_in)))
        return top_k_mask(xp, scores, d_in - removed, axis=0)
    size = d_in * d_out
    final_keep = nnz_budget((d_in, d_out), density, pattern)
    removed = math.floor(fraction * (size - final_keep))
    if pattern.kind == "unstructured":
        return top_k_mask(xp, scores, size - removed)
    always_kept = _mask(xp, scores, density, pattern)
    return top_k_mask(xp, xp.where(always_kept, xp.inf, scores), size - removed)


def magnitude_scores(W: Any) -> Any:
    """``|W|``: the score of magnitude pruning (the Frobenius projection onto the pattern).

    Parameters
    ----------
    W
        ``(d_in, d_out)`` weight.

    Returns
    -------
    scores
        ``(d_in, d_out)`` in the compute dtype, for :func:`mask_from_scores`.
    """
    xp, _ = check.namespace(W=W)
    return xp.abs(check.matrix(xp, W, "W", check.common_dtype(xp, W=W)))


def wanda_scores(W: Any, H: Any) -> Any:
    """Wanda's score ``|W_ij| · ‖X_i‖`` with ``‖X_i‖² = H_ii`` (Sun et al., 2023).

    Parameters
    ----------
    W
        ``(d_in, d_out)`` weight.
    H
        ``(d_in, d_in)`` Gram matrix ``XᵀX``.

    Returns
    -------
    scores
        ``(d_in, d_out)`` in the compute dtype, for :func:`mask_from_scores`. Computed on
        ``W`` and ``H`` scaled to unit magnitude by powers of two (the mask they give is the
        same, and the products cannot overflow), then scaled back: entries beyond the dtype's
        range come back as Inf, which a mask still orders correctly against finite ones.
    """
    xp, _ = check.namespace(W=W, H=H)
    dtype = check.common_dtype(xp, W=W, H=H)
    W = check.matrix(xp, W, "W", dtype)
    H = check.matrix(xp, H, "H", dtype)
    check.gram(xp, H, W.shape[0])
    W_n, w_exponent = check.normalised(xp, W, "W")
    norms, norm_exponent = input_norms(xp, H)
    return check.times_power_of_two(xp, _wanda_scores(xp, W_n, norms), w_exponent + norm_exponent)


def _wanda_scores(xp: Any, W: Any, norms: Any) -> Any:
    """``|W_ij| · norms_i`` on validated arrays (``norms`` of :func:`matfactor._hessian.input_norms`)."""
    return xp.abs(W) * norms[:, None]


@declare(Parameter("mask", "array", doc="Boolean ``(d_in, d_out)`` mask."), _DENSITY, _PATTERN,
         Parameter("exact", "flag", doc="Whether the budget must be met exactly, not only not "
                                        "exceeded."))
def mask_satisfies(mask: Any, density: float | None, pattern: str | SparsityPattern, *,
                   exact: bool = True) -> bool:
    """True when the boolean ``mask`` meets ``pattern`` and keeps exactly its ``nnz_budget``.

    With ``exact=False``, true when it keeps at most the pattern's count in every unit (the
    whole matrix, each output column, each group of ``m``): the test for the support
    ``W != 0`` of a pruned weight, where a kept weight may happen to be zero (dead inputs).

    Raises
    ------
    TypeError
        If ``mask`` is not boolean (test ``W_sparse != 0`` rather than ``W_sparse``).
    ValueError
        If ``mask`` is not 2-D or ``pattern`` cannot apply to its shape (as :func:`nnz_budget`).
    """
    xp, _ = check.namespace(mask=mask)
    mask = check.boolean_mask(xp, mask, "mask")
    exact, pattern, density = contract(mask_satisfies).validate(exact=exact, pattern=pattern,
                                                                density=density).values()
    d_in, d_out = mask.shape
    _check_shape_fits(pattern, d_in)
    counts = xp.astype(mask, xp.int64)
    if pattern.kind == "unstructured":
        kept, allowed = xp.sum(counts), _keep_count(density, d_in * d_out)
    elif pattern.kind == "per_output":
        kept, allowed = xp.sum(counts, axis=0), _keep_count(density, d_in)
    else:
        kept = xp.sum(xp.reshape(counts, (d_in // pattern.m, pattern.m, d_out)), axis=1)
        allowed = pattern.n
    return bool(xp.all(kept == allowed)) if exact else bool(xp.all(kept <= allowed))
