"""Pivoting factorization (PIFA): lossless, more compact storage of a rank-``r`` matrix.

Zhao et al., "Pivoting Factorization: A Compact Meta Low-Rank Representation of Sparsity for
Efficient Inference in Large Language Models" (PIFA paper), section 3.

A rank-``r`` weight has ``r`` linearly independent *pivot* output channels; every other output
is a fixed linear combination of them. The paper (``Y = W X``, ``W`` of shape
``(d_out, d_in)``) selects pivot *rows* of ``W``; in matfactor's orientation (``Y = X @ W``,
``W`` of shape ``(d_in, d_out)``) output channels are the *columns* of ``W``, and eqs. (1)–(2)
become::

    W_p = W[:, pivots]                 (d_in, r)          eq. (1), transposed
    W[:, non_pivots] = W_p @ C         C: (r, d_out − r)  eq. (2), transposed (the paper's Cᵀ)

Storage ``r·d_in + r·(d_out − r) = r(d_in + d_out − r)`` values plus ``r`` indices, against
``r(d_in + d_out)`` for a two-factor low-rank layer and ``d_in·d_out`` dense (section 3.3); the
layer's FLOPs are in the same proportion. The representation is exact for any rank-``r``
matrix: no loss beyond rounding.

Pivots are chosen by QR with column pivoting (:func:`matfactor._array.pivoted_qr`), on the
device for every backend, and ``C = R₁₁⁻¹ R₁₂`` from the same factorization: a triangular
solve, never an explicit inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import array_api_compat

from . import _memory
from . import _validation as check
from ._array import chained_products, pivoted_qr, solve_triangular
from ._contract import Parameter, contract, declare
from .error import layer_error

__all__ = ["Pivoted", "pifa_from_dense", "pifa_from_factors", "pifa_rank_for_density"]


@dataclass(frozen=True, eq=False)
class Pivoted:
    """A rank-``r`` ``(d_in, d_out)`` weight stored by its pivot output channels (PIFA).

    ``Ŵ[:, pivots] = W_p`` and ``Ŵ[:, non_pivots] = W_p @ C``: the transpose of the paper's
    eqs. (1)–(2), whose ``W`` is ``(d_out, d_in)`` and whose pivots are rows.

    Attributes
    ----------
    pivots
        ``(r,)`` integer indices of the pivot output channels (columns of ``Ŵ``).
    non_pivots
        ``(d_out − r,)`` integer indices of the other output channels, in increasing order.
    W_p
        ``(d_in, r)`` pivot columns, ``Ŵ[:, pivots]``.
    C
        ``(r, d_out − r)`` coefficients: ``Ŵ[:, non_pivots] = W_p @ C``.
    gather
        ``(d_out,)`` inverse of the permutation ``concat(pivots, non_pivots)``, derived on
        construction: output channel ``j`` is column ``gather[j]`` of ``[Y_p | Y_np]``.
    """

    pivots: Any
    non_pivots: Any
    W_p: Any
    C: Any
    gather: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        xp, _ = check.namespace(pivots=self.pivots, non_pivots=self.non_pivots, W_p=self.W_p,
                                C=self.C)
        for name in ("pivots", "non_pivots"):
            indices = getattr(self, name)
            if not xp.isdtype(indices.dtype, "integral"):
                raise TypeError(f"{name} must be a 1-D integer array, got dtype {indices.dtype}")
            if indices.ndim != 1:
                raise ValueError(f"{name} must be a 1-D integer array, got shape "
                                 f"{tuple(indices.shape)}")
        dtype = check.common_dtype(xp, W_p=self.W_p, C=self.C)
        W_p = check.matrix(xp, self.W_p, "W_p", dtype)
        r = self.pivots.shape[0]
        if r < 1 or W_p.shape[1] != r:
            raise ValueError(f"W_p must be (d_in, r) with r = {r} pivots (at least one), got shape "
                             f"{tuple(W_p.shape)}")
        d_out = r + self.non_pivots.shape[0]
        if self.non_pivots.shape[0] > 0:
            check.matrix(xp, self.C, "C", dtype, shape=(r, self.non_pivots.shape[0]))
        elif tuple(self.C.shape) != (r, 0):
            raise ValueError(f"C must have shape ({r}, 0) when every output is a pivot, got "
                             f"{tuple(self.C.shape)}")
        order = xp.concat([self.pivots, self.non_pivots])
        gather = xp.argsort(order)
        # concat(pivots, non_pivots) must be a permutation of range(d_out): sorted, it is
        # 0, 1, ..., d_out - 1 (no index repeated, none out of range).
        expected = xp.arange(d_out, dtype=order.dtype, device=array_api_compat.device(order))
        if not bool(xp.all(xp.take(order, gather) == expected)):
            raise ValueError(f"pivots and non_pivots must together list every output channel "
                             f"0..{d_out - 1} exactly once (got repeated or out-of-range indices)")
        object.__setattr__(self, "gather", gather)

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_in, d_out)`` of the represented weight."""
        return (self.W_p.shape[0], self.pivots.shape[0] + self.non_pivots.shape[0])

    @property
    def rank(self) -> int:
        """``r``, the number of pivot channels."""
        return self.pivots.shape[0]

    @property
    def n_params(self) -> int:
        """Stored values ``r·(d_in + d_out − r)`` (section 3.3), not counting the indices."""
        d_in, d_out = self.shape
        return self.rank * (d_in + d_out - self.rank)

    @property
    def n_indices(self) -> int:
        """Stored pivot indices, ``r`` (the non-pivots are their complement)."""
        return self.rank

    def dense(self) -> Any:
        """The ``(d_in, d_out)`` matrix ``Ŵ``."""
        xp = array_api_compat.array_namespace(self.W_p)
        return xp.take(xp.concat([self.W_p, self.W_p @ self.C], axis=1), self.gather, axis=1)

    def matmul(self, X: Any) -> Any:
        """``X @ Ŵ`` by the PIFA layer (Algorithm 1, transposed), never forming ``Ŵ``.

        ``Y_p = X @ W_p``, ``Y_np = Y_p @ C``, then one gather puts the channels in order:
        ``2·n·r·(d_in + d_out − r)`` FLOPs (section 3.3) plus one pass over the output. The
        paper's scatter into ``Y[I, :]`` and ``Y[Iᶜ, :]`` becomes ``[Y_p | Y_np]`` (written in
        place on NumPy and PyTorch, :func:`matfactor._array.chained_products`) and a gather by
        the inverse permutation, which the array API has and which is cheaper than a scatter.

        Speed: GEMMs whose output width is not a multiple of 8 run far below the BLAS's rate on
        a CPU (measured: 30 against 40–56 GFLOP/s); with ``d_out`` a multiple of 8, a rank
        that is one keeps both products aligned
        (``pifa_rank_for_density(..., multiple_of=8)``).

        Parameters
        ----------
        X
            ``(..., d_in)`` inputs; leading dimensions are batch dimensions. Cast to the dtype of
            the factors.

        Returns
        -------
        Y
            ``(..., d_out)``, on the factors' device.
        """
        d_in, d_out = self.shape
        xp, X = check.layer_input(X, self.W_p, d_in)
        batch_shape = tuple(X.shape[:-1])
        X2 = xp.reshape(X, (-1, d_in)) if X.ndim != 2 else X
        Y = xp.take(chained_products(xp, X2, self.W_p, self.C), self.gather, axis=1)
        return Y if X.ndim == 2 else xp.reshape(Y, batch_shape + (d_out,))

    def rel_error(self, W: Any, H: Any | None = None) -> float:
        """Relative layer error ``tr(DᵀHD) / tr(WᵀHW)`` of ``Ŵ`` (Frobenius if ``H=None``)."""
        return layer_error(W, self.dense(), H)



def _complement(xp: Any, pivots: Any, n: int) -> Any:
    """The indices in ``range(n)`` not in ``pivots``, increasing (static shape, on device)."""
    columns = xp.arange(n, device=array_api_compat.device(pivots))
    ordered = xp.sort(pivots)
    # Binary search, O(n log r) and no (n, r) comparison matrix.
    position = xp.clip(xp.searchsorted(ordered, columns), max=pivots.shape[0] - 1)
    is_pivot = xp.take(ordered, position) == columns
    # A stable sort of the 0/1 flags lists the non-pivots first, in increasing order.
    order = xp.argsort(xp.astype(is_pivot, xp.int8), stable=True)
    return order[:n - pivots.shape[0]]


def _upper(xp: Any, R: Any) -> Any:
    """``R`` with its strictly lower part zeroed (generic solves read the whole matrix)."""
    device = array_api_compat.device(R)
    rows = xp.arange(R.shape[0], device=device)[:, None]
    cols = xp.arange(R.shape[1], device=device)[None, :]
    return xp.where(rows <= cols, R, xp.zeros_like(R))


def _pivots_and_coefficients(xp: Any, A: Any, rank: int, rtol: float | None, name: str,
                             ) -> tuple[Any, Any, Any]:
    """Pivots of ``A``'s columns, their complement and ``C = R₁₁⁻¹ R₁₂``, with a rank check.

    One host read: the ratio ``|R_rr| / |R_11|`` against ``rtol``. The default
    ``10·√max(m, n)·eps`` (float32: 7.6e-6 at 40 columns, 7.6e-5 at 4096) sits well above the
    rounding noise a rank-deficient input leaves in that ratio (measured in float32: 1e-9 to
    3e-7, up to (1024, 4096)); ``numpy.linalg.matrix_rank``'s ``max(m, n)·eps`` (4.9e-4 at
    4096) would reject float32 weights with a modest spread of scales at transformer sizes.
    Accepting a noise pivot would not amplify much anyway (with column pivoting, the row of
    ``C`` that belongs to the last pivot is bounded by 1 in magnitude), but it would store a
    channel that carries nothing.
    """
    m, n = A.shape
    pivots, R = pivoted_qr(xp, A, rank)
    R11 = _upper(xp, xp.take(R, pivots, axis=1))
    magnitudes = xp.abs(xp.linalg.diagonal(R11))
    first, last = float(magnitudes[0]), float(magnitudes[-1])
    if rtol is None:
        rtol = 10 * math.sqrt(max(m, n)) * float(xp.finfo(A.dtype).eps)
    if first == 0.0:
        raise ValueError(f"{name} is zero: it has no rank-{rank} pivot block")
    if not last > rtol * first:
        raise ValueError(
            f"rank={rank} exceeds the numerical rank of {name}: the pivot block is singular to "
            f"working precision (|R_rr| / |R_11| = {last / first:.2e} <= rtol = {rtol:.2e}, "
            f"QR with column pivoting); its coefficients C would amplify rounding noise. Pass "
            f"a lower rank")
    non_pivots = _complement(xp, pivots, n)
    C = solve_triangular(xp, R11, xp.take(R, non_pivots, axis=1), lower=False)
    return pivots, non_pivots, C


# The pivoting tolerance, shared by every function that pivots (None: the default of the dtype).
_RTOL = Parameter("rtol", "real", minimum=0.0, maximum=1.0, high_open=True, optional=True)


@declare(Parameter("W", "array"), Parameter("rank", "rank"), _RTOL)
def pifa_from_dense(W: Any, rank: int, *, rtol: float | None = None) -> Pivoted:
    """Pivoting factorization of a dense rank-``rank`` matrix (PIFA paper, section 3.2).

    QR with column pivoting of ``W`` itself, ``W P = Q [R₁₁ R₁₂]``, gives the ``rank`` pivot
    output channels (columns of ``W``; the paper's pivot rows, its ``W`` being transposed) and
    ``C = R₁₁⁻¹ R₁₂``. For ``W`` of rank ``rank`` the result is exact to rounding. For a ``W``
    of higher rank it is the column-subset (interpolative) approximation ``W_p @ C`` with ``C``
    the least-squares coefficients, usually worse than a truncated SVD: compress with
    :mod:`matfactor.svd` first and use :func:`pifa_from_factors`.

    Parameters
    ----------
    W
        ``(d_in, d_out)`` weight of ``Y = X @ W``.
    rank
        Number of pivot channels, in ``[1, min(d_in, d_out)]``.
    rtol
        A pivot block with ``|R_rr| <= rtol·|R_11|`` is rejected; default
        ``10·√max(d_in, d_out)·eps`` of the compute dtype. ``0`` rejects only an exactly
        singular block.

    Returns
    -------
    Pivoted
        In the compute dtype (float32 for half-precision input), on ``W``'s device.

    Raises
    ------
    ValueError
        If ``rank`` is out of range, ``W`` holds NaN/Inf, or ``W`` has numerical rank below
        ``rank`` (the message names the rank and the ratio ``|R_rr| / |R_11|``).

    Notes
    -----
    Cost: ``O(d_in·d_out·rank)`` for the QR (on NumPy, LAPACK factors all ``min(d_in, d_out)``
    columns) and ``O(rank²·d_out)`` for ``C``.
    """
    xp, _ = check.namespace(W=W)
    W = check.matrix(xp, W, "W", check.common_dtype(xp, W=W))
    rank, rtol = contract(pifa_from_dense).validate({"shape": tuple(W.shape)}, rank=rank,
                                                    rtol=rtol).values()
    # Pivots and C do not depend on the scale of W: compute on W at unit magnitude.
    W, w_exponent = check.normalised(xp, W, "W")
    pivots, non_pivots, C = _pivots_and_coefficients(xp, W, rank, rtol, "W")
    W_p = check.times_power_of_two(xp, xp.take(W, pivots, axis=1), w_exponent)
    return Pivoted(pivots, non_pivots, W_p, C)


@declare(Parameter("U", "array"), Parameter("V", "array"), _RTOL)
def pifa_from_factors(U: Any, V: Any, *, rtol: float | None = None) -> Pivoted:
    """PIFA of ``Ŵ = U @ Vᵀ`` in ``O((d_in + d_out)·r²)``, never forming ``Ŵ``.

    The paper (section 3.2) multiplies the factors and factors the product; the product's
    columns are ``U`` applied to the rows of ``V``, so everything can be read off the factors:

    1. ``U = Q_U R_U`` (thin QR). ``Ŵ = Q_U (R_U Vᵀ)`` and ``Q_U`` is an isometry, so the
       ``(r, d_out)`` matrix ``Z = R_U Vᵀ`` has exactly the column geometry of ``Ŵ``: QR with
       column pivoting of ``Z`` picks the pivots that QR of ``Ŵ`` would (choosing them from
       ``Vᵀ`` alone would ignore the scales ``U`` gives its columns).
    2. ``C = R₁₁⁻¹ R₁₂`` from that factorization of ``Z``; it equals
       ``solve(V[pivots]ᵀ, V[non_pivots]ᵀ)`` for full-rank ``U``, computed more stably.
    3. ``W_p = U @ V[pivots]ᵀ``.

    Parameters
    ----------
    U
        ``(d_in, r)`` input factor.
    V
        ``(d_out, r)`` output factor (the :class:`matfactor.svd.LowRank` convention
        ``Ŵ = U @ V.T``; the paper's ``U Vᵀ`` with the roles of the factors swapped by the
        transposition).
    rtol
        Rejection threshold for the pivot block, as in :func:`pifa_from_dense`; default
        ``10·√d_out·eps``.

    Returns
    -------
    Pivoted
        Of rank ``r``, in the compute dtype, on the factors' device.

    Raises
    ------
    ValueError
        If shapes disagree, ``r > min(d_in, d_out)``, an input holds NaN/Inf, or ``U @ Vᵀ``
        has numerical rank below ``r`` (rank-deficient ``U`` or ``V``): the message names the
        rank.
    """
    xp, _ = check.namespace(U=U, V=V)
    dtype = check.common_dtype(xp, U=U, V=V)
    U = check.matrix(xp, U, "U", dtype)
    V = check.matrix(xp, V, "V", dtype)
    if U.shape[1] != V.shape[1]:
        raise ValueError(f"U has shape {tuple(U.shape)} and V has shape {tuple(V.shape)}: both must "
                         "have r columns (U: (d_in, r), V: (d_out, r), Ŵ = U @ V.T)")
    (d_in, r), d_out = U.shape, V.shape[0]
    if r > min(d_in, d_out):
        raise ValueError(f"rank must be an integer in [1, {min(d_in, d_out)}]: the factors' "
                         f"r = U.shape[1] = {r} must be at most min(d_in, d_out) = "
                         f"min({d_in}, {d_out})")
    rtol = contract(pifa_from_factors).validate(rtol=rtol)["rtol"]
    return _pifa_from_factors(xp, U, V, rtol)


def _pifa_from_factors(xp: Any, U: Any, V: Any, rtol: float | None) -> Pivoted:
    """:func:`pifa_from_factors` on validated factors, computed at unit magnitude."""
    U, u_exponent = check.normalised(xp, U, "U")
    V, v_exponent = check.normalised(xp, V, "V")
    _, R_U = xp.linalg.qr(U)
    pivots, non_pivots, C = _pivots_and_coefficients(xp, R_U @ V.T, U.shape[1], rtol, "U @ V.T")
    W_p = check.times_power_of_two(xp, U @ xp.take(V, pivots, axis=0).T, u_exponent + v_exponent)
    return Pivoted(pivots, non_pivots, W_p, C)


@declare(Parameter("shape", "shape"),
         Parameter("density", "real", minimum=0.0, maximum=1.0, low_open=True),
         Parameter("multiple_of", "integer", minimum=1))
def pifa_rank_for_density(shape: tuple[int, int], density: float, *, multiple_of: int = 1) -> int:
    """The largest rank whose PIFA layer fits in ``density`` of the dense parameters.

    The largest ``r <= min(d_in, d_out)`` with ``r·(d_in + d_out − r) <= density·d_in·d_out``
    (section 3.3; the ``r`` pivot indices are not counted, as in the paper's densities). At
    ``density = 1`` this is ``min(d_in, d_out)``. For a square ``d x d`` weight,
    ``r ≈ d (1 − √(1 − density))``, against ``d·density / 2`` for two factors.

    Parameters
    ----------
    shape
        ``(d_in, d_out)``.
    density
        Kept fraction of the ``d_in·d_out`` parameters, in (0, 1].
    multiple_of
        Round the rank down to a multiple of this (e.g. 8): with ``d_out`` a multiple of it too,
        both products of the layer have aligned widths, which BLAS libraries run markedly
        faster (see :meth:`Pivoted.matmul`).

    Raises
    ------
    ValueError
        If ``shape`` is not two positive integers, ``density`` is not in (0, 1], or not even
        rank ``multiple_of`` fits in the budget.
    """
    multiple_of, (d_in, d_out), density = contract(pifa_rank_for_density).validate(
        multiple_of=multiple_of, shape=shape, density=density).values()
    total, budget = d_in + d_out, float(density) * d_in * d_out
    # r(total − r) increases on [0, total/2] ⊇ [0, min(d_in, d_out)]: start at the smaller root
    # of r² − total·r + budget = 0 and correct the rounding in exact integer arithmetic.
    root = (total - math.sqrt(max(total * total - 4.0 * budget, 0.0))) / 2
    r = min(int(root) + 1, min(d_in, d_out))
    while r > 0 and r * (total - r) > budget * (1 + 1e-12):
        r -= 1
    r -= r % int(multiple_of)
    if r == 0:
        smallest = int(multiple_of)
        raise ValueError(f"density={density} is too small for shape {(d_in, d_out)}: rank "
                         f"{smallest} already needs {smallest * (total - smallest)} values, over "
                         f"the budget of {budget:.0f}")
    return r


# --------------------------------------------------------------------------- memory model


@_memory.counts(pifa_from_factors)
def _pifa_from_factors_memory(problem: _memory.Problem) -> _memory.SolveMemory:
    """``_pifa_from_factors`` beside its factors (:func:`matfactor._memory.pifa_from_factors_bytes`)."""
    d_in, d_out, r, s = problem.d_in, problem.d_out, problem.rank, problem.itemsize
    return _memory.SolveMemory(_memory.pifa_from_factors_bytes(d_in, d_out, r, s),
                               _memory.pivoted_bytes(d_in, d_out, r, s))
