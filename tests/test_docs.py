"""The documentation site: built with warnings as errors, its examples run, its figures redrawn.

Builds ``docs/`` (a copy, so the source tree is not written to) with Sphinx's ``html`` builder and
``-W``, then with the ``doctest`` builder, which runs every ``{testcode}`` example of the pages and
compares what it prints with the ``{testoutput}`` block shown under it. Skipped, with the reason,
only when Sphinx is not installed; the other documentation dependencies (the ``docs`` extra, part
of ``test``: numpydoc, myst-parser, furo, matplotlib) are then required, and a missing one fails
the build with its name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("sphinx") is None,
                                reason="Sphinx is not installed (pip install -e '.[hf,docs]')")


def _environment() -> dict[str, str]:
    threads = os.environ.get("MATFACTOR_TEST_THREADS", "1")
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads, "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A copy of ``docs/`` and a shared doctree directory for both builds."""
    root = tmp_path_factory.mktemp("docs")
    source = root / "source"
    shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns("_build", "generated", "__pycache__"))
    return {"source": source, "doctrees": root / "doctrees", "root": root}


def _sphinx(site: dict[str, Path], builder: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = site["root"] / builder
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", builder, "-d",
         str(site["doctrees"]), str(site["source"]), str(out)],
        check=False, capture_output=True, text=True, env=_environment(), timeout=600)
    assert result.returncode == 0, (f"sphinx -b {builder} failed:\n{result.stdout[-6000:]}\n"
                                    f"{result.stderr[-6000:]}")
    return result, out


def _public_modules() -> list[str]:
    """``matfactor``, ``matfactor.adapters`` and every public module inside them."""
    names = []
    for package in ("matfactor", "matfactor.adapters"):
        names.append(package)
        module = importlib.import_module(package)
        names += [f"{package}.{info.name}" for info in pkgutil.iter_modules(module.__path__)
                  if not info.name.startswith("_")]
    return names


def test_html_builds_without_warnings_and_documents_every_public_name(site):
    _, out = _sphinx(site, "html")
    generated = out / "generated"
    for module_name in _public_modules():
        assert (generated / f"{module_name}.html").is_file(), f"no API page for {module_name}"
        module = importlib.import_module(module_name)
        page = (generated / f"{module_name}.html").read_text()
        for name in getattr(module, "__all__", []):
            # Each public name is either documented on its own page or linked to where it is.
            assert re.search(rf'href="[^"]*\b{re.escape(name)}\.html', page) or \
                (generated / f"{module_name}.{name}.html").is_file(), \
                f"{module_name}.{name} is not in the API reference"
    for page in ("index", "choosing", "guide/conventions", "guide/models"):
        assert (out / f"{page}.html").is_file()
    shown = {path.name for path in (out / "_images").iterdir()}
    for figure in ("layer_errors.png", "tradeoff.png", "model_fidelity.png", "pifa_speedup.png"):
        assert figure in shown, f"{figure} is not shown on any page"


def test_examples_print_what_the_pages_say(site):
    _, out = _sphinx(site, "doctest")
    report = (out / "output.txt").read_text()
    blocks = sum(path.read_text().count("```{testcode}") for path in site["source"].rglob("*.md"))
    ran = re.search(r"^\s*(\d+) tests\n\s*(\d+) failures in tests", report, re.MULTILINE)
    assert ran is not None, report[-3000:]
    assert int(ran.group(2)) == 0, report[-3000:]
    assert int(ran.group(1)) == blocks >= 20, f"{ran.group(1)} examples ran of {blocks} on the pages"


def test_figures_redraw_from_the_committed_data(tmp_path):
    result = subprocess.run([sys.executable, str(DOCS / "figures" / "make_figures.py"), "--plot-only",
                             "--out", str(tmp_path)], check=False, capture_output=True, text=True,
                            env=_environment(), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for figure in ("layer_errors.png", "tradeoff.png", "model_fidelity.png", "pifa_speedup.png"):
        assert (tmp_path / figure).stat().st_size > 10_000, figure
