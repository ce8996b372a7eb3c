"""Layer solves on executors: the same checkpoint in this process, in a process pool, on a local
Dask cluster and on a local Ray instance; the memory plan refuses what cannot fit."""

from __future__ import annotations

import concurrent.futures
import hashlib
import operator
import os
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from matfactor.adapters import Recipe, compress_model, compression_plan, save_compressed  # noqa: E402
from matfactor.adapters.executors import dask_executor, open_pool, run_task, solve_threads  # noqa: E402
from text_models import random_bert, random_token_batches  # noqa: E402

# every kind of task: pruning, DSF, PIFA, MPIFA (two-stream statistics) and the seeded sparse
# plus low rank, in sequential mode with the error correction (targets computed before shipping)
RECIPE = Recipe.from_dict({"rules": [
    {"targets": ["*.query", "*.key"], "method": "sparsegpt", "density": 0.5},
    {"targets": ["*.value"], "method": "mpifa", "density": 0.5},
    {"targets": ["*.intermediate.dense"], "method": "dsf", "density": 0.5},
    {"targets": ["*.attention.output.dense"], "method": "sparse_lowrank", "density": 0.5,
     "arguments": {"iters": 5}},
    {"method": "pifa", "density": 0.5}]})


def checkpoint_digest(tmp_path, executor, sequential):
    model = random_bert()
    compress_model(model, random_token_batches(), RECIPE, sequential=sequential, executor=executor,
                   progress=False)
    directory = tmp_path / f"{id(executor)}-{sequential}"
    save_compressed(model, directory)
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
            for name in ("matfactor.safetensors", "matfactor.json")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The checkpoints of both modes with every solve in this process."""
    tmp_path = tmp_path_factory.mktemp("reference")
    return {sequential: checkpoint_digest(tmp_path, None, sequential) for sequential in (True, False)}


ENGINES = [("process", 2), ("dask", 2), ("ray", 2)]


@pytest.mark.parametrize("kind, workers", ENGINES, ids=[kind for kind, _ in ENGINES])
def test_every_engine_gives_the_same_checkpoint(kind, workers, reference, tmp_path):
    pytest.importorskip({"process": "concurrent.futures", "dask": "distributed", "ray": "ray"}[kind])
    with open_pool(kind, workers=workers) as pool:
        assert pool.executor is not None and pool.workers == workers
        # local workers run at this process's priority, without Dask's malloc setting that
        # doubles the time of a solve
        assert pool.executor.submit(os.nice, 0).result() == os.nice(0)
        assert pool.executor.submit(os.getenv, "MALLOC_TRIM_THRESHOLD_").result() is None
        for sequential in (True, False):
            assert checkpoint_digest(tmp_path, pool.executor, sequential) == reference[sequential]


def test_dask_executor_results_errors_and_a_quiet_cancellation(capfd):
    """Results and the task's own errors come back; cancelled tasks wake ``wait`` and log nothing
    (a run stopped early cancels its pending solves)."""
    pytest.importorskip("distributed")
    with dask_executor(workers=1) as executor:
        assert executor.submit(pow, 2, 10).result() == 1024
        with pytest.raises(ZeroDivisionError):
            executor.submit(operator.truediv, 1, 0).result()
        capfd.readouterr()
        futures = [executor.submit(time.sleep, 2) for _ in range(4)]
        time.sleep(0.5)  # the first one runs
        assert all(future.cancel() for future in futures)
        done, pending = concurrent.futures.wait(futures, timeout=30)
        assert not pending and all(future.cancelled() for future in done)
        time.sleep(2)  # what the client and the worker would log about it
    assert capfd.readouterr().err == ""


def test_one_worker_solves_in_this_process():
    with open_pool("process", workers=1) as pool:
        assert pool.executor is None and pool.description == "this process"


def test_tasks_carry_their_thread_count():
    """The solve runs with the task's threads, and the caller's setting is restored."""
    before = torch.get_num_threads()
    with solve_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    seen = []
    original = torch.set_num_threads
    try:
        torch.set_num_threads = lambda count: (seen.append(count), original(count))
        model = random_bert()
        compress_model(model, random_token_batches(), Recipe.single("wanda", density=0.5), threads=2,
                       progress=False)
    finally:
        torch.set_num_threads = original
    assert seen[0::2] == [2] * 12  # one solve per layer, each followed by the restore
    assert torch.get_num_threads() == before


def test_run_task_returns_cpu_results():
    from matfactor.adapters.executors import LayerTask

    W, H = torch.randn(16, 8), torch.eye(16)
    task = LayerTask("layer", W, H, None, "pifa", 0.5, None, "unstructured", {}, 0, 1, "cpu")
    solution = run_task(task)
    assert solution.result.W_p.device.type == "cpu" and solution.rel_error >= 0


def test_memory_plan_reports_each_method_and_refuses_before_running():
    model = random_bert()
    plan = compression_plan(model, RECIPE, device="cpu")
    assert {row.method for row in plan.solves} == {"sparsegpt", "mpifa", "dsf", "sparse_lowrank", "pifa"}
    assert sum(len(row.layers) for row in plan.solves) == 12
    assert plan.solves[0].bytes == plan.peak and plan.limit is not None
    assert "memory plan on cpu" in plan.format_table()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(MemoryError, match=r"layer '.*' \(.*W 32x64|needs about .* but a solve may use"):
        compress_model(model, random_token_batches(), RECIPE, memory_limit=plan.peak - 1, progress=False)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    compress_model(model, random_token_batches(), RECIPE, memory_limit=plan.peak, progress=False)


@pytest.mark.parametrize("arguments, error, name", [
    ({"executor": "dask"}, TypeError, "executor"),
    ({"threads": 0}, ValueError, "threads"),
    ({"threads": 1.5}, TypeError, "threads"),
    ({"memory_limit": -5}, ValueError, "memory_limit"),
    ({"restart": "yes"}, TypeError, "restart"),
])
def test_bad_scale_out_arguments(arguments, error, name):
    with pytest.raises(error, match=name):
        compress_model(random_bert(), random_token_batches(), RECIPE, progress=False, **arguments)
