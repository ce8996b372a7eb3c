"""Layer-parallel scaling: one-shot layer solves on 1, 2 and 4 workers of each engine.

Two workloads, each a list of independent layer solves (:class:`~matfactor.adapters.executors.
LayerTask`, exactly what :func:`~matfactor.adapters.compress_model` ships in one-shot mode):

- ``minilm``: the 36 linear layers of all-MiniLM-L6-v2 with their real Grams (one-shot
  calibration hooks on 128 texts of CPython's pydoc topics), DSF at density 0.5 (the command's
  default method);
- ``llama``: one Llama-shaped block (q, k, v, o of ``d × d``; gate, up of ``d × f``; down of
  ``f × d``; ``d = 1024``, ``f = 2752``) with random weights and realistic Grams
  (:func:`matfactor.testing.realistic_layer`), SparseGPT at density 0.5.

For each engine (``process``: a local process pool; ``dask``: a local cluster of worker
processes; ``ray``: a local Ray instance) and worker count, the pool is started and warmed up
(one trivial task per worker, so that start-up and imports are not counted), then the solves
are timed from the first submission to the last result. Each solve uses one thread, so the
results are identical across engines and worker counts (checked: the digest of all results is
recorded). The speed-up is against one worker of the same engine. The per-task overhead of an
engine is the round trip of a task that ships the same ``W`` and ``H`` and returns a result of
the same size without solving, measured on a warm pool with one worker, next to the mean solve.

Run from the repository root (each record is one JSON line of the output file)::

    python -m benchmarks.scaling --out benchmarks/results/scaling.jsonl
    python -m benchmarks.scaling --out benchmarks/results/scaling.jsonl --table

On a machine with ``c`` cores, more than ``c`` workers cannot be faster than ``c``; the 4-worker
figures of a 2-core machine measure the cost of oversubscription, not parallel speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any, Iterator

ENGINES = ("process", "dask", "ray")
WORKERS = (1, 2, 4)
WORKLOADS = ("minilm", "llama")


def minilm_tasks(threads: int) -> list[Any]:
    """The 36 MiniLM layer problems (one-shot Grams) as DSF tasks."""
    import torch
    from matfactor.adapters.calibration import CalibrationHooks
    from matfactor.adapters.executors import LayerTask
    from matfactor.adapters.layers import is_compressible, weight_matrix
    from matfactor.adapters.text import load_text_model, pydoc_texts, text_batches

    model, tokenizer = load_text_model()
    texts = pydoc_texts("calibration")
    random.Random(0).shuffle(texts)
    layers = {name: module for name, module in model.named_modules()
              if name.startswith("encoder.") and is_compressible(module)}
    with torch.no_grad(), CalibrationHooks(layers) as hooks:
        for batch in text_batches(tokenizer, texts[:128]):
            hooks.begin_batch(batch["attention_mask"].bool())
            model(**batch)
    return [LayerTask(name, weight_matrix(module, name).float(), hooks.gram(name)[0], None, "dsf", 0.5,
                      None, "unstructured", {}, 0, threads, "cpu") for name, module in layers.items()]


def llama_tasks(threads: int, d: int = 1024, f: int = 2752) -> list[Any]:
    """One Llama-shaped block of random weights with realistic Grams, as SparseGPT tasks."""
    import torch
    from matfactor.adapters.executors import LayerTask

    from matfactor.testing import realistic_layer

    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    tasks = []
    for seed, (name, (d_in, d_out)) in enumerate(shapes.items()):
        problem = realistic_layer(d_in, d_out, seed=seed)
        tasks.append(LayerTask(name, torch.as_tensor(problem.W, dtype=torch.float32),
                               torch.as_tensor(problem.H, dtype=torch.float32), None, "sparsegpt", 0.5,
                               None, "unstructured", {}, 0, threads, "cpu"))
    return tasks


def _echo(task: Any) -> Any:
    """A task that ships like a solve and returns a result of the same size, without solving."""
    return task.W.clone()


def _ready() -> int:
    return os.getpid()


def _run_timed(task: Any) -> tuple[Any, float]:
    """``run_task`` and its duration in the worker (the solve, its error and the moves)."""
    from matfactor.adapters.executors import run_task

    start = time.perf_counter()
    solution = run_task(task)
    return solution, time.perf_counter() - start


def _timed(executor: Any, tasks: list[Any]) -> tuple[float, str, list[float]]:
    from concurrent.futures import as_completed

    start = time.perf_counter()
    futures = {executor.submit(_run_timed, task): task.name for task in tasks}
    results = {futures[future]: future.result() for future in as_completed(futures)}
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for name in sorted(results):
        digest.update(results[name][0].dense().contiguous().numpy().tobytes())
    return seconds, digest.hexdigest()[:16], [results[name][1] for name in sorted(results)]


def _overhead(executor: Any, tasks: list[Any], repeats: int = 3) -> float:
    """Median round trip of an echo task carrying each task's arrays."""
    times = []
    for _ in range(repeats):
        for task in tasks:
            start = time.perf_counter()
            executor.submit(_echo, task).result()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def _engine(engine: str, workers: int, threads: int) -> Iterator[Any]:
    """A pool of ``workers`` of ``engine`` (a process pool even of one worker, whose tasks pay
    the shipping that ``open_pool`` avoids by solving in this process)."""
    from matfactor.adapters.executors import open_pool, process_pool

    if engine == "process":
        with process_pool(workers) as pool:
            yield pool
    else:
        with open_pool(engine, workers=workers, threads=threads) as pool:
            yield pool.executor


def run(out: Path, engines: list[str], workers_list: list[int], workloads: list[str], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    builders = {"minilm": minilm_tasks, "llama": llama_tasks}
    for workload in workloads:
        tasks = builders[workload](threads)
        for engine in engines:
            for workers in workers_list:
                with _engine(engine, workers, threads) as executor:
                    # start every worker and import everything before timing
                    for future in [executor.submit(_ready) for _ in range(4 * workers)]:
                        future.result()
                    seconds, digest, solves = _timed(executor, tasks)
                    overhead = _overhead(executor, tasks) if workers == 1 else None
                record = {"workload": workload, "engine": engine, "workers": workers, "threads": threads,
                          "tasks": len(tasks), "seconds": seconds, "task_seconds": sum(solves),
                          "mean_solve": sum(solves) / len(solves), "task_overhead": overhead,
                          "digest": digest, "cpus": os.cpu_count(), "machine": platform.machine(),
                          "processor": platform.processor() or "unknown"}
                with out.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)


def table(out: Path) -> str:
    """The results as Markdown: time and speed-up per workload, engine and worker count, and the
    per-task overhead against the mean solve."""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    lines = ["| workload | engine | " + " | ".join(f"{w} worker{'s' * (w > 1)}" for w in WORKERS)
             + " | task overhead / mean solve |", "|---|---|" + "---|" * (len(WORKERS) + 1)]
    for workload in WORKLOADS:
        for engine in ENGINES:
            rows = {r["workers"]: r for r in records if r["workload"] == workload and r["engine"] == engine}
            if 1 not in rows:
                continue
            base = rows[1]["seconds"]
            cells = [f"{rows[w]['seconds']:.1f} s (×{base / rows[w]['seconds']:.2f})" if w in rows else "–"
                     for w in WORKERS]
            overhead = rows[1]["task_overhead"]
            cells.append(f"{overhead * 1e3:.1f} ms / {rows[1]['mean_solve'] * 1e3:.0f} ms "
                         f"({overhead / rows[1]['mean_solve']:.1%})")
            lines.append(f"| {workload} | {engine} | " + " | ".join(cells) + " |")
    digests = {(r["workload"], r["digest"]) for r in records}
    lines.append("")
    lines.append("Results identical across engines and worker counts: "
                 + ", ".join(f"{w}: {'yes' if sum(1 for x, _ in digests if x == w) == 1 else 'NO'}"
                             for w in WORKLOADS if any(x == w for x, _ in digests)))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines results file")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--workers", nargs="+", type=int, default=list(WORKERS))
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--threads", type=int, default=1, help="threads per solve (default 1)")
    parser.add_argument("--table", action="store_true", help="print the table of the results file")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        run(args.out, args.engines, args.workers, args.workloads, args.threads)


if __name__ == "__main__":
    main()
