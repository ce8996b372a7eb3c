"""The measured tables of README and the pages equal what their commands render from the
committed data, so the pages and the data cannot drift apart. Nothing is measured: the committed
records are read and rendered, by ``python -m benchmarks.guide_tables --print`` (the guide's
tables), ``python docs/figures/make_figures.py --tables`` (Choosing a method) and
``python -m benchmarks.model_fidelity --table`` (end-to-end fidelity)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


guide_tables = _module("_guide_tables", "benchmarks/guide_tables.py")


def _words(text: str) -> str:
    """The text with every run of whitespace made one space: pages wrap sentences anywhere."""
    return " ".join(text.split())


@pytest.mark.parametrize("name", sorted(guide_tables.RENDER))
def test_page_shows_what_the_committed_records_render(name):
    page = _words((ROOT / guide_tables.PAGES[name]).read_text(encoding="utf-8"))
    snippets = guide_tables.render(name)
    assert snippets
    for snippet in snippets:
        assert _words(snippet) in page, (
            f"{guide_tables.PAGES[name]} does not show what `python -m benchmarks.guide_tables "
            f"--print {name}` renders from the committed records:\n{snippet}")


def test_every_record_says_where_and_how_it_was_measured():
    records = guide_tables.load()
    assert {record["table"] for record in records} == set(guide_tables.MEASURES)
    keys = [(record["table"], json.dumps(record["key"], sort_keys=True)) for record in records]
    assert len(keys) == len(set(keys)), "a table's key is recorded twice"
    for record in records:
        assert record["command"].startswith("python -m benchmarks.guide_tables")
        assert {"cpu", "cores", "threads", "python", "numpy", "torch"} <= set(record["machine"])
        assert record["machine"]["threads"] == 1


def test_print_renders_every_table(capsys):
    guide_tables.main(["--print"])
    out = capsys.readouterr().out
    for name in guide_tables.RENDER:
        assert f"## {name} ({guide_tables.PAGES[name]})" in out


def test_choosing_shows_the_tables_of_the_figure_data():
    make_figures = _module("_make_figures", "docs/figures/make_figures.py")
    page = _words((ROOT / "docs" / "choosing.md").read_text(encoding="utf-8"))
    for table in make_figures.tables().split("\n\n"):
        assert _words(table) in page, f"docs/choosing.md lacks, from make_figures.py --tables:\n{table}"


@pytest.mark.parametrize("page", ["README.md", "docs/choosing.md", "docs/guide/models.md"])
def test_fidelity_table_is_the_committed_one(page):
    model_fidelity = _module("_model_fidelity", "benchmarks/model_fidelity.py")
    table = model_fidelity.table(ROOT / "benchmarks" / "results" / "model_fidelity.jsonl")
    assert _words(table) in _words((ROOT / page).read_text(encoding="utf-8")), (
        f"{page} lacks the table of python -m benchmarks.model_fidelity --table")


def test_scaling_table_is_the_committed_one():
    scaling = _module("_scaling", "benchmarks/scaling.py")
    table, identical = scaling.table(ROOT / "benchmarks" / "results" / "scaling.jsonl").split("\n\n")
    assert _words(table) in _words((ROOT / "docs" / "guide" / "scale_out.md").read_text(encoding="utf-8")), (
        "docs/guide/scale_out.md lacks the table of python -m benchmarks.scaling --table")
    assert "NO" not in identical, identical


def test_main_job_figures_are_the_committed_ones():
    """The guide's main-job paragraph quotes the latest runs of ``bench_model --main-job``, the
    default and ``--options --workers 1 --threads 2``."""
    records = [json.loads(line) for line in
               (ROOT / "benchmarks" / "results" / "bench_model.jsonl").read_text().splitlines()]
    runs = [record for record in records if record["benchmark"] == "main_job" and "options" in record]
    page = _words((ROOT / "docs" / "guide" / "models.md").read_text(encoding="utf-8"))
    for options in ([], ["--workers", "1", "--threads", "2"]):
        run = [record for record in runs if record["options"] == options][-1]
        assert f"{run['seconds']:.1f} s" in page and f"solves {run['solve_s']:.1f} s" in page.replace(
            "DSF solves", "solves"), (options, run["seconds"])
