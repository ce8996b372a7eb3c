"""End-to-end fidelity of every method on all-MiniLM-L6-v2: sequential against one-shot.

For each method, density and mode, the model is compressed by
:func:`matfactor.adapters.compress_model` (all 36 encoder linear layers, 128 calibration texts of
CPython's pydoc topics, calibration half) and its sentence embeddings (mean pooling) are compared
with the dense model's on the held-out half. Each finished run appends one JSON line to the output
file, so an interrupted run keeps what it measured and a rerun skips it.

Run from the repository root::

    python -m benchmarks.model_fidelity --out benchmarks/results/model_fidelity.jsonl
    python -m benchmarks.model_fidelity --out ... --table     # print the Markdown table

The table in the guide (section 17) was measured this way, one thread per process, with
``--methods sparse_lowrank --arguments '{"iters": 20}'`` for sparse plus low rank (a quarter of
its default 80 alternations, for time). The documentation's fidelity figure adds sequential runs
at other densities (``--densities 0.7 0.2 --modes sequential``).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "dsf", "lowrank", "weighted_lowrank", "pifa",
           "mpifa", "sparse_lowrank")
DENSITIES = (0.5, 0.3)
MODES = ("sequential", "one-shot")


def _key(record: dict) -> tuple:
    return record["method"], record["density"], record["mode"], record.get("refine_steps", 0)


def run(out: Path, methods: list[str], samples: int, threads: int, arguments: dict,
        densities: list[float], modes: list[str], refine: dict | None = None) -> None:
    import torch
    from matfactor.adapters import Recipe, Refinement, compress_model
    from matfactor.adapters.text import embedding_fidelity, load_text_model, pydoc_texts, text_batches

    torch.set_num_threads(threads)
    done = {_key(json.loads(line)) for line in out.read_text().splitlines()} if out.exists() else set()
    dense, tokenizer = load_text_model()
    texts = pydoc_texts("calibration")
    random.Random(0).shuffle(texts)
    calibration = text_batches(tokenizer, texts[:samples])
    held_out = text_batches(tokenizer, pydoc_texts("heldout"), batch_size=32)
    for method in methods:
        for density in densities:
            for mode in modes:
                steps = 0 if refine is None else refine["steps"]
                if (method, density, mode, steps) in done:
                    continue
                model, _ = load_text_model()
                start = time.perf_counter()
                recipe = Recipe(Recipe.single(method, density=density, **arguments).rules,
                                refine=None if refine is None else Refinement(**refine))
                report = compress_model(model, calibration, recipe, sequential=mode == "sequential",
                                        progress=False)
                seconds = time.perf_counter() - start
                fidelity = embedding_fidelity(dense, model, held_out)
                record = {"method": method, "density": density, "mode": mode,
                          "mean_cosine": fidelity.mean_cosine, "min_cosine": fidelity.min_cosine,
                          "neighbour_agreement": fidelity.neighbour_agreement,
                          "n_texts": fidelity.n_texts, "kept": report.params_after / report.params_before,
                          "mean_layer_error": sum(layer.rel_error for layer in report.layers)
                          / len(report.layers), "seconds": seconds, "threads": threads,
                          "calibration_texts": samples, "arguments": arguments,
                          "refine_steps": steps, "refine": refine,
                          "refine_seconds": sum(r.seconds for r in report.refinements),
                          "machine": platform.machine(),
                          "processor": platform.processor() or "unknown"}
                with out.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)


def table(out: Path, refine_steps: int | None = None) -> str:
    """The results as a Markdown table: mean cosine (sequential / one-shot) per method and
    density, and with ``refine_steps``, sequential with that refinement and the time it added."""
    records = {_key(record): record for record in map(json.loads, out.read_text().splitlines())}
    columns = [(d, mode, 0) for d in DENSITIES for mode in MODES]
    if refine_steps:
        columns += [(d, "sequential", refine_steps) for d in DENSITIES]
    lines = ["| method | " + " | ".join(f"{d} {mode}" + (f" + refine {steps}" if steps else "")
                                      for d, mode, steps in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in METHODS:
        cells = []
        for density, mode, steps in columns:
            record = records.get((method, density, mode, steps))
            cell = "–" if record is None else \
                f"{record['mean_cosine']:.4f} ({record['neighbour_agreement']:.0%})"
            if record is not None and steps:
                cell += f", +{record['refine_seconds']:.0f} s"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines results file")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--samples", type=int, default=128, help="calibration texts (default 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--arguments", type=json.loads, default={},
                        help="JSON keyword arguments of the methods' core functions, e.g. '{\"iters\": 20}'")
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES),
                        help="densities to run (default: 0.5 0.3, the table's)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--refine-steps", type=int, default=0,
                        help="block refinement steps (default 0: none); with --table, the refined "
                             "columns to show")
    parser.add_argument("--refine-lr", type=float, help="refinement learning rate (default: the "
                                                        "Refinement default)")
    parser.add_argument("--table", action="store_true", help="print the table of the results file")
    args = parser.parse_args()
    if args.table:
        print(table(args.out, args.refine_steps))
    else:
        refine = None
        if args.refine_steps:
            refine = {"steps": args.refine_steps, **({"lr": args.refine_lr} if args.refine_lr else {})}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        run(args.out, args.methods, args.samples, args.threads, args.arguments, args.densities, args.modes,
            refine)


if __name__ == "__main__":
    main()
