"""Packaging rules of DESIGN.md: the core imports no framework, adapters live under matfactor."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path


def _imported_after(statement: str, candidates: tuple[str, ...]) -> list[str]:
    """Which of the ``candidates`` modules a fresh interpreter has imported after ``statement``."""
    code = f"import sys; {statement}; print(sorted(m for m in {candidates!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return ast.literal_eval(result.stdout)


def test_core_imports_no_framework():
    """The core and its test problems import neither torch, cupy, the model side nor a top-level
    ``adapters``."""
    assert _imported_after("import matfactor, matfactor.testing",
                           ("torch", "cupy", "adapters", "transformers", "matfactor.adapters")) == []


def test_adapters_import_no_top_level_adapters_nor_a_scheduler_nor_the_command():
    """Dask and Ray are imported only when an executor of theirs is asked for; the command sits
    on top of the adapters, which never import it."""
    assert _imported_after("import matfactor.adapters, matfactor.adapters.executors",
                           ("adapters", "matfactor.adapters", "dask", "distributed", "ray",
                            "matfactor.adapters.command")) == ["matfactor.adapters"]


def test_adapters_are_packaged_as_matfactor_adapters_only():
    import matfactor.adapters

    assert matfactor.adapters.__name__ == "matfactor.adapters"
    top_level = distribution("matfactor").read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["matfactor"]


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


def test_one_version():
    """The installed metadata's version is ``matfactor.__version__`` (which ``matfactor --version``
    prints: tests/test_cli.py)."""
    import matfactor

    assert distribution("matfactor").version == matfactor.__version__


def test_license_and_typing_metadata():
    """An SPDX license expression with its text installed, and py.typed where the metadata says
    the package is typed (PEP 561, PEP 639)."""
    import matfactor

    installed = distribution("matfactor")
    assert installed.metadata["License-Expression"] == "Apache-2.0"
    assert "License ::" not in " ".join(installed.metadata.get_all("Classifier"))  # PEP 639
    license_files = [file for file in installed.files if file.name == "LICENSE"]
    assert license_files and "Apache License" in license_files[0].read_text()
    assert "Typing :: Typed" in installed.metadata.get_all("Classifier")
    assert (Path(matfactor.__file__).parent / "py.typed").is_file()


def test_the_adapters_public_api_is_what_the_package_exports():
    """Every public name of a public module of the model side is exported by matfactor.adapters
    (the command, which sits on top, apart)."""
    import importlib
    import pkgutil

    import matfactor.adapters

    exported = set(matfactor.adapters.__all__)
    for info in pkgutil.iter_modules(matfactor.adapters.__path__):
        if info.name.startswith("_") or info.name == "command":
            continue
        module = importlib.import_module(f"matfactor.adapters.{info.name}")
        missing = set(getattr(module, "__all__", ())) - exported
        assert not missing, f"matfactor.adapters.{info.name} claims {sorted(missing)} public"
        for name in module.__all__:
            assert getattr(matfactor.adapters, name) is getattr(module, name)
