"""Memory: the peak bytes of one layer solve, and the plan of a run checked before it starts.

:func:`solve_bytes` is the memory model of one solve; :func:`memory_plan` (through
:func:`~matfactor.adapters.compression_plan` and :func:`~matfactor.adapters.compress_model`)
applies it to every layer a recipe selects, adds the allocator's slack, and
:meth:`MemoryPlan.check` refuses a run whose largest solve cannot have that much on its
device, naming the layer, before anything runs instead of dying in the middle of a long job.

The model of one solve.

A layer solve holds its inputs (``W``, ``H``, or MPIFA's statistics), the arrays its method
allocates on the way, and at the end the result's factors while
:func:`matfactor.layer_error` scores them. :func:`solve_bytes` adds the inputs to the method's
``work_bytes`` (its :class:`~matfactor.adapters.methods.Method` declaration). A built-in
method's is :func:`solver_work`: the memory models of the core solvers it calls, each beside its
solver in ``matfactor/`` (registered in the core's private ``matfactor._memory``; the comments of
each model name the arrays of the solver's code that are alive together at its worst moment),
and the end of the solve here (:func:`end_of_solve_bytes`). The units, for a ``(d_in, d_out)``
layer of itemsize ``s``:

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
  input and about ``4 k²`` beside its factors (measured, bounded by
  ``matfactor._memory.svd_bytes``); after an SVD, MKL's buffer pool keeps about ``1.3 k² s``
  resident (counted as ``1.5 k² s`` at the end).

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
from typing import Any, Callable

import torch
from torch import nn

from matfactor import _validation as check
from matfactor._memory import SolveMemory, solve_memory

from .layers import weight_matrix
from .methods import METHODS, Budget, resolve_budget

__all__ = ["MemoryPlan", "PlannedSolve", "available_memory", "end_of_solve_bytes", "error_bytes",
           "format_bytes", "memory_plan", "solve_bytes", "solver_work"]

_MIB = 1 << 20


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
        The recipe's keyword arguments for the method, which its memory model reads (the
        built-in ones: DSF's ``finalize`` and ``finalize_input_factor``, ``weighted_lowrank``'s
        and ``pifa``'s ``damping``, MPIFA's ``init``, ``sparse_lowrank``'s ``hessian``,
        ``pruner`` (a callable is bounded by the ADMM pruner) and ``lowrank``; the others change
        no peak or only lower it, and the models keep the default's).
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


def end_of_solve_bytes(shape: tuple[int, int], memory: SolveMemory, itemsize: int, *,
                       dense: bool = True) -> int:
    """The end of :func:`~.methods.solve_layer`: the result (``memory.result``), its dense form
    ``Ŵ`` (none where the result is that matrix, ``dense=False``: a pruned weight),
    :func:`matfactor.layer_error`'s temporaries (at the moment of ``_weighted_sq_norm`` in
    ``matfactor/error.py``: ``H`` scaled, ``D``, ``D`` scaled, ``W`` scaled, ``H D`` and
    ``D ⊙ (H D)``), and what the solve left allocated (``memory.retained``)."""
    d_in, d_out = shape
    M, Hh = d_in * d_out * itemsize, d_in * d_in * itemsize
    return memory.result + (M if dense else 0) + max(3 * Hh, Hh + 5 * M) + memory.retained


def error_bytes(shape: tuple[int, int], result_bytes: int, itemsize: int) -> int:
    """The end of every solve, for a method's ``work_bytes``: the result (``result_bytes``), its
    dense form ``Ŵ`` and :func:`matfactor.layer_error`'s temporaries while ``solve_layer``
    scores it (:func:`end_of_solve_bytes`).

    Parameters
    ----------
    shape
        ``(d_in, d_out)``.
    result_bytes
        Bytes of the result's arrays.
    itemsize
        Bytes per value of the compute dtype.
    """
    return end_of_solve_bytes(shape, SolveMemory(0, result_bytes), itemsize)


def solver_work(*solvers: Callable[..., Any], dense: bool = True,
                ) -> Callable[[tuple[int, int], Budget, dict[str, Any], int], int]:
    """The ``work_bytes`` of a method that calls ``solvers`` in turn (the last one's result is
    the method's): the largest of their peaks (their memory models, beside each solver in the
    core) and the end of the solve (:func:`end_of_solve_bytes`; ``dense=False`` for a pruned
    weight)."""
    def work(shape: tuple[int, int], budget: Budget, arguments: dict[str, Any], itemsize: int) -> int:
        calls = [solve_memory(solver, shape, itemsize, rank=budget.rank, pattern=budget.pattern,
                              options=arguments) for solver in solvers]
        end = SolveMemory(0, calls[-1].result, max(call.retained for call in calls))
        return max(max(call.peak for call in calls), end_of_solve_bytes(shape, end, itemsize, dense=dense))
    return work


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
