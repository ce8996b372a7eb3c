"""Packaging rules of DESIGN.md: the core imports no framework, adapters live under matfactor."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import distribution

import numpy as np

from matfactor.__main__ import main


def test_core_imports_no_framework():
    code = ("import sys, matfactor, matfactor.testing, matfactor.adapters; "
            "print(sorted(m for m in ('torch', 'cupy', 'adapters') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_adapters_are_packaged_as_matfactor_adapters_only():
    import matfactor.adapters

    assert matfactor.adapters.__name__ == "matfactor.adapters"
    top_level = distribution("matfactor").read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["matfactor"]


def test_main_job_prunes_within_budget(capsys):
    main(["--d-in", "64", "--d-out", "96", "--density", "0.5"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["unstructured"], ["per_output"],
                                                                    ["2:4"])]
    budgets = [int(line.split()[-1]) for line in lines if line.split()[:1] == ["budget"]]
    assert len(rows) == 12 and budgets == [64 * 96 // 2] * 3
    for pattern, pruner, error, nnz, seconds in rows:
        assert pruner in ("magnitude", "wanda", "sparsegpt", "admm")
        assert 0 < float(error) < 1 and np.isfinite(float(seconds))
        assert int(nnz) <= budgets[0]


def test_no_public_name_shadows_a_submodule():
    """``import matfactor.pifa`` must give the module, not a function of the same name."""
    import importlib
    import pkgutil
    import types

    import matfactor

    for info in pkgutil.iter_modules(matfactor.__path__):
        module = importlib.import_module(f"matfactor.{info.name}")
        assert isinstance(getattr(matfactor, info.name), types.ModuleType), info.name
        assert getattr(matfactor, info.name) is module
