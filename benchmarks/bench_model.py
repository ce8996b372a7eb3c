"""Whole-model compression: the main job's time and memory, its profile, a Llama block's peak.

The time and peak memory of the main job, where its time goes, and the peak memory of one
Llama-shaped block against its budget.

Every measurement runs in a child process, so that the figures are that child's alone: wall time
from start to exit, CPU time (user + system) and peak resident memory (``ru_maxrss`` of that one
child, read with :func:`os.wait4`), and, with psutil (the bench extra), the sampled peak of the
summed PSS of the child and its workers. The children run on :data:`THREADS` threads
(``OMP_NUM_THREADS`` and friends; the Python children also call ``torch.set_num_threads``): on a
shared machine, the CPU time of one thread is about the wall time the job would take alone.

- **Main job** (:func:`main_job`, asv :class:`MainJob`): ``python -m matfactor compress --out
  DIR --quiet`` with its defaults, the README's main job end to end (all-MiniLM-L6-v2, DSF at
  density 0.5 on the 36 linear layers of its blocks, sequential with ``mix=0.5``, save, reload,
  evaluate on the held-out texts): its time and peak memory, and the solve time per layer kind
  read from its report. It should take at most :data:`MAIN_JOB_LIMIT_S` on a 2-core CPU.
- **Profile** (:func:`profile_main_job`): the main job's steps in one process (solves in that
  process, 128 calibration texts), each timed exclusively, wall and CPU: the layer solves per
  layer kind through a :class:`~matfactor.adapters.PipelineObserver`, the other internals (first
  block inputs, ``H`` accumulation, the evaluation's passes, ...) by wrapping them in the child.
- **Llama-shaped block** (:func:`llama_block`, asv :class:`LlamaBlockMemory`): a
  ``transformers.LlamaModel`` with one decoder layer of Llama-2-7B's shape (:data:`LLAMA_SHAPE`,
  no grouped KV), random float32 weights, called with ``inputs_embeds`` and ``use_cache=False``
  on :data:`LLAMA_BATCHES` batches of :data:`LLAMA_TOKENS` tokens of realistic correlated
  activations (:func:`matfactor.testing.realistic_layer`); SparseGPT at density 0.5 (DSF is far
  too slow at these sizes on a CPU), sequential, ``granularity="layer"``, for each ``mix`` of
  :data:`LLAMA_MIXES` (above 0, a dense copy of the block carries the dense stream). An observer
  marks the phases (each group's calibration pass, its solves); the child resets the kernel's
  peak-RSS counter (``/proc/self/clear_refs``, Linux) between phases, so that each phase's peak
  is known, the run's being the largest. The peak is set against the budget terms of
  :func:`llama_budget`: the block's weights, one block's activations, the Grams, the dense copy.

``python -m benchmarks.bench_model`` measures the main job and the Llama block (``--main-job``,
``--llama`` or ``--profile`` one of them; ``--threads N``; ``--options ...``: more options of the
main job's command; ``--json FILE`` appends the results to a JSON-lines file), and ``--show
FILE`` prints stored results (``benchmarks/results/bench_model.jsonl``, discussed in the guide's
section 17). asv runs :class:`MainJob` and :class:`LlamaBlockMemory`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:  # the bench extra: the summed memory of a job and its worker processes
    import psutil
except ImportError:
    psutil = None

#: Threads of the measured children.
THREADS = 1
#: The wall time the main job should stay within on a 2-core CPU (seconds).
MAIN_JOB_LIMIT_S = 300
MIB = 2 ** 20


@dataclass(frozen=True)
class ChildRun:
    """One measured child process."""

    seconds: float          # wall time, start to exit
    peak_rss_mib: float     # ru_maxrss: the largest peak of the child and its reaped children
    cpu_seconds: float      # user + system CPU time of the child and its reaped children
    returncode: int
    output: str             # stdout and stderr, interleaved
    tree_peak_pss_mib: float | None  # peak of the summed PSS of the child and its descendants


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a child limited to ``threads`` threads (torch, BLAS, tokenizers)."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[name] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(command: list[str], *, timeout: float, threads: int = THREADS,
              cwd: str | None = None) -> ChildRun:
    """Run ``command``, wait for it with :func:`os.wait4` and return its time and peak RSS.

    ``ru_maxrss`` of :func:`os.wait4` is this child's peak (kilobytes on Linux), unlike
    ``getrusage(RUSAGE_CHILDREN)``, the largest of every child this process ever waited for; where
    the child reaped children of its own (the workers of a process pool), it is the largest of
    their peaks and its own, not their sum. The sum is sampled every 0.2 s with psutil (the bench
    extra) as the proportional set size (PSS: shared pages, such as the libraries every worker
    maps, divided among the processes that map them, so that the sum counts them once).
    """
    with tempfile.TemporaryFile(mode="w+") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                   env=thread_env(threads))
        tree_peak = 0.0 if psutil is not None else None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if psutil is not None:
                tree_peak = max(tree_peak, _tree_pss(process.pid))
            if time.perf_counter() - start > timeout:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        log.seek(0)
        output = log.read()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return ChildRun(seconds, usage.ru_maxrss * scale / MIB, usage.ru_utime + usage.ru_stime,
                    process.returncode, output, None if tree_peak is None else tree_peak / MIB)


def _tree_pss(pid: int) -> int:
    """The summed PSS (bytes) of process ``pid`` and its descendants now; 0 once it is gone."""
    try:
        processes = [psutil.Process(pid)]
        processes += processes[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for member in processes:
        try:
            total += member.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # exited between the listing and the reading
    return total


def source_digest() -> str:
    """A short digest of the measured sources (``matfactor/`` and ``matfactor/adapters/`` of this
    checkout, uncommitted changes included), stored with each result: the code moves faster than
    commits."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("matfactor/*.py"), *root.glob("matfactor/adapters/*.py")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _missing_model_side() -> str | None:
    """Why the model benchmarks cannot run here (``None``: they can)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as missing:
        return f"{missing}: the model benchmarks need the hf extra (pip install matfactor[hf])"
    return None


# --------------------------------------------------------------------------------------------
# The main job


#: The main job's layer kinds, for its profile.
_LAYER_KINDS = ("attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense")


def main_job(*, threads: int = THREADS, timeout: float = 900, options: tuple[str, ...] = ()) -> dict:
    """Run ``python -m matfactor compress --out DIR --quiet`` (and ``options``) once; its time,
    peak memory and the split of its time that its output shows (compression, and solve time
    per layer kind)."""
    with tempfile.TemporaryDirectory(prefix="matfactor-main-job-") as directory:
        run = run_child([sys.executable, "-m", "matfactor", "compress", "--out",
                         str(Path(directory) / "compressed"), "--quiet", *options],
                        timeout=timeout, threads=threads, cwd=directory)
    if run.returncode != 0:
        raise RuntimeError(f"the main job failed (exit status {run.returncode}"
                           f"{', killed after the timeout' if run.seconds > timeout else ''}):\n"
                           f"{run.output[-4000:]}")
    result = {"seconds": run.seconds, "peak_rss_mib": run.peak_rss_mib,
              "tree_peak_pss_mib": run.tree_peak_pss_mib, "cpu_seconds": run.cpu_seconds,
              "threads": threads, "options": list(options)}
    total = re.search(r"^total time ([\d.]+) s", run.output, re.M)
    compress = re.search(r"^\d+ layers \(.*; ([\d.]+) s$", run.output, re.M)
    result["reported_total_s"] = float(total.group(1)) if total else None
    result["compress_model_s"] = float(compress.group(1)) if compress else None
    solves: dict[str, float] = {}
    for line in run.output.splitlines():
        fields = line.split()
        # a row of the per-layer report: name, d_in x d_out, method, error, params, kept, seconds
        if len(fields) == 7 and re.fullmatch(r"\d+x\d+", fields[1]):
            within_block = re.search(r"\.\d+\.(.+)$", fields[0])  # the name inside its block
            kind = within_block.group(1) if within_block else "other"
            solves[kind] = solves.get(kind, 0.0) + float(fields[-1])
    result["solve_s_by_layer_kind"] = solves
    result["solve_s"] = sum(solves.values())
    # the saved model's embedding fidelity (an encoder) or the two perplexities (a causal LM)
    result["fidelity"] = " | ".join(line for line in run.output.splitlines()
                                    if line.startswith(("saved model:", "dense model:"))) or None
    return result


class _Profile:
    """Exclusive wall and CPU time per label: spans (wrapped calls, or :meth:`begin` ...
    :meth:`end`) nest, and a span's time excludes the spans inside it (``time.process_time``:
    this process's CPU, all its threads)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._open: list[list[float]] = []   # per open span: its start, and its inner spans' time

    def begin(self) -> None:
        """Open a span, closed by the next :meth:`end`."""
        self._open.append([time.perf_counter(), time.process_time(), 0.0, 0.0])

    def end(self, label: str) -> None:
        """Close the innermost open span, counting its time under ``label``."""
        start_wall, start_cpu, inner_wall, inner_cpu = self._open.pop()
        wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
        self.wall[label] = self.wall.get(label, 0.0) + wall - inner_wall
        self.cpu[label] = self.cpu.get(label, 0.0) + cpu - inner_cpu
        if self._open:
            self._open[-1][2] += wall
            self._open[-1][3] += cpu

    def wrap(self, label, function):
        """``function`` timed under ``label`` (a string, or a function of the call's arguments)."""
        def timed(*args, **kwargs):
            name = label(*args, **kwargs) if callable(label) else label
            self.begin()
            try:
                return function(*args, **kwargs)
            finally:
                self.end(name)
        return timed

    def run(self, label, function, *args, **kwargs):
        return self.wrap(label, function)(*args, **kwargs)


def _profile_child(threads: int) -> dict:
    """The main job's steps, each timed (runs in the child): those of ``matfactor compress``
    with its defaults but the solves in this process, on 128 calibration texts. Each layer's
    solve is a span from its group's calibration (or the previous layer of the group) to its
    replacement, told by an observer; other internals are timed by wrapping them (the same
    calls, in this process only)."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    profile = _Profile()

    def imports():
        import torch
        import transformers  # noqa: F401

        import matfactor.adapters  # noqa: F401
        torch.set_num_threads(threads)

    profile.run("imports", imports)
    import random

    import torch

    from matfactor import ReconstructionStatistics
    from matfactor.adapters import PipelineObserver, Recipe, compress_model, load_compressed, save_compressed
    from matfactor.adapters import calibration, pipeline, text

    class SolveSpans(PipelineObserver):
        """A span of the profile per layer solve (the run has no journal: every layer is solved)."""

        pending = 0   # layers of the current group still to be solved

        def layers_calibrated(self, layers):
            self.pending = len(layers)
            profile.begin()

        def layer_solved(self, report, solution):
            kind = next((kind for kind in _LAYER_KINDS if report.name.endswith(kind)), "other")
            profile.end(f"solve {kind}")
            self.pending -= 1
            if self.pending:
                profile.begin()

    pipeline._capture_first_inputs = profile.wrap("capture first-block inputs",
                                                  pipeline._capture_first_inputs)
    pipeline.compressed_module = profile.wrap("build compressed modules", pipeline.compressed_module)
    calibration.GramAccumulator.update = profile.wrap("accumulate H", calibration.GramAccumulator.update)
    ReconstructionStatistics.update = profile.wrap("accumulate H and error_cross (two streams)",
                                                   ReconstructionStatistics.update)
    ReconstructionStatistics.target_weight = profile.wrap("target_weight (mix correction)",
                                                          ReconstructionStatistics.target_weight)
    embeddings = text.sentence_embeddings
    calls = []

    def which_embeddings(model, batches, **options):
        calls.append(model)
        return "evaluate: dense embeddings" if len(calls) % 2 else "evaluate: compressed embeddings"

    text.sentence_embeddings = profile.wrap(which_embeddings, embeddings)

    model, tokenizer = profile.run("load the model", text.load_text_model)

    def calibration_batches():
        texts = text.pydoc_texts("calibration")
        random.Random(0).shuffle(texts)
        return text.text_batches(tokenizer, texts[:128])

    batches = profile.run("calibration texts, tokenize", calibration_batches)
    report = profile.run("compress_model: block forward passes and the rest", compress_model, model,
                         batches, Recipe.single("dsf", density=0.5), sequential=True, mix=0.5,
                         seed=0, progress=False, observer=SolveSpans())
    profile.run("report", report.format_table)
    with tempfile.TemporaryDirectory(prefix="matfactor-profile-") as directory:
        profile.run("save", save_compressed, model, Path(directory) / "out", tokenizer=tokenizer)
        dense, _ = profile.run("evaluate: load the dense model", text.load_text_model)
        saved = profile.run("evaluate: load the checkpoint", load_compressed, Path(directory) / "out")
        held_out = profile.run("evaluate: held-out texts, tokenize", lambda: text.text_batches(
            tokenizer, text.pydoc_texts("heldout"), batch_size=32))
        with torch.no_grad():
            fidelity = text.embedding_fidelity(dense, saved, held_out)
    total_wall, total_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    profile.wall["unaccounted"] = total_wall - sum(profile.wall.values())
    profile.cpu["unaccounted"] = total_cpu - sum(profile.cpu.values())
    return {"wall": profile.wall, "cpu": profile.cpu, "total_wall": total_wall,
            "total_cpu": total_cpu, "fidelity": str(fidelity), "threads": threads,
            "compress_model_s": report.seconds}


def profile_main_job(*, threads: int = THREADS, timeout: float = 1200) -> dict:
    """Where the main job's time goes, per step (wall and CPU), in a child process."""
    command = [sys.executable, str(Path(__file__).resolve()), "--profile-child", str(threads)]
    with tempfile.TemporaryDirectory(prefix="matfactor-profile-") as directory:
        run = run_child(command, timeout=timeout, threads=threads, cwd=directory)
    lines = [line for line in run.output.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"the profile failed (exit status {run.returncode}):\n{run.output[-4000:]}")
    return dict(json.loads(lines[-1][len("RESULT "):]), seconds=run.seconds,
                cpu_seconds=run.cpu_seconds, peak_rss_mib=run.peak_rss_mib)


class MainJob:
    """The README's main job (``matfactor compress`` with its defaults), end to end, once.

    ``track_seconds`` is its wall time (at most :data:`MAIN_JOB_LIMIT_S` on a 2-core CPU),
    ``track_cpu_seconds`` its CPU time (user + system: on one thread, the wall time it would
    take on an otherwise idle machine), ``track_peak_rss`` the largest peak resident memory of
    the child and its workers, ``track_peak_memory_all_processes`` the peak of their summed PSS.
    """

    number = 1
    repeat = 1
    timeout = 900

    def setup_cache(self):
        missing = _missing_model_side()
        if missing is None:
            try:
                from matfactor.adapters.text import default_model_dir
                default_model_dir()
            except RuntimeError as reason:
                missing = str(reason)
        if missing is not None:
            return {"skip": missing}
        return main_job()

    setup_cache.timeout = 1200

    def setup(self, cache):
        if "skip" in cache:
            raise NotImplementedError(cache["skip"])

    def track_seconds(self, cache):
        return cache["seconds"]

    track_seconds.unit = "seconds"

    def track_cpu_seconds(self, cache):
        return cache["cpu_seconds"]

    track_cpu_seconds.unit = "seconds"

    def track_peak_rss(self, cache):
        return cache["peak_rss_mib"]

    track_peak_rss.unit = "MiB"

    def track_peak_memory_all_processes(self, cache):
        if cache.get("tree_peak_pss_mib") is None:
            raise NotImplementedError("psutil (the bench extra) is not installed")
        return cache["tree_peak_pss_mib"]

    track_peak_memory_all_processes.unit = "MiB"


# --------------------------------------------------------------------------------------------
# A Llama-shaped block

LLAMA_SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
LLAMA_BATCHES, LLAMA_TOKENS = 4, 512
LLAMA_MIXES = [0.5, 0.0]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class _Phases:
    """Peak RSS per phase: each ``mark`` closes a phase (its peak, its end RSS, its time) and
    resets the kernel's peak counter (``echo 5 > /proc/self/clear_refs``, Linux)."""

    def __init__(self, first: str, start: float) -> None:
        self.phases: list[dict] = []
        self._start = start
        self.mark(first)

    @staticmethod
    def reset() -> None:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    def mark(self, label: str) -> dict:
        now = time.perf_counter()
        phase = {"phase": label, "peak_mib": _status_kib("VmHWM") / 1024,
                 "end_mib": _status_kib("VmRSS") / 1024, "seconds": now - self._start}
        self.phases.append(phase)
        self._start = now
        self.reset()
        return phase


def _llama_child(mix: float, method: str, batches: int, tokens: int, threads: int,
                 shape: dict) -> dict:
    """Build the block, calibrate and compress it; measure each phase (runs in the child)."""
    import gc

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaModel

    from matfactor.adapters import PipelineObserver, Recipe, compress_model
    from matfactor.testing import realistic_layer

    start = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
    base_mib = _status_kib("VmRSS") / 1024  # interpreter, torch, transformers
    config = LlamaConfig(**shape, num_key_value_heads=heads, num_hidden_layers=1, vocab_size=32,
                         max_position_embeddings=max(tokens, 2048), use_cache=False)
    model = LlamaModel(config).float().eval()
    block = model.layers[0]
    block_weights_mib = sum(p.nbytes for p in block.parameters()) / MIB  # before compression
    X = realistic_layer(hidden, 1, n_samples=batches * tokens, seed=0).X.astype(np.float32)
    calibration = [{"inputs_embeds": torch.from_numpy(X[i * tokens:(i + 1) * tokens].copy())[None],
                    "use_cache": False} for i in range(batches)]
    del X
    gc.collect()
    setup_mib = _status_kib("VmRSS") / 1024

    phases = _Phases("import, build the model and the inputs", start)
    with torch.no_grad():
        model(**calibration[0])
    forward = phases.mark("one batch through the dense model")

    class GroupPhases(PipelineObserver):
        """Ends a phase when a group's calibration pass is done, and when its last layer is
        replaced."""

        def layers_calibrated(self, layers):
            self.group, self.pending = "/".join(name.rsplit(".", 1)[-1] for name in layers), set(layers)
            phases.mark(f"calibration pass for {self.group}")

        def layer_solved(self, report, solution):
            self.pending.discard(report.name)
            if not self.pending:
                phases.mark(f"solve {self.group}")

    start = time.perf_counter()
    report = compress_model(model, calibration, Recipe.single(method, density=0.5), mix=mix,
                            progress=False, observer=GroupPhases())
    seconds = time.perf_counter() - start
    phases.mark("output pass, return")
    gc.collect()
    after_mib = _status_kib("VmRSS") / 1024

    return {"mix": mix, "method": method, "batches": batches, "tokens": tokens, "threads": threads,
            "shape": shape, "compress_s": seconds, "mean_layer_error":
            sum(layer.rel_error for layer in report.layers) / len(report.layers),
            "block_weights_mib": block_weights_mib,
            "base_mib": base_mib, "setup_mib": setup_mib, "after_return_mib": after_mib,
            "forward_transient_mib": forward["peak_mib"] - setup_mib, "phases": phases.phases}


def llama_budget(result: dict) -> dict:
    """The budget terms of a Llama block run (MiB), from its shape, batches and ``mix``.

    Activations: the stored inputs of every calibration batch (one stream; two with ``mix > 0``)
    and the intermediate activations of one batch's pass through the block, counted at the MLP,
    the larger half: the normalised input ``(S, h)`` and its own ``(S, h)``, gate, act(gate),
    up ``3 (S, m)`` (``S`` tokens per batch). Grams: the first calibration pass observes every
    layer of the block, four ``H`` (q/k/v share one, gate/up share one); with ``mix > 0`` each
    has an ``error_cross`` of the same size.
    """
    h, m = result["shape"]["hidden_size"], result["shape"]["intermediate_size"]
    tokens, f32 = result["tokens"], 4
    stored_inputs = result["batches"] * tokens * h * f32 / MIB
    terms = {
        "block weights": result["block_weights_mib"],
        "stored block inputs (all batches, one stream)": stored_inputs,
        "one batch's intermediate activations": tokens * (2 * h + 3 * m) * f32 / MIB,
        "Grams H of the first pass (3 h² + m²)": (3 * h * h + m * m) * f32 / MIB,
    }
    if result["mix"] > 0:
        terms["stored inputs of the dense stream"] = stored_inputs
        terms["two-stream error_cross (3 h² + m²)"] = terms["Grams H of the first pass (3 h² + m²)"]
        terms["dense copy of the block"] = result["block_weights_mib"]
    return terms


def _with_budget(result: dict) -> dict:
    """``result`` with its budget terms and the peak as a multiple of (block weights + one
    block's activations)."""
    terms = llama_budget(result)
    reference = sum(list(terms.values())[:3])  # weights, stored inputs, one batch's intermediates
    return dict(result, terms_mib=terms, weights_plus_activations_mib=reference,
                peak_over_weights_plus_activations=result["peak_rss_mib"] / reference,
                peak_above_base_over_weights_plus_activations=
                (result["peak_rss_mib"] - result["base_mib"]) / reference)


def llama_block(mix: float, *, method: str = "sparsegpt", batches: int = LLAMA_BATCHES,
                tokens: int = LLAMA_TOKENS, threads: int = THREADS, shape: dict | None = None,
                timeout: float = 1200) -> dict:
    """Compress the Llama-shaped block in a child process; its figures and peak RSS."""
    shape = dict(LLAMA_SHAPE if shape is None else shape)
    command = [sys.executable, str(Path(__file__).resolve()), "--llama-child", json.dumps(
        {"mix": mix, "method": method, "batches": batches, "tokens": tokens, "threads": threads,
         "shape": shape})]
    with tempfile.TemporaryDirectory(prefix="matfactor-llama-") as directory:
        run = run_child(command, timeout=timeout, threads=threads, cwd=directory)
    lines = [line for line in run.output.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"the Llama block run failed (exit status {run.returncode}):\n"
                           f"{run.output[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["seconds"] = run.seconds
    result["cpu_seconds"] = run.cpu_seconds
    # ru_maxrss cannot be used here: resetting the peak counter resets it too (Linux takes it
    # from the same high-water mark at exit); the peak is the largest of the phases' peaks.
    result["peak_rss_mib"] = max(phase["peak_mib"] for phase in result["phases"])
    return _with_budget(result)


class LlamaBlockMemory:
    """Peak RSS of sequentially compressing one Llama-2-7B-shaped block (SparseGPT, density 0.5)
    from 4 x 512 tokens, with the dense stream (``mix=0.5``) and without (``mix=0``); and that
    peak over (block weights + one block's activations)."""

    params = [LLAMA_MIXES]
    param_names = ["mix"]
    number = 1
    repeat = 1
    timeout = 1800

    def setup_cache(self):
        missing = _missing_model_side()
        if missing is None and not os.path.exists("/proc/self/clear_refs"):
            missing = "the per-phase peak memory needs Linux's /proc/self/clear_refs"
        if missing is not None:
            return {"skip": missing}
        return {str(mix): llama_block(mix) for mix in LLAMA_MIXES}

    setup_cache.timeout = 2400

    def setup(self, cache, mix):
        if "skip" in cache:
            raise NotImplementedError(cache["skip"])

    def track_peak_rss(self, cache, mix):
        return cache[str(mix)]["peak_rss_mib"]

    track_peak_rss.unit = "MiB"

    def track_peak_over_weights_plus_activations(self, cache, mix):
        return cache[str(mix)]["peak_over_weights_plus_activations"]

    track_peak_over_weights_plus_activations.unit = "x"


# --------------------------------------------------------------------------------------------
# Standalone: print the figures


def _print_main_job(result: dict) -> None:
    verdict = "within" if result["seconds"] <= MAIN_JOB_LIMIT_S else "OVER"
    print(f"main job: {result['seconds']:.1f} s wall ({verdict} the {MAIN_JOB_LIMIT_S} s limit), "
          f"{result['cpu_seconds']:.1f} s CPU, peak RSS {result['peak_rss_mib']:.0f} MiB "
          f"(largest process), {result['threads']} thread(s)"
          f"{''.join(' ' + option for option in result.get('options', []))}")
    if result.get("tree_peak_pss_mib") is not None:
        print(f"  peak memory of all its processes (summed PSS, sampled): "
              f"{result['tree_peak_pss_mib']:.0f} MiB")
    print(f"  compress_model {result['compress_model_s']} s, of which layer solves "
          f"{result['solve_s']:.1f} s; the command's own total {result['reported_total_s']} s")
    for kind, seconds in result["solve_s_by_layer_kind"].items():
        print(f"    solves of {kind:<24} {seconds:8.1f} s")
    print(f"  {result['fidelity']}")


def _print_llama(result: dict) -> None:
    print(f"Llama block, {result['method']}, mix={result['mix']}: peak RSS {result['peak_rss_mib']:.0f} MiB "
          f"(interpreter and libraries {result['base_mib']:.0f} MiB, after setup "
          f"{result['setup_mib']:.0f} MiB); compress_model {result['compress_s']:.1f} s, whole "
          f"child {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU; mean layer "
          f"error {result['mean_layer_error']:.4f}; one batch through the block measured "
          f"{result['forward_transient_mib']:.0f} MiB above the setup")
    for term, mib in result["terms_mib"].items():
        print(f"    {term:<48} {mib:8.0f} MiB")
    print(f"    {'sum of the terms':<48} {sum(result['terms_mib'].values()):8.0f} MiB")
    print(f"  peak / (block weights + one block's activations = "
          f"{result['weights_plus_activations_mib']:.0f} MiB): "
          f"{result['peak_over_weights_plus_activations']:.2f}x "
          f"({result['peak_above_base_over_weights_plus_activations']:.2f}x without the "
          f"interpreter and libraries); RSS after compress_model returned "
          f"{result['after_return_mib']:.0f} MiB")
    for phase in result["phases"]:
        print(f"    {phase['phase']:<48} peak {phase['peak_mib']:7.0f} MiB, end "
              f"{phase['end_mib']:7.0f} MiB, {phase['seconds']:6.1f} s")


def _print_profile(result: dict) -> None:
    print(f"main job, profiled: {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU "
          f"(child), peak RSS {result['peak_rss_mib']:.0f} MiB, {result['threads']} thread(s); "
          f"compress_model {result['compress_model_s']:.1f} s")
    for label in sorted(result["wall"], key=lambda label: -result["cpu"][label]):
        print(f"    {label:<54} {result['wall'][label]:7.1f} s wall {result['cpu'][label]:7.1f} s CPU")
    print(f"  {result['fidelity']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main-job", action="store_true", help="measure the main job")
    parser.add_argument("--llama", action="store_true", help="measure the Llama-shaped block")
    parser.add_argument("--mix", type=float, nargs="+", default=LLAMA_MIXES,
                        help="mix values of the Llama block (default 0.5 0)")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--timeout", type=float, default=900,
                        help="with --main-job: seconds before the job is killed (default 900)")
    parser.add_argument("--options", nargs=argparse.REMAINDER, default=[],
                        help="with --main-job: more options of matfactor compress (last)")
    parser.add_argument("--json", type=Path, help="also append the results to this JSON-lines file")
    parser.add_argument("--profile", action="store_true",
                        help="profile the main job's steps (wall and CPU time of each)")
    parser.add_argument("--show", type=Path, metavar="FILE",
                        help="print the results stored in a JSON-lines file (--json) and exit")
    parser.add_argument("--llama-child", help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_child:
        print("RESULT " + json.dumps(_llama_child(**json.loads(args.llama_child))), flush=True)
        return
    if args.profile_child:
        print("RESULT " + json.dumps(_profile_child(args.profile_child)), flush=True)
        return
    if args.show is not None:
        printers = {"main_job": _print_main_job, "main_job_profile": _print_profile,
                    "llama_block": lambda result: _print_llama(_with_budget(result))}
        for line in args.show.read_text().splitlines():
            result = json.loads(line)
            print(f"[source {result.get('source')}]")
            printers[result["benchmark"]](result)
        return
    missing = _missing_model_side()
    if missing is not None:
        parser.exit(2, f"{missing}\n")
    both = not (args.main_job or args.llama or args.profile)
    source = source_digest()  # before the runs: the checkout may change while they run
    results = []
    if args.profile:
        results.append(dict(profile_main_job(threads=args.threads), benchmark="main_job_profile",
                            source=source))
        _print_profile(results[-1])
    if args.main_job or both:
        results.append(dict(main_job(threads=args.threads, timeout=args.timeout,
                                     options=tuple(args.options)),
                            benchmark="main_job", source=source))
        _print_main_job(results[-1])
    if args.llama or both:
        for mix in args.mix:
            results.append(dict(llama_block(mix, threads=args.threads), benchmark="llama_block",
                                source=source))
            _print_llama(results[-1])
    if args.json is not None:
        with args.json.open("a") as handle:
            for result in results:
                handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
