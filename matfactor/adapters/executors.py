"""Where the layer solves run: in this process, a local process pool, a Dask cluster or Ray.

Once its calibration statistics are collected, a layer problem is independent of every other
one: :func:`compress_model` ships each solve as a :class:`LayerTask` (the weight, its Gram ``H``
or MPIFA's two-stream statistics, the method, its budget and arguments, the seed; never the
model) to a :class:`concurrent.futures.Executor` and gets back only the compressed factors
(a :class:`~matfactor.adapters.methods.LayerSolution`). Any executor works:

- :func:`process_pool`: a local ``ProcessPoolExecutor`` (spawned workers; the default of the
  ``matfactor`` command);
- :func:`dask_executor`: a :class:`DaskExecutor` on a ``dask.distributed`` cluster, local or
  remote (the ``dask`` extra);
- :func:`ray_executor`: a :class:`RayExecutor` running each solve as a Ray task, the unit Ray's
  documentation recommends for stateless functions (the ``ray`` extra).

The core never imports Dask or Ray; this module imports them only when asked for such an
executor.

Reproducibility. A solve's floating-point results depend on how many threads its BLAS and torch
kernels use (a parallel sum adds in another order), so every solve runs with a fixed
``threads`` count, set inside the task wherever it runs. With the same seed and ``threads``, the
numbers are the same in this process, in a process pool, on Dask or on Ray, with any number of
workers: on one kind of machine and software stack (another CPU type or library version may
round differently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import types
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from matfactor import ReconstructionStatistics

from .methods import LayerSolution, declaring_modules, reduce_by_value, solve_layer

__all__ = ["DaskExecutor", "LayerTask", "Pool", "RayExecutor", "SolvePool", "dask_executor", "open_pool",
           "process_pool", "ray_executor", "run_task", "usable_cpus"]


@dataclass(frozen=True)
class LayerTask:
    """Everything one layer solve needs, and nothing of the model.

    Attributes
    ----------
    name
        The layer's name (for messages and the result).
    W
        ``(d_in, d_out)`` float32 or float64 weight the method approximates (the dense weight,
        or its error-corrected target in sequential mode with ``mix > 0``), on the CPU.
    H
        ``(d_in, d_in)`` Gram matrix of the calibration inputs, same dtype, on the CPU.
    statistics
        MPIFA's two-stream statistics, else ``None``.
    method, density, rank, pattern, arguments
        The recipe rule that applies to the layer.
    seed
        Seed of the randomized methods.
    threads
        Intra-op threads of torch during the solve (see the module docstring).
    device
        Where the solve runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...); the result comes back
        on the CPU.
    """

    name: str
    W: torch.Tensor
    H: torch.Tensor
    statistics: ReconstructionStatistics | None
    method: str
    density: float | None
    rank: int | None
    pattern: str
    arguments: dict[str, Any]
    seed: int
    threads: int
    device: str

    __reduce__ = reduce_by_value  # see its docstring: no file descriptors between processes


@contextlib.contextmanager
def solve_threads(threads: int) -> Iterator[None]:
    """Run the body with ``threads`` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _to_device(value: Any, device: torch.device) -> Any:
    """A tensor, a matfactor result (frozen dataclass of tensors) or statistics on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {field.name: getattr(value, field.name).to(device) for field in dataclasses.fields(value)
                 if field.init and isinstance(getattr(value, field.name), torch.Tensor)
                 and getattr(value, field.name).device != device}
        return dataclasses.replace(value, **moved) if moved else value
    if isinstance(value, ReconstructionStatistics):
        return value.to_device(device)
    return value


def run_task(task: LayerTask) -> LayerSolution:
    """Solve one :class:`LayerTask` (in whichever process the executor runs it).

    Returns
    -------
    LayerSolution
        With its result's tensors on the CPU.
    """
    device = torch.device(task.device)
    with solve_threads(task.threads):
        solution = solve_layer(task.name, task.W.to(device), task.H.to(device),
                               _to_device(task.statistics, device), task.method,
                               density=task.density, rank=task.rank, pattern=task.pattern,
                               arguments=task.arguments, seed=task.seed)
    solution.result = _to_device(solution.result, torch.device("cpu"))
    return solution


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _end_with_parent() -> None:
    """End this worker process the moment its parent process is gone.

    A pool worker otherwise outlives a parent killed by SIGKILL (no exit handler runs there):
    it waits on its task queue forever, holding its memory, and keeps multiprocessing's resource
    tracker alive too. The parent's sentinel (a pipe whose other end only the parent holds)
    becomes readable when the parent dies, however it dies.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def wait_for_parent() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=wait_for_parent, name="matfactor-parent-watch", daemon=True).start()


def _start_worker(method_modules: tuple[str, ...] = ()) -> None:
    """Initializer of every :func:`process_pool` worker.

    Ctrl-C in a terminal sends SIGINT to the whole process group: the parent handles it and ends
    the pool, so a worker ignores it (instead of printing a ``KeyboardInterrupt`` traceback of
    its own); a worker ends when its parent is gone (:func:`_end_with_parent`); and it imports
    the modules that registered methods in the parent (a spawned process starts with none of
    them), so that it solves the same methods.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _end_with_parent()
    for module in method_modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # a solve of its methods then says they are unknown here
            print(f"matfactor worker: cannot import {module!r}, which registers methods in the "
                  f"parent process: {type(error).__name__}: {error}", file=sys.stderr)


class SolvePool(ProcessPoolExecutor):
    """The ``ProcessPoolExecutor`` of :func:`process_pool`: its workers end with their parent,
    ignore Ctrl-C, and are ended at once when the ``with`` body raises (Ctrl-C included), rather
    than after the solves in progress finish."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """``ProcessPoolExecutor.submit``; a worker it starts ignores SIGINT from its first
        instruction (the initializer runs only once torch is imported, seconds later)."""
        with _started_ignoring_sigint():
            return super().submit(fn, *args, **kwargs)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: types.TracebackType | None) -> bool:
        if exc_type is not None:
            self.terminate_workers()
        return super().__exit__(exc_type, exc, traceback)

    def terminate_workers(self) -> None:
        """Cancel the pending solves and end the workers now (a solve in progress is lost)."""
        terminate = getattr(super(), "terminate_workers", None)  # Python 3.14 and newer
        if terminate is not None:
            terminate()
            return
        processes = list((self._processes or {}).values())
        self.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()


def process_pool(workers: int) -> SolvePool:
    """A local pool of ``workers`` spawned processes for :class:`LayerTask` solves.

    Spawned rather than forked: a fork of a process whose torch thread pools are running can
    deadlock. Each worker imports torch and matfactor on its first task (seconds), then solves
    one layer at a time. No worker outlives this process, however it ends (``kill -9``
    included), and an exception in the ``with`` body ends the workers at once
    (:class:`SolvePool`).
    """
    return SolvePool(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                     initializer=_start_worker, initargs=(declaring_modules(),))


@contextlib.contextmanager
def _started_ignoring_sigint() -> Iterator[None]:
    """Processes started in the body ignore SIGINT (Ctrl-C), which this process handles.

    A terminal's Ctrl-C reaches every process of the foreground group; the workers of a local
    Dask cluster would each print a ``KeyboardInterrupt`` traceback. An ignored signal stays
    ignored across ``exec`` and Python keeps it so, hence it is ignored here while they start
    (a Ctrl-C in that moment is lost) and this process's handler is restored after.
    """
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _silence_dask_log() -> None:
    """Run on each Dask worker when a run stops early: Dask logs nothing more there."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _dask_client(address: str | None, workers: int, quiet: bool = False) -> Iterator[Any]:
    try:
        from distributed import Client, LocalCluster
    except ImportError as missing:
        raise ImportError(f"the Dask executor needs the dask extra: pip install -e \".[dask]\" "
                          f"({missing})") from missing
    import dask

    with contextlib.ExitStack() as stack:
        if address is None:
            # Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's mmap
            # threshold: every array then comes from fresh, zeroed pages. That made a DSF solve
            # of a 384 x 384 layer 2.1 times slower (5.1 s against 2.5 s in a process pool).
            environment = {key: value for key, value in
                           dask.config.get("distributed.nanny.pre-spawn-environ").items()
                           if key != "MALLOC_TRIM_THRESHOLD_"}
            if quiet:  # the workers' own log: errors only
                environment["DASK_LOGGING__DISTRIBUTED"] = "error"
            stack.enter_context(dask.config.set({"distributed.nanny.pre-spawn-environ": environment}))
            dask_log = logging.getLogger("distributed")
            stack.callback(dask_log.setLevel, dask_log.level)  # restored once the cluster is closed
            with _started_ignoring_sigint():
                cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1,
                                                           processes=True, dashboard_address=None))
            client = stack.enter_context(Client(cluster))
            try:
                yield client
            except BaseException:
                # The cluster is closed with solves running: their cancellation, and a worker's
                # heartbeat that finds the scheduler gone, are expected, not the warnings and
                # tracebacks Dask logs for them here and in each worker. The error that stopped
                # the run reaches the caller.
                dask_log.setLevel(logging.CRITICAL)
                client.run(_silence_dask_log, on_error="ignore")
                raise
        else:
            yield stack.enter_context(Client(address))


class DaskExecutor(Executor):
    """A :class:`concurrent.futures.Executor` that runs each call as a task of a Dask client.

    ``submit`` is ``client.submit(fn, *args, pure=False)`` (each solve is its own task; hashing
    the arrays to deduplicate them would cost time for nothing), its outcome handed to a
    ``concurrent.futures.Future`` by the Dask future's done callback; cancelling that future
    cancels the task. Unlike ``Client.get_executor()``, a cancelled task logs nothing: that one
    waits on each task in a coroutine of the client's event loop, which logs a
    ``FutureCancelledError`` traceback (and "Couldn't gather") for every task cancelled when a
    run stops early.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` as a Dask task; return a future of its result."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        task = self._client.submit(fn, *args, pure=False, **kwargs)
        future: Future = Future()

        def cancel_task(done: Future) -> None:
            if done.cancelled():
                task.cancel()

        def hand_over(finished: Any) -> None:  # in a thread of the client
            if finished.status == "cancelled":
                future.cancel()  # a no-op where the future was cancelled first
                future.set_running_or_notify_cancel()  # wakes as_completed and wait
                return
            try:
                result = finished.result()
            except Exception as error:  # the task's own error, for the caller's result()
                future.set_exception(error)
            else:
                future.set_result(result)

        future.add_done_callback(cancel_task)
        task.add_done_callback(hand_over)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True


@contextlib.contextmanager
def dask_executor(address: str | None = None, *, workers: int = 1) -> Iterator[DaskExecutor]:
    """A :class:`DaskExecutor` on a Dask cluster: the one at ``address``, or a local one.

    Parameters
    ----------
    address
        A running scheduler (``"tcp://host:8786"``, as ``dask scheduler`` prints). ``None``:
        start a ``LocalCluster`` of ``workers`` processes with one thread each, closed on exit.
    workers
        Worker processes of the local cluster (ignored with ``address``).

    The local cluster's workers start without
    Dask's ``MALLOC_TRIM_THRESHOLD_``, which doubles the time of a solve (see the guide); start
    the workers of a remote cluster without it too.
    """
    with _dask_client(address, workers) as client:
        yield DaskExecutor(client)


def _call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``: the body of every task of a :class:`RayExecutor`."""
    return fn(*args, **kwargs)


class RayExecutor(Executor):
    """A :class:`concurrent.futures.Executor` that runs each call as a Ray task.

    ``submit(fn, *args)`` runs ``fn(*args)`` (any picklable callable) in a Ray task with
    ``num_cpus`` CPUs reserved per task, and returns the task's object reference as a
    ``concurrent.futures.Future`` (``ObjectRef.future()``). Ray retries a task whose worker
    died (``max_retries``).

    Parameters
    ----------
    num_cpus
        CPUs Ray reserves for each task (set it to the solves' ``threads``).
    max_retries
        Retries of a task whose worker process died (Ray's default is 3).
    """

    def __init__(self, *, num_cpus: int = 1, max_retries: int = 3) -> None:
        import ray

        # One remote function that calls what it is given: ``ray.remote`` itself accepts only
        # Python functions, not builtins, partials or other callables an Executor must take.
        self._remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(_call)
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` as a Ray task; return a future of its result."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self._remote.remote(fn, *args, **kwargs).future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True


@contextlib.contextmanager
def ray_executor(address: str | None = None, *, workers: int = 1, threads: int = 1,
                 quiet: bool = False) -> Iterator[RayExecutor]:
    """A :class:`RayExecutor` on the Ray cluster at ``address``, or on a local Ray instance.

    Parameters
    ----------
    address
        A running cluster (``"auto"``, ``"ray://host:10001"``, ...). ``None``: start a local Ray
        instance with ``workers × threads`` CPUs, shut down on exit.
    workers, threads
        Concurrent solves and CPUs per solve on the local instance (``threads`` is also each
        task's CPU reservation on a remote cluster).
    quiet
        Ray logs errors only (its default logs information such as its start).

    Notes
    -----
    The local instance's workers run at the caller's priority (Ray's default is 15 nice levels
    lower, which left the solves only part of a core whenever anything else ran).
    """
    try:
        import ray
    except ImportError as missing:
        raise ImportError(f"the Ray executor needs the ray extra: pip install -e \".[ray]\" "
                          f"({missing})") from missing
    started = not ray.is_initialized()
    level = logging.ERROR if quiet else logging.INFO  # INFO is ray.init's default
    if started:
        if address is None:
            # Ray starts its workers 15 nice levels below the driver, so that anything else on
            # the machine takes their CPU first; a local instance here exists to run the solves,
            # so its workers keep the caller's priority, as a process pool's and Dask's do.
            with _started_ignoring_sigint():
                ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False,
                         logging_level=level, _system_config={"worker_niceness": 0})
        else:
            ray.init(address=address, log_to_driver=False, logging_level=level)
    try:
        yield RayExecutor(num_cpus=threads)
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class Pool:
    """An executor for layer solves, with what the run needs to know about it.

    Attributes
    ----------
    executor
        ``None``: the solves run in this process.
    workers
        Solves that run at once.
    memory
        Bytes one solve may use, where the pool knows it (``None``: unknown).
    description
        For the run's log, e.g. ``"a local process pool of 4 workers"``.
    """

    executor: Executor | None
    workers: int
    memory: int | None
    description: str


def _dask_worker_memory(client: Any) -> int | None:
    limits = [worker.get("memory_limit") or 0 for worker in client.scheduler_info()["workers"].values()]
    return min(limits) if limits and min(limits) > 0 else None


def _ray_solve_memory(threads: int) -> int | None:
    import ray

    shares = [node["Resources"]["memory"] / max(1, int(node["Resources"].get("CPU", 1)) // threads)
              for node in ray.nodes() if node.get("Alive") and "memory" in node.get("Resources", {})]
    return int(min(shares)) if shares else None


@contextlib.contextmanager
def open_pool(kind: str, *, workers: int, threads: int = 1, address: str | None = None,
              device: str | torch.device = "cpu", quiet: bool = False) -> Iterator[Pool]:
    """The executor the ``matfactor`` command runs the layer solves on, closed on exit.

    Parameters
    ----------
    kind
        ``"process"``: a local process pool of ``workers`` (with ``workers=1``, no pool: the
        solves run in this process); ``"dask"``: :func:`dask_executor`; ``"ray"``:
        :func:`ray_executor`.
    workers
        Concurrent solves (the workers of a local pool or cluster; ignored with ``address``).
    threads
        Threads of each solve (the CPUs a Ray task reserves).
    address
        A running Dask scheduler or Ray cluster instead of a local one.
    device
        Where the solves run: a local pool shares this device's available memory.
    quiet
        Dask's workers and Ray log errors only (the command's ``--quiet``).
    """
    from .memory import available_memory

    if kind not in ("process", "dask", "ray"):
        raise ValueError(f"kind must be 'process', 'dask' or 'ray', got {kind!r}")
    if kind == "process":
        available = available_memory(device)
        share = None if available is None else available // workers
        if workers == 1:
            yield Pool(None, 1, share, "this process")
            return
        with process_pool(workers) as pool:
            yield Pool(pool, workers, share, f"a local process pool of {workers} workers")
        return
    where = f"the cluster at {address}" if address else f"a local cluster of {workers} workers"
    if kind == "dask":
        with _dask_client(address, workers, quiet) as client:
            count = len(client.scheduler_info()["workers"])
            yield Pool(DaskExecutor(client), count, _dask_worker_memory(client),
                       f"Dask, {where}")
        return
    with ray_executor(address, workers=workers, threads=threads, quiet=quiet) as executor:
        import ray

        count = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        yield Pool(executor, count, _ray_solve_memory(threads), f"Ray, {where}")
