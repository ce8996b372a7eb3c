"""The guide's measured tables: each one measured, recorded and rendered by one command.

Tables (``--table NAME``; the page that shows each in brackets):

- ``dsf_split`` (guide/dsf.md, "The budget split"): ADMM pruning against DSF with the budget
  shares 0.2, 1/3 and the reference code's ``"paper"`` rule, on three real all-MiniLM-L6-v2
  layers at densities 0.5, 0.3 and 0.25, the default 40 x 5 iterations;
- ``dsf_synthetic`` (guide/dsf.md): the same comparison on a synthetic ``realistic_layer``;
- ``sparse_lowrank`` (guide/sparse_lowrank.md, "Measured"): HASSLE-free and its variants against
  OATS and SparseGPT alone, 80 alternations, on synthetic and real layers;
- ``eta`` (guide/sparse_lowrank.md): the Low-Rank-GD learning rate ``lr`` (η) of the
  alternation, 40 alternations, 2:4 plus rank d/64;
- ``mix`` (guide/models.md, "Error-accumulation correction"): end-to-end fidelity of SparseGPT
  on all-MiniLM-L6-v2, one-shot against sequential at several ``mix`` ratios, and with few
  calibration texts;
- ``csr`` (guide/models.md, "Compressed modules"): the product with a DSF layer's square factor
  (about 10% dense at density 0.5), dense against CSR, in PyTorch.

Every measurement runs on one thread; each record (one JSON line) carries the machine, the
command and its wall time, and a rerun skips what the file already holds. Run from the
repository root::

    python -m benchmarks.guide_tables                           # measure every table
    python -m benchmarks.guide_tables --table dsf_split eta     # measure some
    python -m benchmarks.guide_tables --print                   # the pages' text, from the file
    python -m benchmarks.guide_tables --print mix

``--print`` renders, from the committed records, the Markdown tables and the figures quoted in
the pages' sentences exactly as the pages show them (``tests/test_guide_tables.py`` checks
that they do). On the shared 2-core machine the committed records come from, under load, the
tables took about 70 minutes of wall time in all, ``mix`` 48 of them; each record holds its own.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "guide_tables.jsonl"

#: Which page shows each table (paths relative to the repository root).
PAGES = {"dsf_split": "docs/guide/dsf.md", "dsf_synthetic": "docs/guide/dsf.md",
         "sparse_lowrank": "docs/guide/sparse_lowrank.md", "eta": "docs/guide/sparse_lowrank.md",
         "mix": "docs/guide/models.md", "csr": "docs/guide/models.md"}

#: The real layers by role, as in benchmarks/common.py and the figures.
LAYERS = {"square": (0, "attention.output.dense"), "wide": (2, "intermediate.dense"),
          "tall": (2, "output.dense")}
LAYER_LABELS = {"square": "L0 `attention.output.dense`", "wide": "L2 `intermediate.dense`",
                "tall": "L2 `output.dense`"}


def real(role: str, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    from matfactor.adapters.problems import real_layer_problem

    problem = real_layer_problem(*LAYERS[role])
    return problem.W.astype(dtype), problem.H.astype(dtype)


def synthetic(d_in: int, d_out: int, seed: int, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """The asv suite's synthetic layers (benchmarks/common.py ``cached_layer``)."""
    from benchmarks.common import cached_layer

    problem = cached_layer(d_in, d_out, seed=seed)
    return problem.W.astype(dtype), problem.H.astype(dtype)


# --- measurements: each yields (key, values) pairs; the key identifies the record ------------

DSF_DENSITIES = (0.5, 0.3, 0.25)
DSF_SPLITS = {"0.2": 0.2, "1/3": 1 / 3, "paper": "paper"}


def measure_dsf_split() -> Iterator[tuple[dict, Callable[[], dict]]]:
    """Real layers, float32: ADMM, and DSF (40 x 5, layer-wise) with each budget split."""
    from matfactor import admm_prune, double_sparse, dsf_budget_split, layer_error

    for role in LAYERS:
        for density in DSF_DENSITIES:
            def admm(role=role, density=density):
                W, H = real(role)
                return {"error": layer_error(W, admm_prune(W, H, density=density), H)}

            yield {"layer": role, "density": density, "method": "admm"}, admm
            for label, split in DSF_SPLITS.items():
                def dsf(role=role, density=density, split=split):
                    W, H = real(role)
                    result = double_sparse(W, density, H, split=split)
                    square, _ = dsf_budget_split(W.shape, density, split=split, layerwise=True)
                    auto, _ = dsf_budget_split(W.shape, density, layerwise=True)
                    return {"error": result.rel_error(W, H), "nnz": int(result.n_params),
                            "square_nnz": int(square), "auto": square == auto,
                            "square_share": square / int(density * W.size)}

                yield {"layer": role, "density": density, "method": f"dsf {label}"}, dsf


DSF_SYNTHETIC_DENSITIES = (0.3, 0.5, 0.7)


def measure_dsf_synthetic() -> Iterator[tuple[dict, Callable[[], dict]]]:
    """``realistic_layer(64, 96, seed=0)`` in float64 (the page's example), default iterations."""
    from matfactor import admm_prune, double_sparse, layer_error
    from matfactor.testing import realistic_layer

    for density in DSF_SYNTHETIC_DENSITIES:
        def run(density=density):
            problem = realistic_layer(64, 96, seed=0)
            W, H = problem.W, problem.H
            return {"admm": layer_error(W, admm_prune(W, H, density=density), H),
                    "dsf": double_sparse(W, density, H).rel_error(W, H)}

        yield {"density": density}, run


SLR_LAYERS = {"synthetic 512 x 512": ("synthetic", (512, 512)),
              "synthetic 512 x 1536": ("synthetic", (512, 1536)),
              "synthetic 1536 x 512": ("synthetic", (1536, 512)),
              "MiniLM L0 attention.output (384 x 384)": ("real", "square"),
              "MiniLM L2 intermediate (384 x 1536)": ("real", "wide"),
              "MiniLM L2 output (1536 x 384)": ("real", "tall")}
SLR_SETTINGS = ("2:4+r/64", "50%,k=0.3")
SLR_VARIANTS = {"oats": dict(hessian="diagonal"), "gd": dict(hessian="full", lowrank="gd"),
                "gd_random": dict(hessian="full", lowrank="gd", init="random", rng=0),
                "exact": dict(hessian="full", lowrank="exact")}


def slr_problem(layer: str) -> tuple[np.ndarray, np.ndarray]:
    kind, which = SLR_LAYERS[layer]
    return synthetic(*which, seed=5) if kind == "synthetic" else real(which)


def measure_sparse_lowrank() -> Iterator[tuple[dict, Callable[[], dict]]]:
    """float32, 80 alternations, the settings of benchmarks/bench_sparse_lowrank.py."""
    from benchmarks.bench_sparse_lowrank import setting_arguments
    from matfactor import layer_error, sparse_plus_lowrank, sparsegpt_prune

    for layer in SLR_LAYERS:
        for setting in SLR_SETTINGS:
            def run(layer=layer, setting=setting):
                W, H = slr_problem(layer)
                arguments = setting_arguments(setting, W.shape)
                sparse_only = {key: value for key, value in arguments.items() if key != "rank"}
                values = {"rank": arguments["rank"],
                          "sparsegpt": layer_error(W, sparsegpt_prune(W, H, **sparse_only), H)}
                for variant, options in SLR_VARIANTS.items():
                    result = sparse_plus_lowrank(W, H, **arguments, **options)
                    values[variant] = result.rel_error(W, H)
                    values[f"{variant}_history"] = [float(value) for value in result.history]
                return values

            yield {"layer": layer, "setting": setting}, run


ETA_VALUES = (0.01, 0.03, 0.1, 0.3, 1.0)
ETA_LAYERS = ("synthetic 512 x 512", "MiniLM L0 attention.output (384 x 384)",
              "MiniLM L2 intermediate (384 x 1536)", "MiniLM L2 output (1536 x 384)")


def measure_eta() -> Iterator[tuple[dict, Callable[[], dict]]]:
    """float32, HASSLE-free (SparseGPT + Low-Rank-GD), 40 alternations, 2:4 plus rank d/64."""
    from matfactor import sparse_plus_lowrank

    for layer in ETA_LAYERS:
        for eta in ETA_VALUES:
            def run(layer=layer, eta=eta):
                W, H = slr_problem(layer)
                rank = max(1, min(W.shape) // 64)
                result = sparse_plus_lowrank(W, H, rank, pattern="2:4", iters=40, lr=eta)
                return {"rank": rank, "error": result.rel_error(W, H)}

            yield {"layer": layer, "eta": eta}, run


MIX_RUNS = [(0.5, "one-shot", None, 128), (0.5, "sequential", 0.0, 128), (0.5, "sequential", 0.25, 128),
            (0.5, "sequential", 0.5, 128), (0.5, "sequential", 1.0, 128),
            (0.3, "one-shot", None, 128), (0.3, "sequential", 0.0, 128), (0.3, "sequential", 0.25, 128),
            (0.3, "sequential", 0.5, 128), (0.3, "sequential", 1.0, 128),
            (0.3, "one-shot", None, 16), (0.3, "sequential", 0.5, 16)]


def measure_mix() -> Iterator[tuple[dict, Callable[[], dict]]]:
    """SparseGPT on all 36 layers; calibration as benchmarks/model_fidelity.py (the first texts of
    a seeded shuffle of the calibration split); all 742 held-out texts."""
    for density, mode, mix, samples in MIX_RUNS:
        def run(density=density, mode=mode, mix=mix, samples=samples):
            from matfactor.adapters import Recipe, compress_model
            from matfactor.adapters.text import embedding_fidelity, load_text_model, pydoc_texts, text_batches

            dense, tokenizer = load_text_model()
            texts = pydoc_texts("calibration")
            random.Random(0).shuffle(texts)
            calibration = text_batches(tokenizer, texts[:samples])
            held_out = text_batches(tokenizer, pydoc_texts("heldout"), batch_size=32)
            model, _ = load_text_model()
            compress_model(model, calibration, Recipe.single("sparsegpt", density=density),
                           sequential=mode == "sequential", progress=False,
                           **({} if mix is None else {"mix": mix}))
            fidelity = embedding_fidelity(dense, model, held_out)
            tokens = int(sum(int(batch["attention_mask"].sum()) for batch in calibration))
            return {"mean_cosine": fidelity.mean_cosine, "neighbour_agreement": fidelity.neighbour_agreement,
                    "n_texts": fidelity.n_texts, "calibration_tokens": tokens}

        yield {"density": density, "mode": mode, "mix": mix, "samples": samples}, run


def measure_csr() -> Iterator[tuple[dict, Callable[[], dict]]]:
    """The square factor of a DSF layer, d = 4096 at density 0.5 with a fifth of the budget
    (``dsf_budget_split(..., split=0.2)``, about 10% of the factor; the ``"auto"`` split of a
    square layer is now a quarter, 12.5%), applied to 128 tokens: dense ``x @ A`` against the
    CSR product ``(Aᵀ xᵀ)ᵀ``, float32, medians of 11 repeats after a warm-up, ``no_grad``."""
    def run():
        import torch

        from matfactor import dsf_budget_split

        d, tokens = 4096, 128
        square, _ = dsf_budget_split((d, d), 0.5, split=0.2)  # the committed records' share
        generator = torch.Generator().manual_seed(0)
        A = torch.zeros(d * d)
        A[torch.randperm(d * d, generator=generator)[:square]] = torch.randn(square, generator=generator)
        A = A.reshape(d, d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            At_csr = A.T.contiguous().to_sparse_csr()
        x = torch.randn(tokens, d, generator=generator)

        def median_ms(product: Callable[[], Any]) -> float:
            product()
            times = []
            for _ in range(11):
                start = time.perf_counter()
                product()
                times.append(time.perf_counter() - start)
            return 1000 * float(np.median(times))

        with torch.no_grad():
            assert torch.allclose(x @ A, (At_csr @ x.T).T, rtol=1e-4, atol=1e-3)
            return {"d": d, "tokens": tokens, "factor_density": square / d**2,
                    "dense_ms": median_ms(lambda: x @ A), "csr_ms": median_ms(lambda: (At_csr @ x.T).T)}

    yield {"d": 4096}, run


MEASURES = {"dsf_split": measure_dsf_split, "dsf_synthetic": measure_dsf_synthetic,
            "sparse_lowrank": measure_sparse_lowrank, "eta": measure_eta, "mix": measure_mix,
            "csr": measure_csr}


def load(path: Path = RESULTS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def measure(names: list[str], path: Path) -> None:
    import torch

    from benchmarks.common import machine

    torch.set_num_threads(1)
    done = {(record["table"], json.dumps(record["key"], sort_keys=True)) for record in load(path)}
    command = "python -m benchmarks.guide_tables --table " + " ".join(names)
    info = machine()
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        for key, run in MEASURES[name]():
            if (name, json.dumps(key, sort_keys=True)) in done:
                continue
            start = time.perf_counter()
            values = run()
            record = {"table": name, "key": key, **values, "seconds": time.perf_counter() - start,
                      "machine": info, "command": command}
            with path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps({k: v for k, v in record.items() if not k.endswith("history")}), flush=True)


# --- rendering: what the pages show, from the records ---------------------------------------

def _records(records: list[dict], name: str) -> dict[str, dict]:
    return {json.dumps(record["key"], sort_keys=True): record for record in records
            if record["table"] == name}


def _get(table: dict[str, dict], **key: Any) -> dict:
    return table[json.dumps(key, sort_keys=True)]


def render_dsf_split(records: list[dict]) -> list[str]:
    table = _records(records, "dsf_split")
    shapes = {"square": "384 x 384", "wide": "384 x 1536", "tall": "1536 x 384"}
    lines = ["| Layer | Shape | Density | ADMM | DSF, share 0.2 | DSF, share 1/3 | DSF, `\"paper\"` |",
             "|---|---|---|---|---|---|---|"]
    for role in LAYERS:
        for index, density in enumerate(DSF_DENSITIES):
            cells = [LAYER_LABELS[role], shapes[role]] if index == 0 else ["", ""]
            cells += [str(density), f"{_get(table, layer=role, density=density, method='admm')['error']:.6f}"]
            for label in DSF_SPLITS:
                record = _get(table, layer=role, density=density, method=f"dsf {label}")
                cell = f"{record['error']:.6f}"
                cells.append(f"**{cell}**" if record["auto"] and label != "paper" else cell)
            lines.append("| " + " | ".join(cells) + " |")
    paper = {role: _get(table, layer=role, density=0.25, method="dsf paper") for role in ("square", "tall")}
    third = {role: _get(table, layer=role, density=0.25, method="dsf 1/3") for role in ("square", "tall")}
    fifth = _get(table, layer="square", density=0.25, method="dsf 0.2")
    return ["\n".join(lines),
            f"gives the square factor {paper['square']['square_share']:.0%} of the budget and reaches "
            f"{paper['square']['error']:.4f}, against {fifth['error']:.4f} with share 0.2 and "
            f"{third['square']['error']:.4f} with share 1/3",
            f"on the tall layer at 0.25 it reaches {paper['tall']['error']:.4f} against "
            f"{third['tall']['error']:.4f} with share 1/3"]


def render_dsf_synthetic(records: list[dict]) -> list[str]:
    table = _records(records, "dsf_synthetic")

    def figure(value: float) -> str:
        return np.format_float_positional(value, precision=2, fractional=False)

    pairs = [_get(table, density=density) for density in DSF_SYNTHETIC_DENSITIES]
    return [", ".join(f"{figure(pair['admm'])} against {figure(pair['dsf'])}" for pair in pairs)]


def render_sparse_lowrank(records: list[dict]) -> list[str]:
    table = _records(records, "sparse_lowrank")
    lines = ["| layer | setting | SparseGPT alone | OATS | HASSLE-free (GD) | GD, paper's start | exact step "
             "| GD / OATS |", "|---|---|---|---|---|---|---|---|"]
    for layer in SLR_LAYERS:
        for setting in SLR_SETTINGS:
            record = _get(table, layer=layer, setting=setting)
            label = (f"2:4 + r {record['rank']}" if setting == "2:4+r/64"
                     else f"50%, κ 0.3 (r {record['rank']})")
            cells = [layer, label] + [f"{record[key]:.5f}"
                                      for key in ("sparsegpt", "oats", "gd", "gd_random", "exact")]
            cells.append(f"{record['gd'] / record['oats']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    early = _get(table, layer="MiniLM L0 attention.output (384 x 384)", setting="50%,k=0.3")
    return ["\n".join(lines),
            f"iteration 10: {early['gd_history'][10]:.5f} against {early['gd_random_history'][10]:.5f}"]


def render_eta(records: list[dict]) -> list[str]:
    table = _records(records, "eta")
    lines = ["| layer | " + " | ".join(f"η = {eta:g}" for eta in ETA_VALUES) + " |",
             "|---|" + "---|" * len(ETA_VALUES)]
    for layer in ETA_LAYERS:
        lines.append(f"| {layer} | " + " | ".join(f"{_get(table, layer=layer, eta=eta)['error']:.5f}"
                                                   for eta in ETA_VALUES) + " |")
    return ["\n".join(lines)]


def render_mix(records: list[dict]) -> list[str]:
    table = _records(records, "mix")
    mixes = (0.0, 0.25, 0.5, 1.0)
    lines = ["| density | one-shot | sequential, `mix` 0 | 0.25 | 0.5 | 1.0 |", "|---|---|---|---|---|---|"]
    for density in (0.5, 0.3):
        runs = [_get(table, density=density, mode="one-shot", mix=None, samples=128)]
        runs += [_get(table, density=density, mode="sequential", mix=mix, samples=128) for mix in mixes]
        cells = [f"{run['mean_cosine']:.4f}" for run in runs]
        lines.append(f"| {density} | " + " | ".join(cells) + " |")
    few_sequential = _get(table, density=0.3, mode="sequential", mix=0.5, samples=16)
    few_one_shot = _get(table, density=0.3, mode="one-shot", mix=None, samples=16)
    return ["\n".join(lines),
            f"with 16 texts (about {round(few_sequential['calibration_tokens'], -2):,} tokens",
            f"({few_sequential['mean_cosine']:.2f} against {few_one_shot['mean_cosine']:.2f} for SparseGPT)"]


def render_csr(records: list[dict]) -> list[str]:
    record = _get(_records(records, "csr"), d=4096)
    return [f"{record['csr_ms']:.0f} against {record['dense_ms']:.0f} ms at d = 4096"]


RENDER = {"dsf_split": render_dsf_split, "dsf_synthetic": render_dsf_synthetic,
          "sparse_lowrank": render_sparse_lowrank, "eta": render_eta, "mix": render_mix,
          "csr": render_csr}


def render(name: str, records: list[dict] | None = None) -> list[str]:
    """What the page shows of table ``name``: a Markdown table and figures quoted in sentences."""
    return RENDER[name](load() if records is None else records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", nargs="+", choices=list(MEASURES), default=list(MEASURES),
                        help="tables to measure (default: all)")
    parser.add_argument("--print", nargs="*", choices=list(RENDER), dest="show", metavar="NAME",
                        help="print the named tables (default: all) from the results file; measure nothing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON-lines results file")
    args = parser.parse_args(argv)
    if args.show is not None:
        records = load(args.out)
        for name in args.show or list(RENDER):
            print(f"## {name} ({PAGES[name]})\n")
            print("\n\n".join(render(name, records)) + "\n")
    else:
        measure(args.table, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
