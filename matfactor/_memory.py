"""Memory models of the solvers: the bytes one call holds at its worst moment.

Each public solver's model lives beside it, in its own module, and counts the arrays that its
code has alive together (the comments of each model name them); :func:`counts` registers it and
:func:`solve_memory` evaluates it. The model side's memory plan
(:mod:`matfactor.adapters.memory`) adds the solve's inputs and its own end (the layer error of
the result), and documents the units and how the models were validated against measured peaks.

The units, for a ``(d_in, d_out)`` problem of itemsize ``s``: ``M = d_in d_out s`` (one
weight-shaped array), ``Hh = d_in² s`` (one Gram-shaped array), ``B = d_in d_out`` (a boolean
mask). The LAPACK routines (MKL under PyTorch on the CPU) work in buffers of their own, bounded
by :func:`svd_bytes` and :func:`eigh_bytes`; exact top-k masks by :func:`top_k_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class SolveMemory:
    """What one solver call holds, in bytes.

    Attributes
    ----------
    peak
        Beyond its inputs ``W`` and ``H`` (or statistics), at its worst moment: the front door's
        checked and scaled copies, its temporaries and its result.
    result
        The arrays of the result it returns.
    retained
        What stays allocated after it returns besides the result (MKL's buffer pool after an SVD).
    """

    peak: int
    result: int
    retained: int = 0


@dataclass(frozen=True)
class Problem:
    """The sizes a memory model reads: ``(d_in, d_out)``, the itemsize, the rank the budget gives
    (``min(d_in, d_out)`` when there is none, at most that), whether the pattern is n:m, and the
    solver's keyword options (those that change the arrays it allocates)."""

    d_in: int
    d_out: int
    itemsize: int
    rank: int
    nm: bool
    options: dict[str, Any]

    @property
    def M(self) -> int:
        return self.d_in * self.d_out * self.itemsize

    @property
    def Hh(self) -> int:
        return self.d_in * self.d_in * self.itemsize

    @property
    def mn(self) -> int:
        return self.d_in * self.d_out


_MODELS: dict[Callable[..., Any], Callable[[Problem], SolveMemory]] = {}


Model = Callable[[Problem], SolveMemory]


def counts(solver: Callable[..., Any]) -> Callable[[Model], Model]:
    """Register the decorated function as the memory model of ``solver``."""
    def register(model: Model) -> Model:
        _MODELS[solver] = model
        return model
    return register


def solve_memory(solver: Callable[..., Any], shape: tuple[int, int], itemsize: int, *,
                 rank: int | None = None, pattern: str | None = None,
                 options: dict[str, Any] | None = None) -> SolveMemory:
    """The memory model of one call of ``solver`` on a ``shape`` problem.

    Parameters
    ----------
    solver
        A public solver of matfactor (``matfactor.admm_prune``, ...).
    shape
        ``(d_in, d_out)``, already validated.
    itemsize
        Bytes per value of the compute dtype.
    rank
        The rank of a low-rank result (``None``: ``min(d_in, d_out)``).
    pattern
        The sparsity pattern (an n:m one holds more masks).
    options
        The keyword options of the call.
    """
    d_in, d_out = shape
    k = min(d_in, d_out)
    return _MODELS[solver](Problem(d_in, d_out, itemsize, min(rank or k, k), ":" in (pattern or ""),
                                   dict(options or {})))


def svd_bytes(p: int, q: int, s: int) -> int:
    """Peak new bytes of ``torch.linalg.svd`` of a ``(p, q)`` matrix, ``full_matrices=False``.

    The factors ``(p, k)``, ``(k,)``, ``(k, q)``, the column-major copy of the input and MKL's
    ``gesdd`` workspace, measured at most ``4 k²`` (1024² to (2816, 1024), float32 and float64).
    """
    k = min(p, q)
    return s * (p * k + k + k * q + p * q + 4 * k * k)


def svd_retained(p: int, q: int, s: int) -> int:
    """What MKL keeps in its buffer pool after a ``gesdd`` (about ``1.3 k² s`` measured at
    (2816, 1024); none with ``MKL_DISABLE_FAST_MM=1``), still resident after the solve."""
    k = min(p, q)
    return 3 * k * k * s // 2


def eigh_bytes(n: int, s: int) -> int:
    """Peak new bytes of ``torch.linalg.eigh`` of an ``(n, n)`` matrix: the eigenvectors and
    ``syevd``'s ``1 + 6n + 2n²`` workspace (measured ``2 n²``)."""
    return s * (3 * n * n + 8 * n)


def top_k_bytes(mn: int, s: int) -> int:
    """Bytes of an exact top-k mask beyond its scores (``matfactor._array.top_k_mask``):
    ``kthvalue``'s copy and int64 indices, or, with ties at the threshold, the int32 counts,
    their cumulative sum and five boolean masks; the mask itself (one byte per entry) after."""
    return max(mn * s + 8 * mn, 13 * mn)


def weighted_lowrank_bytes(d_in: int, d_out: int, r: int, s: int, damping: bool) -> int:
    """``matfactor.svd._weighted_lowrank`` beyond its arguments ``W`` and ``H`` (shared by the
    models of :func:`matfactor.weighted_lowrank` and :func:`matfactor.mpifa`)."""
    M, Hh = d_in * d_out * s, d_in * d_in * s
    # diagonal_scaling: H/D and H/D/D (2 Hh); with damping, eye, eye·λ and the sum
    scaling = (5 if damping else 2) * Hh
    # W_n: zeros, W·scale, the where (3 M) beside H_n
    w_n = Hh + 3 * M
    # _whiten: eigh(H_n) beside H_n and W_n
    eigh = Hh + M + eigh_bytes(d_in, s)
    # _whitened_lowrank: H_n, Q, W_n, QᵀW_n, QᵀW_n·√e and the SVD of it
    svd = 2 * Hh + 3 * M + svd_bytes(d_in, d_out, s)
    # after: H_n, Q, W_n, QᵀW_n, Vh; QᵀW_n V, zeros and the where, or Q @ projected, U/scale
    # and the where, or the signs (at most three (d_in, r) or (d_out, r) at once)
    after = 2 * Hh + 3 * M + min(d_in, d_out) * d_out * s + 3 * (d_in + d_out) * r * s
    return max(scaling, w_n, eigh, svd, after)


def pifa_from_factors_bytes(d_in: int, d_out: int, r: int, s: int) -> int:
    """``matfactor.pifa._pifa_from_factors`` beside its factors ``U``, ``V``: U, V scaled,
    ``qr(U)``, ``R_U Vᵀ``, scipy's pivoted QR of it (its copy and R), R in the original order,
    C, then W_p; all ``O(r)`` (shared by the models of :func:`matfactor.pifa_from_factors` and
    :func:`matfactor.mpifa`)."""
    return s * (2 * (d_in + d_out) * r + 5 * r * d_out + 3 * r * r + d_in * r)


def pivoted_bytes(d_in: int, d_out: int, r: int, s: int) -> int:
    """A :class:`matfactor.Pivoted` result: W_p, C, the pivots and the non-pivots (int64), and
    the gather its layer computes."""
    return (d_in * r + r * (d_out - r)) * s + 24 * d_out
