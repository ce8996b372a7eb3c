"""Measure and draw the figures of the documentation, from real data only.

Four figures, each from data measured here or committed by a benchmark run:

``layer_errors.png``
    Relative layer error ``tr(DᵀHD) / tr(WᵀHW)`` against density (0.1 to 0.9) for every method of
    the model pipeline, on three real all-MiniLM-L6-v2 layers (square, wide and tall) calibrated
    by the pipeline's hooks on CPython's pydoc topics
    (:func:`matfactor.adapters.problems.real_layer_problem`). Data: ``data/layer_errors.json``.
``tradeoff.png``
    Time against error at density 0.5 on the same layers: DSF for several outer iteration counts,
    HASSLE-free (:func:`matfactor.sparse_plus_lowrank`) against OATS (its ``hessian="diagonal"``
    variant) for several alternation counts, and the one-call methods as points. Time (CPU time of
    one thread) is in units of one ``sparsegpt_prune`` call on the same layer, measured in the same
    run. Data:
    ``data/tradeoff.json``.
``model_fidelity.png``
    End-to-end fidelity of the compressed model against density, from the committed results of
    ``python -m benchmarks.model_fidelity`` (``benchmarks/results/model_fidelity.jsonl``).
``pifa_speedup.png``
    Forward-time speed-up of :class:`matfactor.adapters.modules.PifaLinear` over ``nn.Linear``
    and over :class:`~matfactor.adapters.modules.LowRankLinear` against density, the ratios of
    medians measured in one run. Data: ``data/pifa_speedup.json``.

Every figure names on it the machine and the data it came from. Run from the repository root::

    python docs/figures/make_figures.py                 # measure everything, then draw
    python docs/figures/make_figures.py --plot-only     # redraw from the data files
    python docs/figures/make_figures.py --measure pifa  # re-measure one data set, then draw
    python docs/figures/make_figures.py --tables        # the tables of "Choosing a method"

Measurements run on one thread (the script sets the BLAS and torch thread counts itself); run
it under ``nice`` on a shared machine. It took about 25 minutes of wall time on a busy 2-core
machine (each data file records its own). Solve times are CPU times of the process and forward
times medians of interleaved repeats, and only their ratios within one run are reported.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = "1"  # before NumPy loads its BLAS

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
ROOT = HERE.parents[1]
FIDELITY = ROOT / "benchmarks" / "results" / "model_fidelity.jsonl"

#: The real layers: (encoder block, linear layer) of all-MiniLM-L6-v2, as in benchmarks/common.py.
LAYERS = {"square": (0, "attention.output.dense"), "wide": (2, "intermediate.dense"),
          "tall": (2, "output.dense")}
N_TEXTS = 64
DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "dsf", "lowrank", "weighted_lowrank", "pifa",
           "mpifa", "sparse_lowrank")
TRADEOFF_DENSITY = 0.5
DSF_OUTER_ITERS = (2, 5, 10, 20, 40, 80)
ALTERNATIONS = (1, 2, 5, 10, 20, 40, 80)
SPEED_SIZES = (1024, 4096)
SPEED_TOKENS = 128

STYLE = {  # colour by family: pruning blue, DSF red, low rank green, sparse plus low rank purple
    "magnitude": ("#9ecae1", "v"), "wanda": ("#6baed6", "^"), "sparsegpt": ("#3182bd", "s"),
    "admm": ("#08519c", "D"), "dsf": ("#d62728", "o"), "lowrank": ("#c7e9c0", "v"),
    "weighted_lowrank": ("#74c476", "^"), "pifa": ("#31a354", "s"), "mpifa": ("#006d2c", "x"),
    "sparse_lowrank": ("#756bb1", "P"), "oats": ("#bcbddc", "P"),
}


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info['cpu']}, {info['cores']} cores, {info['threads']} thread(s); {info['platform']}, "
            f"Python {info['python']}, NumPy {info['numpy']}, torch {info['torch']}")


def _problem(shape_name: str) -> tuple[Any, Any, Any]:
    """``(W, H, X)`` of a real layer in float32, the pipeline's compute dtype."""
    from matfactor.adapters.problems import real_layer_problem

    problem = real_layer_problem(*LAYERS[shape_name], n_texts=N_TEXTS)
    return (problem.W.astype(np.float32), problem.H.astype(np.float32),
            problem.X.astype(np.float32))


def solve(method: str, W: Any, H: Any, X: Any, density: float, **arguments: Any) -> tuple[Any, int]:
    """One method at ``density`` with the model pipeline's budget rules; ``(Ŵ, stored values)``.

    The budgets are those of :mod:`matfactor.adapters.methods`: nonzeros for the pruners and DSF,
    ``r (d_in + d_out)`` for two factors, ``r (d_in + d_out − r)`` for PIFA and MPIFA, and for sparse
    plus low rank 30% of the values in the low-rank part (:func:`matfactor.sparse_lowrank_budget`).
    """
    import matfactor as mf

    shape = W.shape
    if method in ("magnitude", "wanda", "sparsegpt", "admm"):
        prune = {"magnitude": mf.magnitude_prune, "wanda": mf.wanda_prune,
                 "sparsegpt": mf.sparsegpt_prune, "admm": mf.admm_prune}[method]
        W_hat = prune(W, H, density=density, **arguments)
        return W_hat, int(np.count_nonzero(W_hat))
    if method == "dsf":
        result = mf.double_sparse(W, density, H, **arguments)
    elif method == "lowrank":
        result = mf.truncated_svd(W, mf.lowrank_rank_for_density(shape, density))
    elif method == "weighted_lowrank":
        result = mf.weighted_lowrank(W, H, mf.lowrank_rank_for_density(shape, density))
    elif method == "pifa":
        low = mf.weighted_lowrank(W, H, mf.pifa_rank_for_density(shape, density))
        result = mf.pifa_from_factors(low.U, low.V)
    elif method == "mpifa":
        statistics = mf.ReconstructionStatistics()
        statistics.update(X)  # one layer on its own: the dense and compressed streams agree
        result = mf.mpifa(W, statistics, mf.pifa_rank_for_density(shape, density))
    elif method in ("sparse_lowrank", "oats"):
        budget = mf.sparse_lowrank_budget(shape, 1.0 - density, 0.3)
        if method == "oats":
            arguments = {**arguments, "hessian": "diagonal"}
        result = mf.sparse_plus_lowrank(W, H, budget.rank, density=budget.density, **arguments)
    else:
        raise ValueError(f"unknown method {method!r}")
    return result.dense(), int(result.n_params)


def measure_errors() -> dict[str, Any]:
    """Layer error of every method at every density on the three real layers."""
    from matfactor import layer_error

    records = []
    for shape_name in LAYERS:
        W, H, X = _problem(shape_name)
        for method in METHODS:
            for density in DENSITIES:
                start = time.perf_counter()
                W_hat, stored = solve(method, W, H, X, density)
                seconds = time.perf_counter() - start
                records.append({"layer": shape_name, "shape": list(W.shape), "method": method,
                                "density": density, "kept": stored / W.size,
                                "rel_error": layer_error(W, W_hat, H), "seconds": seconds})
                print(json.dumps(records[-1]), flush=True)
    return {"records": records}


def _timed(run: Callable[[], Any]) -> tuple[Any, float]:
    """The result of ``run`` and its best CPU time over up to five calls (one if it is slow).

    CPU time of this process, not wall time: on one thread it is the work done, which other jobs
    on a shared machine change far less than they change the wall clock.
    """
    start = time.process_time()
    result = run()
    best = time.process_time() - start
    for _ in range(min(4, int(1.0 / max(best, 1e-3)))):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return result, best


def measure_tradeoff() -> dict[str, Any]:
    """Time and error at density 0.5: DSF iteration counts, HASSLE-free and OATS alternations."""
    from matfactor import layer_error

    density = TRADEOFF_DENSITY
    records = []
    for shape_name in LAYERS:
        W, H, X = _problem(shape_name)
        _, unit = _timed(lambda W=W, H=H, X=X: solve("sparsegpt", W, H, X, density))
        runs = [(method, {}) for method in METHODS if method not in ("dsf", "sparse_lowrank")]
        runs += [("dsf", {"outer_iters": n}) for n in DSF_OUTER_ITERS]
        runs += [(method, {"iters": n}) for method in ("sparse_lowrank", "oats") for n in ALTERNATIONS]
        for method, arguments in runs:
            (W_hat, stored), seconds = _timed(
                lambda method=method, arguments=arguments, W=W, H=H, X=X:
                solve(method, W, H, X, density, **arguments))
            records.append({"layer": shape_name, "shape": list(W.shape), "method": method,
                            "arguments": arguments, "density": density, "kept": stored / W.size,
                            "rel_error": layer_error(W, W_hat, H), "seconds": seconds,
                            "sparsegpt_seconds": unit, "relative_time": seconds / unit})
            print(json.dumps(records[-1]), flush=True)
    return {"records": records}


def measure_pifa_speed() -> dict[str, Any]:
    """Forward time of PifaLinear, LowRankLinear and nn.Linear on square float32 layers.

    For each density, the PIFA layer has the rank :func:`matfactor.pifa_rank_for_density` allows
    (a multiple of 8), the two-factor layer either the rank its own count allows
    (:func:`matfactor.lowrank_rank_for_density`: the same stored values) or the PIFA rank (the same
    matrix). Weights are random (timing does not depend on their values). The modules are timed in
    turn, repeat after repeat, and each ratio is of the medians.
    """
    import torch
    from matfactor.adapters.modules import LowRankLinear, PifaLinear
    from torch import nn

    from matfactor import lowrank_rank_for_density, pifa_from_factors, pifa_rank_for_density

    records = []
    for d in SPEED_SIZES:
        generator = torch.Generator().manual_seed(d)
        X = torch.randn((SPEED_TOKENS, d), generator=generator)
        bias = torch.randn(d, generator=generator)

        def factors(rank: int, d: int = d, generator: torch.Generator = generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.randn((d, rank), generator=generator) / math.sqrt(d),
                    torch.randn((d, rank), generator=generator))

        dense = nn.Linear(d, d).eval()
        repeats = 31 if d <= 1024 else 11
        for density in DENSITIES:
            rank = pifa_rank_for_density((d, d), density, multiple_of=8)
            U, V = factors(rank)
            pivoted = pifa_from_factors(U.numpy(), V.numpy())
            modules = {
                "dense": dense,
                "pifa": PifaLinear(torch.from_numpy(pivoted.pivots), torch.from_numpy(pivoted.non_pivots),
                                   torch.from_numpy(pivoted.W_p), torch.from_numpy(pivoted.C), bias),
                "lowrank_same_rank": LowRankLinear(U, V, bias),
                "lowrank_same_density": LowRankLinear(*factors(lowrank_rank_for_density((d, d), density)),
                                                      bias),
            }
            times: dict[str, list[float]] = {name: [] for name in modules}
            with torch.no_grad():
                for name, module in modules.items():  # warm-up
                    module(X)
                for _ in range(repeats):
                    for name, module in modules.items():
                        start = time.perf_counter()
                        module(X)
                        times[name].append(time.perf_counter() - start)
            median = {name: float(np.median(values)) for name, values in times.items()}
            record = {"d": d, "tokens": SPEED_TOKENS, "density": density, "pifa_rank": rank,
                      "lowrank_rank": modules["lowrank_same_density"].rank, "repeats": repeats,
                      "median_seconds": median,
                      "pifa_over_dense": median["dense"] / median["pifa"],
                      "lowrank_over_dense": median["dense"] / median["lowrank_same_density"],
                      "pifa_over_lowrank_same_density": median["lowrank_same_density"] / median["pifa"],
                      "pifa_over_lowrank_same_rank": median["lowrank_same_rank"] / median["pifa"]}
            records.append(record)
            print(json.dumps(record), flush=True)
    return {"records": records}


MEASUREMENTS = {"errors": ("layer_errors.json", measure_errors),
                "tradeoff": ("tradeoff.json", measure_tradeoff),
                "pifa": ("pifa_speedup.json", measure_pifa_speed)}


def measure(name: str) -> None:
    import torch

    sys.path.insert(0, str(ROOT))  # this script runs from its own folder; the benchmarks' helpers
    from benchmarks.common import machine

    torch.set_num_threads(1)
    file_name, run = MEASUREMENTS[name]
    info = machine()
    start = time.perf_counter()
    data = run()
    data = {"machine": info, "script": "python docs/figures/make_figures.py --measure " + name,
            "n_texts": N_TEXTS, "layers": {key: f"encoder.layer.{block}.{layer}"
                                          for key, (block, layer) in LAYERS.items()},
            "wall_seconds": time.perf_counter() - start, **data}
    DATA.mkdir(exist_ok=True)
    (DATA / file_name).write_text(json.dumps(data, indent=1) + "\n")


def _load(file_name: str) -> dict[str, Any]:
    return json.loads((DATA / file_name).read_text())


def _footer(figure: Any, text: str) -> None:
    figure.text(0.01, 0.005, text, fontsize=6.5, color="0.35", ha="left", va="bottom", wrap=True)


def _layer_title(data: dict[str, Any], shape_name: str, shape: list[int]) -> str:
    return f"{shape_name}: {data['layers'][shape_name]}  ({shape[0]} x {shape[1]})"


def plot_errors(plt: Any, out: Path) -> None:
    data = _load("layer_errors.json")
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.6), sharey=True)
    for axis, shape_name in zip(axes, LAYERS):
        records = [r for r in data["records"] if r["layer"] == shape_name]
        for method in METHODS:
            points = sorted((r["density"], r["rel_error"]) for r in records if r["method"] == method)
            colour, marker = STYLE[method]
            axis.plot(*zip(*points), color=colour, marker=marker, markersize=4, label=method)
        axis.set_yscale("log")
        axis.set_xlabel("density (stored values / dense)")
        axis.set_title(_layer_title(data, shape_name, records[0]["shape"]), fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("relative layer error  tr(DᵀHD) / tr(WᵀHW)")
    axes[-1].legend(fontsize=7, loc="lower left")
    figure.suptitle("Layer error against density, real all-MiniLM-L6-v2 layers (lower is better)")
    _footer(figure, f"Data: docs/figures/data/layer_errors.json ({data['script']}); H from "
            f"{data['n_texts']} pydoc calibration paragraphs by the pipeline's hooks; float32; method "
            f"defaults (DSF 40 x 5, sparse_lowrank 80 alternations, 30% low rank). Machine: "
            f"{machine_line(data['machine'])}.")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(out / "layer_errors.png", dpi=110)
    plt.close(figure)


def plot_tradeoff(plt: Any, out: Path) -> None:
    data = _load("tradeoff.json")
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    curves = {"dsf": "DSF, outer iterations", "sparse_lowrank": "HASSLE-free, alternations",
              "oats": "OATS, alternations"}
    for axis, shape_name in zip(axes, LAYERS):
        records = [r for r in data["records"] if r["layer"] == shape_name]
        for method, label in curves.items():
            points = sorted((r["relative_time"], r["rel_error"], next(iter(r["arguments"].values())))
                            for r in records if r["method"] == method)
            colour, marker = STYLE[method]
            axis.plot([p[0] for p in points], [p[1] for p in points], color=colour, marker=marker,
                      label=label)
            for x, y, count in points:
                axis.annotate(str(count), (x, y), textcoords="offset points", xytext=(3, 3),
                              fontsize=6, color=colour)
        for record in records:
            if record["method"] not in curves:
                colour, marker = STYLE[record["method"]]
                axis.scatter(record["relative_time"], record["rel_error"], color=colour, marker=marker,
                             label=record["method"], zorder=3)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("time / one sparsegpt_prune call on this layer (same run)")
        axis.set_title(_layer_title(data, shape_name, records[0]["shape"]), fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("relative layer error")
    axes[-1].legend(fontsize=7, loc="upper right")
    figure.suptitle(f"Time against error at density {TRADEOFF_DENSITY}, real all-MiniLM-L6-v2 layers "
                    "(lower left is better; numbers: iteration counts)")
    units = ", ".join(f"{name} {1000 * next(r['sparsegpt_seconds'] for r in data['records'] if r['layer'] == name):.0f} ms"
                      for name in LAYERS)
    _footer(figure, f"Data: docs/figures/data/tradeoff.json ({data['script']}); float32, CPU time of the "
            f"process, best of up to 5 calls; one sparsegpt_prune call took {units} in that run. Machine: "
            f"{machine_line(data['machine'])}.")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(out / "tradeoff.png", dpi=110)
    plt.close(figure)


def plot_fidelity(plt: Any, out: Path) -> None:
    records = [json.loads(line) for line in FIDELITY.read_text().splitlines()]
    figure, axis = plt.subplots(figsize=(8, 5))
    for method in METHODS:
        colour, marker = STYLE[method]
        for mode, line in (("sequential", "-"), ("one-shot", ":")):
            points = sorted((r["density"], r["mean_cosine"]) for r in records
                            if r["method"] == method and r["mode"] == mode)
            if points:
                axis.plot(*zip(*points), line, color=colour, marker=marker,
                          label=method if mode == "sequential" else None)
    axis.plot([], [], "k-", label="sequential (default)")
    axis.plot([], [], "k:", label="one-shot")
    axis.set_xlabel("density of the 36 compressed layers")
    axis.set_ylabel("mean cosine, dense vs compressed embeddings")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7, loc="lower right", ncol=2)
    axis.set_title("End-to-end fidelity of all-MiniLM-L6-v2 against density (higher is better)",
                   fontsize=10)
    first = records[0]
    _footer(figure, f"Data: benchmarks/results/model_fidelity.jsonl (python -m benchmarks.model_fidelity): "
            f"{first['calibration_texts']} calibration texts, {first['n_texts']} held-out pydoc "
            f"paragraphs, method defaults (sparse_lowrank 20 alternations); one-shot only at 0.3 and 0.5. "
            f"Machine: "
            f"{first['machine']}, {first['threads']} torch thread per run, shared 2-core CPU.")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(out / "model_fidelity.png", dpi=110)
    plt.close(figure)


def plot_pifa(plt: Any, out: Path) -> None:
    data = _load("pifa_speedup.json")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for d, line in zip(SPEED_SIZES, ("-", "--")):
        records = sorted((r for r in data["records"] if r["d"] == d), key=lambda r: r["density"])
        density = [r["density"] for r in records]
        axes[0].plot(density, [r["pifa_over_dense"] for r in records], line, color=STYLE["pifa"][0],
                     marker="s", label=f"PifaLinear, d = {d}")
        axes[0].plot(density, [r["lowrank_over_dense"] for r in records], line,
                     color=STYLE["weighted_lowrank"][0], marker="^", label=f"LowRankLinear, d = {d}")
        axes[1].plot(density, [r["pifa_over_lowrank_same_rank"] for r in records], line, color="#31a354",
                     marker="s", label=f"same rank (same matrix), d = {d}")
        axes[1].plot(density, [r["pifa_over_lowrank_same_density"] for r in records], line,
                     color="#fd8d3c", marker="o", label=f"same density (same stored values), d = {d}")
    axes[0].set_title("speed-up over nn.Linear (dense)", fontsize=10)
    axes[1].set_title("PifaLinear's speed-up over LowRankLinear", fontsize=10)
    for axis in axes:
        axis.axhline(1.0, color="0.5", linewidth=0.8)
        axis.set_xlabel("density (stored values / dense)")
        axis.set_ylabel("ratio of median forward times")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    axes[0].set_yscale("log")
    figure.suptitle(f"Forward pass of square float32 layers, {SPEED_TOKENS} tokens, random weights "
                    "(higher is faster)", fontsize=11)
    _footer(figure, f"Data: docs/figures/data/pifa_speedup.json ({data['script']}); ratios of medians "
            f"measured in one run, modules timed in turn. Machine: {machine_line(data['machine'])}.")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(out / "pifa_speedup.png", dpi=110)
    plt.close(figure)


def _time(ratio: float) -> str:
    return f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.2g}"


def tables() -> str:
    """The Markdown tables of the "Choosing a method" page, from the data files."""
    errors = _load("layer_errors.json")["records"]
    shown = (0.3, 0.5, 0.7)
    lines = ["| method | " + " | ".join(f"{layer} {d}" for layer in LAYERS for d in shown) + " |",
             "|---|" + "---|" * len(LAYERS) * len(shown)]
    for method in METHODS:
        cells = [next(f"{r['rel_error']:.2g}" for r in errors if r["method"] == method
                      and r["layer"] == layer and r["density"] == d) for layer in LAYERS for d in shown]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    trade = _load("tradeoff.json")["records"]
    default = {"dsf": {"outer_iters": 40}, "sparse_lowrank": {"iters": 80}, "oats": {"iters": 80}}
    rows = [(m, default.get(m, {})) for m in METHODS if m != "sparse_lowrank"]
    rows[rows.index(("dsf", default["dsf"])):rows.index(("dsf", default["dsf"])) + 1] = [
        ("dsf", {"outer_iters": 10}), ("dsf", default["dsf"])]
    rows += [("sparse_lowrank", {"iters": 20}), ("sparse_lowrank", default["sparse_lowrank"]),
             ("oats", default["oats"])]
    lines += ["", "| method at density 0.5 | " + " | ".join(f"{layer}: time, error" for layer in LAYERS)
              + " |", "|---|" + "---|" * len(LAYERS)]
    for method, arguments in rows:
        cells = [next(f"{_time(r['relative_time'])}, {r['rel_error']:.2g}" for r in trade
                      if r["method"] == method and r["arguments"] == arguments and r["layer"] == layer)
                 for layer in LAYERS]
        label = method + "".join(f" ({value} {key})" for key, value in arguments.items())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    speed = _load("pifa_speedup.json")["records"]
    header = ("| d, density | PIFA / dense | low rank / dense | PIFA / low rank, same values "
              "| PIFA / low rank, same rank |")
    lines += ["", header, "|---|---|---|---|---|"]
    for record in speed:
        if record["density"] in shown:
            lines.append(f"| {record['d']}, {record['density']} | {record['pifa_over_dense']:.2f} | "
                         f"{record['lowrank_over_dense']:.2f} | {record['pifa_over_lowrank_same_density']:.2f} "
                         f"| {record['pifa_over_lowrank_same_rank']:.2f} |")
    fidelity = [json.loads(line) for line in FIDELITY.read_text().splitlines()]
    sequential = sorted({r["density"] for r in fidelity if r["mode"] == "sequential"})
    lines += ["", "| method | " + " | ".join(f"{d} sequential" for d in sequential) + " |",
              "|---|" + "---|" * len(sequential)]
    for method in METHODS:
        cells = [next((f"{r['mean_cosine']:.4f} ({r['neighbour_agreement']:.0%})" for r in fidelity
                       if r["method"] == method and r["density"] == d and r["mode"] == "sequential"), "–")
                 for d in sequential]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(out: Path = HERE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "svg.hashsalt": "matfactor"})
    plot_errors(plt, out)
    plot_tradeoff(plt, out)
    plot_fidelity(plt, out)
    plot_pifa(plt, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs="+", choices=list(MEASUREMENTS), default=list(MEASUREMENTS),
                        help="data sets to measure (default: all)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figures from the data files")
    parser.add_argument("--out", type=Path, default=HERE, help="folder of the figures (default: docs/figures)")
    parser.add_argument("--tables", action="store_true", help="print the tables of the data files and exit")
    args = parser.parse_args()
    if args.tables:
        print(tables())
        return
    if not args.plot_only:
        for name in args.measure:
            measure(name)
    plot(args.out)


if __name__ == "__main__":
    main()
