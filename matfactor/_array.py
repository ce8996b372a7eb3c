"""Array-API plumbing shared by every solver.

Everything that is not in the Python array API standard lives here and nowhere else: the few
operations the standard lacks (random normals from a seed, k-th largest selection, exact
top-k masks, triangular solves, inverses of symmetric positive definite matrices). Each has a
native fast path for NumPy, PyTorch and CuPy and a generic fallback written against the
standard, which is what ``array_api_strict`` exercises in the tests. Arguments are validated
before they get here (:mod:`matfactor._validation`).
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np
from array_api_compat import (
    is_cupy_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)

from ._validation import type_name

__all__ = [
    "random_normal",
    "kth_largest",
    "top_k_mask",
    "on_host",
    "solve_triangular",
    "cholesky",
    "spd_inverse",
    "spd_solve",
    "add_to_diagonal",
    "contiguous",
    "synchronize",
    "pivoted_qr",
    "pivoted_qr_pivots",
    "chained_products",
]


def _is_seed(rng: Any) -> bool:
    """An int seed (NumPy integers included; ``bool`` is not a seed)."""
    return isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)


def _numpy_generator(rng: Any) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or _is_seed(rng):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {type_name(rng)}")


def random_normal(xp: Any, shape: tuple[int, ...], *, dtype: Any, device: Any, rng: Any) -> Any:
    """Standard normal samples of ``shape`` drawn directly on ``device``.

    Parameters
    ----------
    rng
        ``None``, an int seed, or the backend's own generator (``numpy.random.Generator``,
        ``torch.Generator`` on the target device, ``cupy.random.Generator``). The same seed gives
        the same samples on the same backend and device; different backends draw different
        streams.
    """
    if is_torch_namespace(xp):
        import torch

        if isinstance(rng, torch.Generator):
            generator = rng
        else:
            generator = torch.Generator(device=device)
            if rng is None:
                generator.seed()
            elif _is_seed(rng):
                generator.manual_seed(int(rng))
            else:
                raise TypeError(f"rng must be None, an int seed or a torch.Generator, got {type_name(rng)}")
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if is_cupy_namespace(xp):
        import cupy

        if isinstance(rng, cupy.random.Generator):
            generator = rng
        elif rng is None or _is_seed(rng):
            generator = cupy.random.default_rng(rng)
        else:
            raise TypeError("rng must be None, an int seed or a cupy.random.Generator, "
                            f"got {type_name(rng)}")
        with cupy.cuda.Device(device):
            return generator.standard_normal(shape, dtype=dtype)
    samples = _numpy_generator(rng).standard_normal(shape)
    if is_numpy_namespace(xp):
        return samples.astype(dtype, copy=False)
    # Generic fallback (array_api_strict and other host libraries): draw on the host.
    return xp.asarray(samples, dtype=dtype, device=device)


def kth_largest(xp: Any, x: Any, k: int, axis: int | None = None) -> Any:
    """The k-th largest value of ``x`` (``k`` counted from 1), flattened or along ``axis``.

    Partial selection (O(n)) on NumPy, CuPy and PyTorch; a full sort in the generic fallback.
    With ``axis`` given the result keeps that axis with length 1, so it broadcasts against ``x``.
    """
    if axis is None:
        x = xp.reshape(x, (-1,))
        size = x.shape[0]
    else:
        size = x.shape[axis]
    if not 1 <= k <= size:
        raise ValueError(f"k must be in [1, {size}], got {k}")
    position = size - k  # index of the k-th largest in ascending order
    if is_numpy_namespace(xp) or is_cupy_namespace(xp):
        module = np if is_numpy_namespace(xp) else __import__("cupy")
        along = 0 if axis is None else axis
        # A slice (not a list index, which CuPy's take rejects) keeps the axis for broadcasting.
        partitioned = module.partition(x, position, axis=along)
        values = partitioned[(slice(None),) * along + (slice(position, position + 1),)]
    elif is_torch_namespace(xp):
        values = x.kthvalue(position + 1, dim=0 if axis is None else axis, keepdim=True).values
    else:
        values = xp.take(xp.sort(x, axis=0 if axis is None else axis),
                         xp.asarray([position], device=array_api_compat.device(x)),
                         axis=0 if axis is None else axis)
    return xp.reshape(values, ()) if axis is None else values


def top_k_mask(xp: Any, scores: Any, k: int, axis: int | None = None) -> Any:
    """Boolean mask selecting exactly the ``k`` largest ``scores`` (per slice along ``axis``).

    Ties at the threshold are broken by position (the first ones in C order along the selected
    axis are kept), so the count is exact whatever the ties and the result is deterministic on
    every backend. ``k = 0`` gives an all-false mask, ``k = size`` an all-true mask.

    Cost: one partial selection, plus a cumulative count for the ties. On the host the count is
    skipped when no slice has a tie straddling its threshold (the usual case for real scores);
    on a GPU it always runs, as checking would synchronise with the host.
    """
    device = array_api_compat.device(scores)
    size = math.prod(scores.shape) if axis is None else scores.shape[axis]
    if not 0 <= k <= size:
        raise ValueError(f"k must be in [0, {size}], got {k}")
    if k == 0:
        return xp.zeros(scores.shape, dtype=xp.bool, device=device)
    if k == size:
        return xp.ones(scores.shape, dtype=xp.bool, device=device)
    threshold = kth_largest(xp, scores, k, axis)
    at_least = scores >= threshold
    if on_host(xp, device):
        if bool(xp.all(xp.count_nonzero(at_least, axis=axis) == k)):
            return at_least
    above = scores > threshold
    at = at_least & ~above
    count_dtype = xp.int32 if math.prod(scores.shape) < 2**31 else xp.int64
    if axis is None:
        missing = k - xp.sum(xp.astype(above, count_dtype))
        flat_at = xp.reshape(at, (-1,))
        rank_at = xp.reshape(xp.cumulative_sum(xp.astype(flat_at, count_dtype)), scores.shape)
    else:
        missing = k - xp.sum(xp.astype(above, count_dtype), axis=axis, keepdims=True)
        rank_at = xp.cumulative_sum(xp.astype(at, count_dtype), axis=axis)
    return above | (at & (rank_at <= missing))


def on_host(xp: Any, device: Any) -> bool:
    """True when reading a value back is free (no device to synchronise with)."""
    if is_cupy_namespace(xp):
        return False
    if is_torch_namespace(xp):
        return device.type == "cpu"
    return True


def solve_triangular(xp: Any, A: Any, B: Any, *, lower: bool) -> Any:
    """Solve ``A X = B`` for triangular ``A`` (no explicit inverse)."""
    if is_numpy_namespace(xp):
        import scipy.linalg

        return scipy.linalg.solve_triangular(A, B, lower=lower, check_finite=False)
    if is_torch_namespace(xp):
        import torch

        return torch.linalg.solve_triangular(A, B, upper=not lower)
    if is_cupy_namespace(xp):
        import cupyx.scipy.linalg

        return cupyx.scipy.linalg.solve_triangular(A, B, lower=lower)
    return xp.linalg.solve(A, B)


def _not_definite(name: str) -> ValueError:
    return ValueError(f"{name} is not positive semi-definite: its damped Gram matrix has no "
                      "Cholesky factor (pass a Gram matrix XᵀX)")


def cholesky(xp: Any, A: Any, name: str = "H") -> Any:
    """Lower Cholesky factor of a symmetric positive definite ``A``.

    Raises
    ------
    ValueError
        Naming ``name``, if ``A`` is not numerically positive definite.
    """
    try:
        L = xp.linalg.cholesky(A)
    except (np.linalg.LinAlgError, RuntimeError) as exc:  # torch's LinAlgError is a RuntimeError
        raise _not_definite(name) from exc
    # Some backends (CuPy) return NaN instead of raising on a failed factorization.
    if not bool(xp.all(xp.isfinite(xp.linalg.diagonal(L)))):
        raise _not_definite(name)
    return L


def spd_inverse(xp: Any, A: Any, name: str = "H") -> Any:
    """Inverse of a symmetric positive definite matrix through its Cholesky factor.

    Used where one inverse is applied many times (ADMM iterations): afterwards each application
    is a single GEMM, cheaper on every backend than two triangular solves. The inverse itself
    costs about one GEMM of the same order (LAPACK potrf + potri on NumPy).

    Raises
    ------
    ValueError
        Naming ``name``, if ``A`` is not numerically positive definite (the matrix it was built
        from, typically a damped Gram matrix, is then indefinite).
    """
    if is_numpy_namespace(xp):
        try:
            return _numpy_spd_inverse(A)
        except np.linalg.LinAlgError as exc:
            raise _not_definite(name) from exc
    L = cholesky(xp, A, name)
    if is_torch_namespace(xp):
        import torch

        return torch.cholesky_inverse(L)
    identity = xp.eye(A.shape[0], dtype=A.dtype, device=array_api_compat.device(A))
    L_inv = solve_triangular(xp, L, identity, lower=True)
    return L_inv.T @ L_inv


def spd_solve(xp: Any, A: Any, B: Any, name: str = "H") -> Any:
    """Solve ``A X = B`` for a symmetric positive definite ``A`` by Cholesky.

    For a matrix used once: a factorization and two triangular solves, no inverse.

    Raises
    ------
    ValueError
        Naming ``name``, if ``A`` is not numerically positive definite.
    """
    if is_numpy_namespace(xp):
        import scipy.linalg

        try:
            factor = scipy.linalg.cho_factor(A, lower=True, check_finite=False)
        except np.linalg.LinAlgError as exc:
            raise _not_definite(name) from exc
        return contiguous(xp, scipy.linalg.cho_solve(factor, B, check_finite=False))
    L = cholesky(xp, A, name)
    if is_torch_namespace(xp):
        import torch

        return torch.cholesky_solve(B, L)
    return solve_triangular(xp, L.T, solve_triangular(xp, L, B, lower=True), lower=False)


def _numpy_spd_inverse(A: np.ndarray) -> np.ndarray:
    import scipy.linalg

    potrf, potri = scipy.linalg.get_lapack_funcs(("potrf", "potri"), (A,))
    factor, info = potrf(A, lower=True, clean=False, overwrite_a=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"potrf failed (info={info})")
    inverse, info = potri(factor, lower=True, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"potri failed (info={info})")
    # potri fills the lower triangle only: mirror it into the upper one in place.
    upper = np.triu(np.ones(inverse.shape, dtype=bool), 1)
    np.copyto(inverse, inverse.T, where=upper)
    # LAPACK works in Fortran order; the transpose of the symmetric result is the same matrix in
    # C order (no copy), which keeps the callers' elementwise work on uniformly ordered memory.
    return inverse.T if not inverse.flags.c_contiguous else inverse


def contiguous(xp: Any, x: Any) -> Any:
    """``x`` in row-major (C) order, copied only if it is not already.

    Transposed views and LAPACK results are column-major; NumPy's elementwise operations on a
    mix of orders run an order of magnitude slower than on one order (measured: 4.8 ms against
    0.28 ms for a 1024² float32 addition), so loops that mix them pay it every pass.
    """
    if is_numpy_namespace(xp):
        return np.ascontiguousarray(x)
    if is_torch_namespace(xp):
        return x.contiguous()
    if is_cupy_namespace(xp):
        import cupy

        return cupy.ascontiguousarray(x)
    return x


def add_to_diagonal(xp: Any, A: Any, values: Any) -> Any:
    """``A + diag(values)`` for a square ``A``; ``values`` a scalar or a vector (new array)."""
    n = A.shape[0]
    identity = xp.eye(n, dtype=A.dtype, device=array_api_compat.device(A))
    if isinstance(values, (int, float)):
        return A + values * identity
    return A + identity * values[None, :]


def synchronize(xp: Any, device: Any) -> None:
    """Wait for the device to finish queued work (before reading a clock)."""
    if is_torch_namespace(xp):
        import torch

        if getattr(device, "type", "cpu") == "cuda":
            torch.cuda.synchronize(device)
    elif is_cupy_namespace(xp):
        import cupy

        cupy.cuda.get_current_stream().synchronize()


# --- Pivoted QR: the one factorization no GPU library ships --------------------------------------


def pivoted_qr(xp: Any, A: Any, k: int, *, refresh: int = 1) -> tuple[Any, Any]:
    """The first ``k`` steps of Householder QR with column pivoting (Businger & Golub, 1971).

    Step ``j`` picks the column with the largest residual norm (orthogonal to the ``j`` columns
    already picked), so the pivot columns are a well-conditioned, rank-revealing selection:
    ``|R_jj|`` is non-increasing and ``|R_kk|`` small against ``|R_11|`` says that ``A`` has
    numerical rank below ``k``.

    Parameters
    ----------
    xp
        Namespace of ``A``.
    A
        ``(m, n)`` floating matrix.
    k
        Number of pivot columns, ``1 <= k <= min(m, n)``.
    refresh
        Generic path: the residual column norms are recomputed exactly every ``refresh`` steps
        and downdated (``‖a_i‖² ← ‖a_i‖² − R_ji²``) in between. The default 1 recomputes at
        every step, a sum of squares over the trailing matrix. Downdating alone fails exactly
        where pivoting matters: once the residuals fall far below the original norms (at the
        numerical rank), the subtraction cancels and the pivots after it are picked on noise,
        with ``|R_jj|`` no longer non-increasing. LAPACK's ``xLAQP2`` recomputes a column when
        a test flags it; that test would cost a host synchronisation per step on a GPU, and the
        recomputation the full pass anyway.

    Returns
    -------
    pivots
        ``(k,)`` int64 column indices on ``A``'s device, in pivot order.
    R
        ``(k, n)`` rows of the triangular factor in ``A``'s original column order: with ``Q``
        the ``(m, k)`` orthonormal factor, ``A[:, pivots] = Q @ R[:, pivots]`` with
        ``R[:, pivots]`` upper triangular (its strictly lower part is rounding noise on the
        generic path: mask it before a dense solve), and ``Q @ R`` is the rank-``k``
        approximation of ``A`` that keeps the pivot columns exactly.

    Notes
    -----
    NumPy and PyTorch on the CPU call LAPACK ``xGEQP3`` (``scipy.linalg.qr(pivoting=True)``,
    through a zero-copy view for PyTorch), which factors all ``min(m, n)`` columns. Every other
    backend (CUDA, CuPy, array_api_strict) runs the generic path on the device: ``k`` Python
    steps of three memory passes (a GEMV, a rank-1 update, the norms) over the shrinking
    ``(m − j, n)`` trailing matrix, with the pivot chosen by an on-device ``argmax`` and gathered
    by ``take`` (no host synchronisation, no column swaps: selected columns are masked out
    instead). Cost ``≈ 4 n (m k − k²/2)`` flops, memory-bound.
    """
    if A.ndim != 2:
        raise ValueError(f"A must be a 2-D matrix, got shape {tuple(A.shape)}")
    m, n = A.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(m, n):
        raise ValueError(f"k must be an integer in [1, min(m, n) = {min(m, n)}], got {k!r}")
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
        raise ValueError(f"refresh must be an integer >= 1, got {refresh!r}")
    if is_numpy_namespace(xp):
        return _numpy_pivoted_qr(A, k)
    if is_torch_namespace(xp) and A.device.type == "cpu":
        import torch

        # Already on the host: LAPACK through a zero-copy NumPy view (the generic path's
        # k BLAS-2 steps took 90 s at (1200, 4096) on a contended CPU, LAPACK about one).
        pivots, R = _numpy_pivoted_qr(A.detach().numpy(), k)
        return torch.from_numpy(pivots), torch.from_numpy(R)
    return _generic_pivoted_qr(xp, A, k, refresh)


def pivoted_qr_pivots(xp: Any, A: Any, k: int) -> tuple[Any, Any]:
    """Pivot columns of ``A`` and the magnitudes ``|R_jj|`` of :func:`pivoted_qr`.

    Returns
    -------
    pivots
        ``(k,)`` int64 column indices on ``A``'s device.
    R_diag
        ``(k,)`` non-increasing ``|R_jj|`` (``|R_11|`` is the largest column norm of ``A``);
        ``R_diag[-1] / R_diag[0]`` near the dtype's eps flags a rank below ``k``.
    """
    pivots, R = pivoted_qr(xp, A, k)
    return pivots, xp.abs(xp.linalg.diagonal(xp.take(R, pivots, axis=1)))


def _numpy_pivoted_qr(A: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import scipy.linalg

    R, P = scipy.linalg.qr(A, mode="r", pivoting=True, check_finite=False)
    R_original = np.empty((k, A.shape[1]), dtype=R.dtype)
    R_original[:, P] = R[:k]
    return P[:k].astype(np.int64), R_original


def _generic_pivoted_qr(xp: Any, A: Any, k: int, refresh: int) -> tuple[Any, Any]:
    n = A.shape[1]
    device = array_api_compat.device(A)
    zero = xp.asarray(0.0, dtype=A.dtype, device=device)
    one = xp.asarray(1.0, dtype=A.dtype, device=device)
    taken = xp.asarray(-1.0, dtype=A.dtype, device=device)  # below every norm: never re-picked
    columns = xp.arange(n, device=device)
    norms2 = xp.sum(A * A, axis=0)
    selected = xp.zeros(n, dtype=xp.bool, device=device)
    trailing = A
    pivots, rows = [], []
    for j in range(k):
        # Ties (an exhausted rank: all residuals zero) go to the first unselected column.
        p = xp.argmax(xp.where(selected, taken, norms2))
        p1 = xp.reshape(p, (1,))
        x = xp.take(trailing, p1, axis=1)[:, 0]
        norm_x = xp.linalg.vector_norm(x)
        sign = xp.where(x[0] >= 0, one, -one)
        # Householder vector v = x + sign·‖x‖·e₁ (no cancellation), reflector I − β v vᵀ with
        # vᵀv = 2‖x‖(‖x‖ + |x₁|); a zero column (rank exhausted) gives β = 0, the identity.
        v = xp.concat([xp.reshape(x[0] + sign * norm_x, (1,)), x[1:]])
        vtv = 2 * norm_x * (norm_x + xp.abs(x[0]))
        positive = vtv > 0
        beta = xp.where(positive, 2 / xp.where(positive, vtv, one), zero)
        trailing = trailing - v[:, None] * (beta * (v @ trailing))[None, :]
        row = trailing[0, :]
        trailing = trailing[1:, :]
        pivots.append(p)
        rows.append(row)
        selected = selected | (columns == p)
        if (j + 1) % refresh == 0:
            # Not vector_norm(axis=0): PyTorch's CPU kernel for it is 12x slower (measured).
            norms2 = xp.sum(trailing * trailing, axis=0)
        else:
            norms2 = xp.maximum(norms2 - row * row, zero)
    return xp.stack(pivots), xp.stack(rows)


def chained_products(xp: Any, X: Any, A: Any, B: Any) -> Any:
    """``[X A | (X A) B]``: two chained products side by side, ``(n, a + b)``.

    The PIFA layer (PIFA paper, Algorithm 1) computes exactly this before putting its output
    channels in order. The generic path concatenates, which copies the whole output once
    more. NumPy and PyTorch write both products straight into the two column blocks of one
    buffer (``out=`` views, the second product reading the first block in place): on PyTorch
    (CPU) that removed about a third of the layer's time at ``d = 1024``. PyTorch keeps the
    generic path when autograd records the operation (``out=`` does not differentiate), so
    fine-tuning through the layer works.
    """
    n, a, b = X.shape[0], A.shape[1], B.shape[1]
    if is_torch_namespace(xp):
        import torch

        if not (torch.is_grad_enabled() and (X.requires_grad or A.requires_grad or B.requires_grad)):
            out = torch.empty((n, a + b), dtype=A.dtype, device=A.device)
            first = out[:, :a]
            torch.matmul(X, A, out=first)
            torch.matmul(first, B, out=out[:, a:])
            return out
    elif is_numpy_namespace(xp):
        out = np.empty((n, a + b), dtype=np.result_type(X, A, B))
        first = out[:, :a]
        np.matmul(X, A, out=first)
        np.matmul(first, B, out=out[:, a:])
        return out
    first = X @ A
    return xp.concat([first, first @ B], axis=1)
