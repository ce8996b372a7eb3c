"""Memory: the peak bytes of one layer solve, and the plan of a run checked before it starts.

:func:`solve_bytes` is the memory model of one solve; :func:`memory_plan` (through
:func:`~matfactor.adapters.compression_plan` and :func:`~matfactor.adapters.compress_model`)
applies it to every layer a recipe selects, adds the allocator's slack, and
:meth:`MemoryPlan.check` refuses a run whose largest solve cannot have that much on its
device, naming the layer, before anything runs instead of dying in the middle of a long job.

The model of one solve.

A layer solve holds its inputs (``W``, ``H``, or MPIFA's statistics), the arrays its method
allocates on the way, and at the end the result's factors while
:func:`matfactor.layer_error` scores them. :func:`solve_bytes` counts, for each method, the
arrays that are alive together at the method's worst moment, read off the solvers in
``matfactor/`` (the lines are named in the comments of each formula), and takes the largest of
those moments. The units, for a ``(d_in, d_out)`` layer of itemsize ``s``:

``M = d_in d_out s``
    one weight-shaped array (``W``, its scaled copy, a mask in the compute dtype, a residual);
``Hh = d_in² s``
    one Gram-shaped array (``H``, its scaled copy, an inverse, a Cholesky factor,
    eigenvectors);
``K = k² s``, ``k = min(d_in, d_out)``
    DSF's square factor and its Gram matrices;
``B = d_in d_out``, ``I = 8 d_in d_out``
    a boolean mask, and the int64 indices that ``torch.kthvalue`` allocates beside its copy of
    the scores (every exact top-k mask: pruning masks, ADMM's and DSF's mask updates).

What every method shares:

- the front door (:func:`matfactor._validation.layer_problem`) validates ``H`` with a scaled
  copy, its transposed difference and the absolute value of that (``3 Hh`` for a moment,
  ``symmetric``), then keeps the solver's copies of ``W`` and ``H`` scaled by powers of two
  (``M + Hh``; the scaling copies whenever the exponent is not 0, which is the usual case);
- :func:`~.methods.solve_layer` ends with ``layer_error(W, result.dense(), H)``: the factors,
  the dense product and, at the moment of
  ``_weighted_sq_norm`` (``matfactor/error.py``), ``H`` scaled, ``D``, ``D`` scaled, ``W``
  scaled, ``H D`` and ``D ⊙ (H D)``: ``R + M + max(3 Hh, Hh + 5 M)`` with ``R`` the result;
- LAPACK (MKL under PyTorch on the CPU) works in buffers of its own: ``eigh`` (``syevd``)
  ``2 n²`` beside its eigenvectors, ``svd`` (``gesdd``, thin) a column-major copy of the
  input and about ``4 k²`` beside its factors (measured, bounded by :func:`_svd`); after an
  SVD, MKL's buffer pool keeps about ``1.3 k² s`` resident (counted as ``1.5 k² s`` at the end).

The peaks beyond the inputs, method by method (``svd`` and ``eigh`` the LAPACK peaks above,
``R`` the result, ``end = R + M + max(3 Hh, Hh + 5 M)`` the error computation; the comments in
the code name every array):

====================== ==================================================================
magnitude, wanda       ``max(3 M + B, 2 M + I, end)`` with ``R = M``
sparsegpt              ``max(4 Hh, Hh + 5 M, end)``
admm                   ``max(M + 5 Hh, 2 Hh + 12 M + I + 2 B, end)`` (n:m: ``+ M + B``)
dsf                    ``Hh + 2 M + max(2 M + 21 K + 9 k², 16 M + 5 K + I + B)`` (tall: ``+ 2 M``),
                       the finalizations, ``end`` with ``R = (d_in + d_out) k s``
lowrank                ``max(M + svd + 3 R, end)`` with ``R = (d_in + d_out) r s``
weighted_lowrank, pifa ``Hh + M + max(2 Hh + 3 M + svd, Hh + M + eigh, ...)``, ``end``
mpifa                  ``2 M + Hh + max(2 Hh + 3 M + svd, Hh + M + eigh, ...)``, ``end``;
                       inputs ``M + 3 Hh``
sparse_lowrank         defaults: ``max(M + 4 Hh, 10 M + 3 Hh, end)``; the variants in the code
====================== ==================================================================

Arrays of ``O((d_in + d_out) r)`` are counted where they matter (the low-rank results), and a
margin of ``4 MiB + M/20 + Hh/32`` covers what the model leaves out (vectors, small masks,
LAPACK's small allocations, pages of the allocator).

The model counts live bytes. It was validated on a 2-core CPU (PyTorch 2.13 with MKL, one
thread) against the peak resident set of processes whose large allocations are ``mmap``-ed
(``MALLOC_MMAP_THRESHOLD_=65536``): freed arrays then leave the resident set at once, and its
peak is the live peak. Over 89 solves (every method, 1024², (1024, 2816), (2816, 1024),
float32 and float64, densities 0.5 and 0.25, n:m and per-output patterns, the arguments read
below; magnitude and ADMM at 4096²) the measured peak was 0.80 to 0.997 of the model, never
above it. Iteration counts
(``iters``, ``outer_iters``, ...) change no peak: every iteration allocates the same arrays.

Allocator slack comes on top. glibc's default heap keeps freed arrays below its dynamic
``mmap`` threshold (at most 32 MiB) for reuse: at those sizes the resident peak of a process
was 1% to 50% above the live peak (up to 130 MiB, ADMM at (2816, 1024) float32); at
4096 x 4096 float32, where every weight-sized array is above the threshold, 0% to 2%. PyTorch's
caching allocator on a GPU likewise reserves more than it allocates. A caller comparing the
model with free memory should keep such a margin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from matfactor import _validation as check

from .layers import weight_matrix
from .methods import METHODS, Budget, resolve_budget

__all__ = ["MemoryPlan", "PlannedSolve", "available_memory", "error_bytes", "format_bytes", "memory_plan",
           "solve_bytes"]

_MIB = 1 << 20


def _svd(p: int, q: int, s: int) -> int:
    """Peak new bytes of ``torch.linalg.svd`` of a ``(p, q)`` matrix, ``full_matrices=False``.

    The factors ``(p, k)``, ``(k,)``, ``(k, q)``, the column-major copy of the input and MKL's
    ``gesdd`` workspace, measured at most ``4 k²`` (1024² to (2816, 1024), float32 and float64).
    """
    k = min(p, q)
    return s * (p * k + k + k * q + p * q + 4 * k * k)


def _eigh(n: int, s: int) -> int:
    """Peak new bytes of ``torch.linalg.eigh`` of an ``(n, n)`` matrix: the eigenvectors and
    ``syevd``'s ``1 + 6n + 2n²`` workspace (measured ``2 n²``)."""
    return s * (3 * n * n + 8 * n)


def _top_k(mn: int, s: int) -> int:
    """Bytes of an exact top-k mask beyond its scores (``matfactor._array.top_k_mask``):
    ``kthvalue``'s copy and int64 indices, or, with ties at the threshold, the int32 counts,
    their cumulative sum and five boolean masks; the mask itself (one byte per entry) after."""
    return max(mn * s + 8 * mn, 13 * mn)


def _pruner(pruner: str, M: int, mn: int, s: int, Hh: int, nm: bool) -> tuple[int, int]:
    """``(persistent, peak)`` of one call of a built-in pruner inside the sparse-plus-low-rank
    alternation, beyond the target it is given: the factor it keeps of ``H``, and its peak."""
    B = mn
    if pruner in ("magnitude", "wanda"):
        # scores (|W|, or |W|·norms), top-k, then zeros_like and the where
        return 0, max(M + _top_k(mn, s), 3 * M + B)
    if pruner == "sparsegpt":
        # the (d_in, d_in) factor U; the sweep: where(dead, zeros, W) and its zeros, the
        # first block's  U[...].T @ errors  and the difference, then the concatenated rows
        return Hh, 4 * M
    # ADMM: H_n and (H_n + ρI)⁻¹ kept; the loop (see "admm" below) without W_scaled
    return 2 * Hh, 10 * M + _top_k(mn, s) + 2 * B + (M + B if nm else 0)


def _layer_error(R: int, dense: int, M: int, Hh: int, retained: int = 0) -> int:
    """The end of ``solve_layer``: the result ``R``, its dense form, ``layer_error``, and
    what LAPACK kept of an earlier SVD (``retained``)."""
    return R + dense + max(3 * Hh, Hh + 5 * M) + retained


def error_bytes(shape: tuple[int, int], result_bytes: int, itemsize: int) -> int:
    """The end of every solve, for a method's ``work_bytes``: the result (``result_bytes``), its
    dense form ``Ŵ`` and :func:`matfactor.layer_error`'s temporaries while ``solve_layer``
    scores it (see the module docstring, *What every method shares*).

    Parameters
    ----------
    shape
        ``(d_in, d_out)``.
    result_bytes
        Bytes of the result's arrays.
    itemsize
        Bytes per value of the compute dtype.
    """
    d_in, d_out = shape
    M, Hh = d_in * d_out * itemsize, d_in * d_in * itemsize
    return _layer_error(result_bytes, M, M, Hh)


def _svd_retained(d_in: int, d_out: int, s: int) -> int:
    """What MKL keeps in its buffer pool after a ``gesdd`` (about ``1.3 k² s`` measured at
    (2816, 1024); none with ``MKL_DISABLE_FAST_MM=1``), still resident at the end."""
    k = min(d_in, d_out)
    return 3 * k * k * s // 2


def solve_bytes(method: str, shape: tuple[int, int], budget: Budget, arguments: dict[str, Any],
                itemsize: int) -> int:
    """Peak bytes one layer solve of ``method`` needs on its device at this shape.

    Counts its inputs (``W``, ``H``, or MPIFA's statistics), the result's factors and the
    method's work arrays (module docstring).

    Parameters
    ----------
    method
        A method of :data:`~.methods.METHODS`.
    shape
        ``(d_in, d_out)`` of the layer's weight.
    budget
        The resolved budget (:func:`~.methods.resolve_budget`): its ``rank`` sizes the low-rank
        results.
    arguments
        The recipe's keyword arguments for the method. Those that add arrays are read: DSF's
        ``finalize`` and ``finalize_input_factor``, ``weighted_lowrank``'s and ``pifa``'s
        ``damping``, MPIFA's ``init``, ``sparse_lowrank``'s ``hessian``, ``pruner`` (a
        callable is bounded by the ADMM pruner) and ``lowrank``. The others change no peak
        (iteration counts, ``split``, ``block_size``, ``rtol``) or only lower it (MPIFA's
        ``alpha=0`` or ``mix=0``, DSF's ``square_mask``), and the model keeps the default's.
    itemsize
        Bytes per value of the compute dtype: 4 (float32) or 8 (float64).

    Returns
    -------
    int
        Bytes.

    Raises
    ------
    ValueError
        For an unknown ``method`` or a shape or itemsize out of range.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(sorted(METHODS))}, got {method!r}")
    d_in, d_out = (int(d) for d in shape)
    if d_in < 1 or d_out < 1:
        raise ValueError(f"shape must be two positive integers (d_in, d_out), got {shape!r}")
    if itemsize not in (4, 8):
        raise ValueError(f"itemsize must be 4 (float32) or 8 (float64), got {itemsize!r}")
    M, Hh = d_in * d_out * itemsize, d_in * d_in * itemsize
    spec = METHODS[method]
    # W and H; two-stream statistics (MPIFA): W, the H passed beside the statistics, and the
    # statistics' two sums (H and error_cross; a third, error_gram, only with
    # track_error_gram=True)
    inputs = M + (3 if spec.needs_streams else 1) * Hh
    margin = 4 * _MIB + M // 20 + Hh // 32
    return inputs + int(spec.work_bytes((d_in, d_out), budget, arguments, itemsize)) + margin


def _units(shape: tuple[int, int], budget: Budget, itemsize: int) -> tuple[int, int, int, int, int, bool]:
    """``(d_in, d_out, r, M, Hh, nm)`` of a solve: the rank the budget gives (at most
    ``min(d_in, d_out)``), the weight- and Gram-shaped bytes, whether the pattern is n:m (whose
    gradual ADMM masks hold one more mask and score array)."""
    d_in, d_out = shape
    k = min(d_in, d_out)
    return (d_in, d_out, min(budget.rank or k, k), d_in * d_out * itemsize, d_in * d_in * itemsize,
            ":" in (budget.pattern or ""))


def score_pruning_work(shape: tuple[int, int], budget: Budget, arguments: dict[str, Any],
                       itemsize: int) -> int:
    """Magnitude and Wanda: W scaled, ``|W|``, the scores (3 M); then the scores, kthvalue's copy
    and indices; then the scores, the mask, ``zeros_like(W)`` and the result (``problem.keep``)."""
    d_in, d_out, _, M, Hh, _ = _units(shape, budget, itemsize)
    mn = d_in * d_out
    solve = max(3 * Hh, 3 * M, M + _top_k(mn, itemsize), 3 * M + mn)
    return max(solve, _layer_error(M, 0, M, Hh))


def sparsegpt_work(shape: tuple[int, int], budget: Budget, arguments: dict[str, Any],
                   itemsize: int) -> int:
    """SparseGPT: ``_sparsegpt_factor``: H scaled, eye, eye·λ and H + λI (``add_to_diagonal``);
    then H + λI, its Cholesky factor, the inverse and the factor of the inverse (4 Hh);
    ``_sparsegpt_with_factor``: U, W scaled, ``where(dead, zeros, W)`` and its zeros, the first
    block's product ``U[...].T @ errors`` and the difference (Hh + 5 M)."""
    _, _, _, M, Hh, _ = _units(shape, budget, itemsize)
    solve = max(3 * Hh, 4 * Hh, Hh + 5 * M)
    return max(solve, _layer_error(M, 0, M, Hh))


def admm_work(shape: tuple[int, int], budget: Budget, arguments: dict[str, Any], itemsize: int) -> int:
    """ADMM: ``_admm_factor``: W scaled, H scaled, H/D/D (two), eye, eye·λ, the sum (M + 5 Hh);
    the loop (``_admm_iterations`` at a gradual mask step): H_n and (H_n + ρI)⁻¹ (2 Hh); W scaled,
    W_n, target, the cold start's U = 0 (kept by ``_admm_prune_with_factor``), Ŵ, U, V, on, off,
    signed ρ, ``|V|`` and kthvalue's copy (12 M), its indices and the old and new masks; n:m
    (``_gradual_mask``): the mask of the n best and ``where(it, inf, |V|)``."""
    d_in, d_out, _, M, Hh, nm = _units(shape, budget, itemsize)
    mn = B = d_in * d_out
    solve = max(3 * Hh, M + 5 * Hh, 2 * Hh + 12 * M + 8 * mn + 2 * B + (M + B if nm else 0))
    return max(solve, _layer_error(M, 0, M, Hh))


def lowrank_work(shape: tuple[int, int], budget: Budget, arguments: dict[str, Any], itemsize: int) -> int:
    """Truncated SVD (no H): W scaled and the SVD of it, then U·σ, the sign fix of U and V."""
    d_in, d_out, r, M, Hh, _ = _units(shape, budget, itemsize)
    R = (d_in + d_out) * r * itemsize
    solve = M + _svd(d_in, d_out, itemsize) + 3 * R
    return max(solve, _layer_error(R, M, M, Hh, _svd_retained(d_in, d_out, itemsize)))


def weighted_lowrank_work(shape: tuple[int, int], budget: Budget, arguments: dict[str, Any],
                          itemsize: int) -> int:
    """Weighted low rank (``matfactor.svd._weighted_lowrank``) and its result's error."""
    d_in, d_out, r, M, Hh, _ = _units(shape, budget, itemsize)
    solve = max(3 * Hh, _weighted_lowrank(d_in, d_out, r, itemsize, bool(arguments.get("damping", 0.0)))
                + Hh + M)
    R = (d_in + d_out) * r * itemsize
    return max(solve, _layer_error(R, M, M, Hh, _svd_retained(d_in, d_out, itemsize)))


def pifa_work(shape: tuple[int, int], budget: Budget, arguments: dict[str, Any], itemsize: int) -> int:
    """Weighted low rank, then ``pifa_from_factors`` beside U and V: U, V scaled, ``qr(U)``,
    ``R_U Vᵀ``, scipy's pivoted QR of it (its copy and R), R in the original order, C, then W_p."""
    d_in, d_out, r, M, Hh, _ = _units(shape, budget, itemsize)
    solve = max(3 * Hh, _weighted_lowrank(d_in, d_out, r, itemsize, bool(arguments.get("damping", 0.0)))
                + Hh + M, _pifa_stage(d_in, d_out, r, itemsize))
    return max(solve, _layer_error(_pifa_result(d_in, d_out, r, itemsize), M, M, Hh,
                                   _svd_retained(d_in, d_out, itemsize)))


def mpifa_work(shape: tuple[int, int], budget: Budget, arguments: dict[str, Any], itemsize: int) -> int:
    """MPIFA (``matfactor.reconstruct``) beyond its statistics."""
    d_in, d_out, r, M, Hh, _ = _units(shape, budget, itemsize)
    s = itemsize
    init_target = arguments.get("init", "weight") == "target"
    # statistics._scaled: isfinite(H) (bytes), W scaled; _target: H W, error_cross W,
    # mix·(error_cross W) and the sum (W scaled + 4 M)
    solve = max(d_in * d_in + M, 5 * M)
    # _Regularised: eye, eye·a, H + aI (3 Hh) beside W scaled and G; then H + aI and
    # G + aW kept with W scaled (2 M + Hh)
    base = 2 * M + Hh
    solve = max(solve, 2 * M + 3 * Hh)
    # init="target": the Cholesky factor of H + aI, (H + aI)⁻¹(G + aW) and its solve
    start = base + (Hh + 2 * M if init_target else 0)
    # _weighted_lowrank on the stored H (no front door, no copies of W and H)
    solve = max(solve, start + _weighted_lowrank(d_in, d_out, r, s, False))
    # the sweep: the Cholesky factor of H + aI kept in reg._L, thin solves
    solve = max(solve, base + Hh + 6 * (d_in + d_out) * r * s)
    solve = max(solve, base + Hh + _pifa_stage(d_in, d_out, r, s))
    return max(solve, _layer_error(_pifa_result(d_in, d_out, r, s), M, M, Hh, _svd_retained(d_in, d_out, s)))


def _pifa_result(d_in: int, d_out: int, r: int, s: int) -> int:
    """A :class:`matfactor.Pivoted`: W_p, C, the pivots, the non-pivots and the gather."""
    return (d_in * r + r * (d_out - r)) * s + 24 * d_out


def _pifa_stage(d_in: int, d_out: int, r: int, s: int) -> int:
    """``matfactor.pifa._pifa_from_factors`` with its factors ``U``, ``V``: all ``O(r)``."""
    return s * (2 * (d_in + d_out) * r + 5 * r * d_out + 3 * r * r + d_in * r)


def _weighted_lowrank(d_in: int, d_out: int, r: int, s: int, damping: bool) -> int:
    """``matfactor.svd._weighted_lowrank`` beyond its arguments ``W`` and ``H``."""
    M, Hh = d_in * d_out * s, d_in * d_in * s
    # diagonal_scaling: H/D and H/D/D (2 Hh); with damping, eye, eye·λ and the sum
    scaling = (5 if damping else 2) * Hh
    # W_n: zeros, W·scale, the where (3 M) beside H_n
    w_n = Hh + 3 * M
    # _whiten: eigh(H_n) beside H_n and W_n
    eigh = Hh + M + _eigh(d_in, s)
    # _whitened_lowrank: H_n, Q, W_n, QᵀW_n, QᵀW_n·√e and the SVD of it
    svd = 2 * Hh + 3 * M + _svd(d_in, d_out, s)
    # after: H_n, Q, W_n, QᵀW_n, Vh; QᵀW_n V, zeros and the where, or Q @ projected, U/scale
    # and the where, or the signs (at most three (d_in, r) or (d_out, r) at once)
    after = 2 * Hh + 3 * M + min(d_in, d_out) * d_out * s + 3 * (d_in + d_out) * r * s
    return max(scaling, w_n, eigh, svd, after)


def dsf_work(shape: tuple[int, int], budget: Budget, arguments: dict[str, Any], itemsize: int) -> int:
    """Double sparse factorization (``matfactor.dsf``)."""
    d_in, d_out = shape
    s = itemsize
    mn = d_in * d_out
    M, Hh, B = mn * s, d_in * d_in * s, mn
    k = min(d_in, d_out)
    K, kk = k * k * s, k * k
    # the front door's H and W scaled, and the input-norm-scaled target (kept by _double_sparse)
    base = Hh + 2 * M
    # the other factor's initial mask: |T|, kthvalue's copy and indices; then zeros, the where
    start = base + max(M + _top_k(mn, s), 3 * M + B)
    # S-update (_sparse_regression with G = other otherᵀ, k x k): the factors other and U_other
    # (2 M), S and U_S; G, otherTᵀ, the contiguous copies of Sᵀ and U_Sᵀ, G_n, zeros, target,
    # Z_n, U_n, the first step and (G_n + I)⁻¹ (11 K); the loop at a mask step: Ŵ, U, V, on, off,
    # signed ρ, |V| and kthvalue's copy (8 K), its indices and the mask
    s_update = base + 2 * M + 21 * K + 8 * kk + kk
    # other-update (F = S, unknown k x max): other, U_other, S^T T, zeros, target, Z_n, U_n,
    # the first step (8 M), the loop's 8 arrays as above (8 M), the Gram matrices (5 K), the
    # indices and the mask; a tall weight's transposed other and U_other are copied to
    # row-major order (contiguous) at every update (2 M)
    other_update = base + 16 * M + 5 * K + 8 * mn + B + (2 * M if d_in > d_out else 0)
    peak = max(3 * Hh, start, s_update, other_update)
    A, Bf = d_in * k * s, k * d_out * s
    if arguments.get("finalize", True):
        # _finalize_output_factor: A, B, H A, AᵀHA, G_n, (G_n + I)⁻¹ (+ eye, sum), the target,
        # B_n, target/scale, zeros and the loop's 8 arrays
        peak = max(peak, base + 2 * A + 13 * Bf + 5 * K + k * d_out)
        if arguments.get("finalize_input_factor", False):
            # _finalize_input_factor beside A and B: H_n; SylvesterSolver: symmetric's 3 Hh, H_n
            # scaled and eigh of it; then H_n, Q, R and BBᵀ kept, and the loop: linear (after
            # W·scale and H_n(W·scale)), Z, U, X, V and a solve's C, C scaled, QᵀC, QᵀCR, the
            # denominator, the quotient and the products back (about 11 A)
            peak = max(peak, base + A + Bf + Hh + max(3 * Hh, Hh + _eigh(d_in, s),
                                                      Hh + 2 * K + 2 * M + A,
                                                      Hh + 2 * K + 11 * A + d_in * k))
    R = (d_in + d_out) * k * s
    return max(peak, _layer_error(R, M, M, Hh))


def sparse_lowrank_work(shape: tuple[int, int], budget: Budget, arguments: dict[str, Any],
                        itemsize: int) -> int:
    """Sparse plus low rank (``matfactor.sparse_lowrank``), every variant."""
    d_in, d_out, r, _, _, nm = _units(shape, budget, itemsize)
    s = itemsize
    mn = d_in * d_out
    M, Hh = mn * s, d_in * d_in * s
    hessian = arguments.get("hessian", "full")
    pruner = arguments.get("pruner") or {"full": "sparsegpt", "diagonal": "wanda",
                                         "identity": "magnitude"}.get(hessian, "sparsegpt")
    lowrank = arguments.get("lowrank") or ("gd" if hessian == "full" else "exact")
    if not isinstance(pruner, str) or pruner not in ("magnitude", "wanda", "sparsegpt", "admm"):
        pruner = "admm"          # a callable: bounded by the largest built-in pruner
    factor, prune = _pruner(pruner, M, mn, s, Hh, nm)
    # W and H scaled; H_method (the diagonal or the identity as a matrix, else H itself); the
    # pruner's factor of H_method; the low-rank coordinates' H_n; Q of the exact full step
    persistent = M + Hh + (Hh if hessian != "full" else 0) + factor + Hh
    exact_full = lowrank == "exact" and hessian == "full"
    persistent += Hh if exact_full else 0
    # setup, beside W and H scaled: the reference tr(WᵀHW) (H W and the product), H_method
    # (eye and the product), the pruner's factor of it (sparsegpt: eye, eye·λ, the sum, then
    # H + λI, the inverse and its factor; admm: H/D/D twice, eye, eye·λ, the sum, the inverse),
    # and for the exact step with the full H, eigh(H_n) beside H_n
    method_hessian = Hh if hessian != "full" else 0
    factor_setup = {"sparsegpt": 3 * Hh, "admm": 5 * Hh}.get(pruner, 0)
    setup = max(3 * Hh, M + Hh + 2 * M, M + Hh + 2 * Hh,
                M + Hh + method_hessian + factor_setup,
                M + Hh + method_hessian + factor + Hh + 2 * M + (_eigh(d_in, s) if exact_full else 0))
    # carried between iterations: the best S, the previous S, T and H_n T, U and V (and their
    # scaled copies, the best ones)
    carry = 4 * M + 8 * (d_in + d_out) * r * s
    if lowrank == "gd":
        # H_n T and T ⊙ H_n T; the objective: residual, (H_n U) Vᵀ, H_n T − that, the product
        step = 3 * M
    else:
        # QᵀT (full), T·√e and the SVD of it; Vh
        step = (M if exact_full else 0) + M + _svd(d_in, d_out, s) + min(d_in, d_out) * d_out * s
    # W − U Vᵀ (the target, and U Vᵀ); to_scaled: W − S, zeros, the product, the where (4 M)
    loop = persistent + carry + max(M + prune, 2 * M, 4 * M, step)
    R = M + (d_in + d_out) * r * s
    return max(setup, loop, _layer_error(R, M, M, Hh, _svd_retained(d_in, d_out, s)))


# --------------------------------------------------------------------------- the plan of a run


def format_bytes(count: float) -> str:
    """``count`` bytes in binary units (``"1.5 GiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def available_memory(device: str | torch.device) -> int | None:
    """Bytes that ``device`` can allocate now: free memory of a CUDA device, ``MemAvailable`` of
    the system for the CPU (Linux; elsewhere the free physical pages), ``None`` if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: Allocator slack on top of the live bytes: glibc's heap keeps freed arrays below its ``mmap``
#: threshold for reuse (measured up to 50% or 130 MiB above the live peak at layer sizes, see the
#: module docstring), and a GPU's caching allocator reserves more than it allocates.
_SLACK_FACTOR = 1.05
_SLACK_BYTES = 160 * _MIB


@dataclass(frozen=True)
class PlannedSolve:
    """The layers of one rule, shape and dtype, and the peak bytes each of their solves needs.

    Attributes
    ----------
    method, shape, dtype, pattern
        The method, the ``(d_in, d_out)`` of the weight, the compute dtype, the sparsity
        pattern.
    layers
        The layers of this row.
    live
        Live bytes at the solve's peak (:func:`solve_bytes`).
    bytes
        What the plan reserves for one solve: ``live`` plus the allocator's slack
        (``5% + 160 MiB``).
    """

    method: str
    shape: tuple[int, int]
    dtype: str
    pattern: str
    layers: tuple[str, ...]
    live: int

    @property
    def bytes(self) -> int:
        """``live`` with the allocator's slack."""
        return int(self.live * _SLACK_FACTOR) + _SLACK_BYTES


@dataclass(frozen=True)
class MemoryPlan:
    """What the layer solves of a run need on their device, and what one solve may have.

    Attributes
    ----------
    solves
        One row per method, shape and dtype, largest first.
    device
        Where the solves run.
    limit
        Bytes one solve may use (``None``: not checked).
    limit_source
        Where ``limit`` comes from, for messages.
    resident
        Bytes the pipeline itself holds on the device while the solves run, taken off what the
        device has before it is shared between the solves: the largest block's weights when the
        model lives elsewhere and each block moves there in turn, and the dense copy of a block
        that carries the dense stream (error correction, MPIFA).
    """

    solves: tuple[PlannedSolve, ...]
    device: str
    limit: int | None
    limit_source: str
    resident: int = 0

    @property
    def peak(self) -> int:
        """The largest need of one solve."""
        return max(row.bytes for row in self.solves)

    def check(self) -> None:
        """Refuse a plan whose largest solve does not fit.

        Raises
        ------
        MemoryError
            Naming the layer, its method and shape, what it needs and what it may have.
        """
        if self.limit is None:
            return
        largest = self.solves[0]
        if largest.bytes > self.limit:
            raise MemoryError(
                f"layer {largest.layers[0]!r} ({largest.method}, W {largest.shape[0]}x{largest.shape[1]} "
                f"{largest.dtype}) needs about {format_bytes(largest.bytes)} on {self.device} to solve, "
                f"but a solve may use {format_bytes(self.limit)} ({self.limit_source}); use fewer "
                "workers, a device with more memory, or a method with a smaller footprint (the plan "
                "lists each)")

    def format_table(self) -> str:
        """The plan as a text table, one row per method, shape and dtype."""
        lines = [f"memory plan on {self.device}: peak of one solve per method and shape "
                 "(live arrays, and with the allocator's slack)"]
        if self.resident:
            lines.append(f"  blocks held on {self.device} by the pipeline: {format_bytes(self.resident)}")
        for row in self.solves:
            method = row.method if row.pattern == "unstructured" else f"{row.method} {row.pattern}"
            lines.append(f"  {method:<16}{row.shape[0]:>6}x{row.shape[1]:<6} {row.dtype:<8}"
                         f"{format_bytes(row.live):>11} live, {format_bytes(row.bytes):>10} reserved  "
                         f"({len(row.layers)} layers)")
        if self.limit is not None:
            verdict = "fits" if self.peak <= self.limit else "does NOT fit"
            lines.append(f"  a solve may use {format_bytes(self.limit)} ({self.limit_source}): {verdict}")
        else:
            lines.append(f"  not checked ({self.limit_source})")
        return "\n".join(lines)


def memory_plan(model: nn.Module, targets: dict[str, tuple[Any, int | None]], *,
                device: str | torch.device, concurrent: int | None,
                memory_limit: int | None = None, resident: int = 0) -> MemoryPlan:
    """The memory plan of compressing the ``targets`` layers of ``model`` on ``device``.

    Layers of one rule (method, pattern, arguments), shape and dtype share a row; rows are
    sorted by need, largest first.

    Parameters
    ----------
    model
        The dense model.
    targets
        ``{layer name: (recipe rule, block index)}``, as the pipeline selects them.
    device
        Where the solves run.
    concurrent
        Solves that run at once on the device (1 in this process, the workers of a local
        pool); ``None``: unknown (a remote executor), so no limit is derived.
    memory_limit
        Bytes one solve may use, overriding what the device has available.
    resident
        Bytes the pipeline holds on the device besides the solves (:attr:`MemoryPlan.resident`),
        taken off the available memory before it is shared.

    Raises
    ------
    ValueError
        A rule's budget does not fit a layer (as the solve would say), or a bad
        ``memory_limit``.
    """
    device = torch.device(device)
    rows: dict[tuple[Any, ...], list[str]] = {}
    needs: dict[tuple[Any, ...], int] = {}
    for name, (rule, _) in targets.items():
        W = weight_matrix(model.get_submodule(name), name)
        dtype = torch.float64 if W.dtype == torch.float64 else torch.float32  # what the solve uses
        shape = (int(W.shape[0]), int(W.shape[1]))
        key = (rule.method, shape, str(dtype).removeprefix("torch."), rule.pattern, rule.density,
               rule.rank, repr(sorted(rule.arguments.items())))
        if key not in needs:
            budget = resolve_budget(METHODS[rule.method], shape, density=rule.density, rank=rule.rank,
                                    pattern=rule.pattern, arguments=dict(rule.arguments), name=name)
            needs[key] = solve_bytes(rule.method, shape, budget, dict(rule.arguments), dtype.itemsize)
        rows.setdefault(key, []).append(name)
    solves = tuple(sorted((PlannedSolve(*key[:4], tuple(names), needs[key])
                           for key, names in rows.items()), key=lambda row: -row.live))
    if memory_limit is not None:
        memory_limit = check.integer("memory_limit", memory_limit, minimum=1)
        return MemoryPlan(solves, str(device), memory_limit, "memory_limit", resident)
    if concurrent is None:
        return MemoryPlan(solves, str(device), None, "the executor's workers; give memory_limit", resident)
    available = available_memory(device)
    if available is None:
        return MemoryPlan(solves, str(device), None, f"{device} does not report its free memory", resident)
    share = "" if concurrent == 1 else f" shared by {concurrent} concurrent solves"
    held = f" less {format_bytes(resident)} of blocks" if resident else ""
    return MemoryPlan(solves, str(device), max(available - resident, 0) // concurrent,
                      f"{format_bytes(available)} available on {device}{held}{share}", resident)
