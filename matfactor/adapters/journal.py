"""Resumable runs: every finished layer on disk as it completes, and refusal to mix runs.

A :class:`RunJournal` keeps, in a directory (the ``matfactor`` command uses its ``--out``)::

    run.json                       what the run is: model, calibration, recipe and options
    layers/<layer name>.safetensors   one finished layer: its compressed module's tensors
    layers/<layer name>.json          its manifest entry, the file's sha256 and its report
    blocks/<block name>.safetensors   a refined block: the refined modules of its layers
    blocks/<block name>.json          their manifest entries, the file's sha256, the reports

:func:`~matfactor.adapters.compress_model` records each layer the moment its solve returns, and
a layer counts as finished only once its entry exists; with block refinement, each block's
refined layers are recorded together once it is refined, and a resumed run takes those (and
does not refine the block again). Every file is written to a temporary name,
flushed to disk and renamed over the final name (``os.replace`` is atomic), the entry after the
tensors it vouches for. So a run killed at any point (``kill -9``, a lost machine, a lost worker)
leaves finished layers, each complete and verified by its sha256, and nothing else that counts.
Run again with the same model, calibration, recipe and options, it takes those layers instead of
solving them again, and does everything else as the first run did; the model it ends with, and so
the checkpoint, is identical to the one of an uninterrupted run (same software and hardware).

``run.json`` identifies the run by the sha256 of the model's state dict and of the calibration
batches, the recipe, the options that change the numbers (mode, granularity, ``mix``, Gram dtype,
seed, threads per solve, solve device type) and the matfactor and torch versions. A directory
holding another run is refused with a message that says what differs, unless ``restart=True``,
which discards its layers first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import matfactor

from ._storage import CheckpointError, module_from_files, packed_module, sha256, write_atomically
from .modules import CompressedModule

__all__ = ["RUN_NAME", "RunJournal", "RunMismatchError", "discard_run", "finished_layers",
           "run_identity"]

RUN_NAME = "run.json"
_LAYERS = "layers"
_BLOCKS = "blocks"
_JOURNAL_FORMAT = "matfactor-run"


class RunMismatchError(ValueError):
    """A run directory that holds the finished layers of another run (another model,
    calibration, recipe or options): resuming would mix two runs."""


def _hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")


def _hash_value(digest: Any, value: Any) -> None:
    """Feed a nested structure of tensors, containers and scalars to ``digest``."""
    if isinstance(value, torch.Tensor):
        _hash_tensor(digest, value)
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            _hash_value(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _hash_value(digest, item)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())


def run_identity(model: nn.Module, batches: list[Any], recipe: dict[str, Any],
                 options: dict[str, Any]) -> dict[str, Any]:
    """What a run is, as :class:`RunJournal` compares it: JSON-able, one key per thing that can
    differ.

    Parameters
    ----------
    model
        The dense model before compression (its class and state dict are hashed).
    batches
        The calibration batches (their tensors are hashed).
    recipe
        ``Recipe.to_dict()``.
    options
        The options of :func:`~matfactor.adapters.compress_model` that change the numbers.
    """
    weights = hashlib.sha256(type(model).__name__.encode())
    for key, tensor in model.state_dict().items():
        weights.update(key.encode())
        _hash_tensor(weights, tensor)
    calibration = hashlib.sha256()
    _hash_value(calibration, batches)
    return {"model": weights.hexdigest(), "calibration": calibration.hexdigest(), "recipe": recipe,
            "options": options, "versions": {"matfactor": matfactor.__version__,
                                             "torch": torch.__version__}}


def _describe_difference(key: str, before: Any, now: Any) -> str:
    if key in ("model", "calibration") and isinstance(before, str):
        return f"the {key} differs (sha256 {before[:12]}... then, {now[:12]}... now)"
    verb = "differ" if key.endswith("s") else "differs"
    return f"the {key} {verb}: {json.dumps(before)} then, {json.dumps(now)} now"


class RunJournal:
    """The finished layers of one compression run, in ``directory`` (see the module docstring).

    Parameters
    ----------
    directory
        The run's directory (created if needed).
    identity
        :func:`run_identity` of this run.
    restart
        Discard the finished layers of whatever run the directory holds, instead of refusing a
        different run.

    Raises
    ------
    RunMismatchError
        The directory holds another run (and ``restart`` is false); the message says what
        differs.
    CheckpointError
        Its ``run.json`` is unreadable.
    """

    def __init__(self, directory: str | os.PathLike[str], identity: dict[str, Any], *,
                 restart: bool = False) -> None:
        self.directory = Path(directory)
        self.layers = self.directory / _LAYERS
        self.blocks = self.directory / _BLOCKS
        record = {"format": _JOURNAL_FORMAT, **identity}
        run_path = self.directory / RUN_NAME
        if run_path.is_file() and not restart:
            try:
                before = json.loads(run_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise CheckpointError(f"{run_path} is not a readable run record ({error}); "
                                      "restart the run to discard it") from error
            differences = [_describe_difference(key, before.get(key), value)
                           for key, value in record.items() if before.get(key) != value]
            if differences:
                raise RunMismatchError(
                    f"{self.directory} holds the finished layers of another run: "
                    + "; ".join(differences) + ". Resuming would mix the two: restart it (discards "
                    "its layers; the command's --restart) or use another directory")
        elif restart or not run_path.is_file():
            shutil.rmtree(self.layers, ignore_errors=True)
            shutil.rmtree(self.blocks, ignore_errors=True)
        for folder in (self.layers, self.blocks):
            folder.mkdir(parents=True, exist_ok=True)
            for leftover in folder.glob(".*.tmp"):  # a write a killed run did not finish
                leftover.unlink(missing_ok=True)
        text = json.dumps(record, indent=1, sort_keys=True)
        write_atomically(run_path, lambda target: target.write_text(text, encoding="utf-8"))

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.layers / f"{name}.safetensors", self.layers / f"{name}.json"

    def _read(self, tensors_path: Path, entry_path: Path, what: str) -> tuple[dict[str, Any],
                                                                              dict[str, torch.Tensor]]:
        """A record and its tensors, checked against the record's sha256."""
        try:
            record = json.loads(entry_path.read_text(encoding="utf-8"))
            if not tensors_path.is_file() or sha256(tensors_path) != record["sha256"]:
                raise CheckpointError(f"{tensors_path} is missing or damaged (its sha256 differs "
                                      f"from {entry_path.name}'s)")
            files = load_file(str(tensors_path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                SafetensorError) as error:
            raise CheckpointError(f"{what} in {entry_path.parent} is unreadable "
                                  f"({type(error).__name__}: {error}); restart the run") from error
        except CheckpointError as error:
            raise CheckpointError(f"{what}: {error}; restart the run") from error
        return record, files

    def _write(self, tensors_path: Path, entry_path: Path, files: dict[str, torch.Tensor],
               record: dict[str, Any]) -> None:
        """The tensors, then the record that vouches for them (with their sha256)."""
        write_atomically(tensors_path, lambda target: save_file(files, str(target)))
        text = json.dumps({**record, "sha256": sha256(tensors_path)}, indent=1, allow_nan=False)
        write_atomically(entry_path, lambda target: target.write_text(text, encoding="utf-8"))

    def finished(self, name: str) -> tuple[CompressedModule, dict[str, Any]] | None:
        """Layer ``name``'s compressed module and its report if it is finished, else ``None``.

        Raises
        ------
        CheckpointError
            Its entry exists but its tensors are missing or damaged (not a crash, which
            cannot do that: the files were changed since).
        """
        tensors_path, entry_path = self._paths(name)
        if not entry_path.is_file():
            return None
        record, files = self._read(tensors_path, entry_path, f"finished layer {name!r}")
        return module_from_files(name, record["entry"], files), record["report"]

    def refined_block(self, block: str) -> tuple[dict[str, CompressedModule], dict[str, Any]] | None:
        """Block ``block``'s refined layers (by name) and its refinement report, if the block
        was refined, else ``None``.

        Raises
        ------
        CheckpointError
            Its record exists but its tensors are missing or damaged.
        """
        tensors_path, entry_path = self.blocks / f"{block}.safetensors", self.blocks / f"{block}.json"
        if not entry_path.is_file():
            return None
        record, files = self._read(tensors_path, entry_path, f"refined block {block!r}")
        try:
            modules = {name: module_from_files(name, entry, {key: tensor for key, tensor in files.items()
                                                             if key.startswith(f"{name}.")})
                       for name, entry in record["entries"].items()}
            return modules, record["refinement"]
        except (KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"refined block {block!r}: malformed record ({error}); restart "
                                  "the run") from error

    def record_block(self, block: str, modules: dict[str, CompressedModule],
                     refinement: dict[str, Any]) -> dict[str, CompressedModule]:
        """Write block ``block``'s refined layers ``modules`` and its refinement report (one
        tensors file, then the record) and return the modules rebuilt from what was written."""
        entries, files, rebuilt = {}, {}, {}
        for name, module in modules.items():
            entries[name], module_files, rebuilt[name] = packed_module(name, module)
            files.update(module_files)
        self._write(self.blocks / f"{block}.safetensors", self.blocks / f"{block}.json", files,
                    {"entries": entries, "refinement": refinement})
        return rebuilt

    def finished_count(self, names: list[str]) -> int:
        """How many of the layers ``names`` are finished (have their entry)."""
        return sum(self._paths(name)[1].is_file() for name in names)

    def discard_if_empty(self) -> None:
        """Remove the journal (and its directory, if nothing else is in it) when no layer is
        finished: a run that failed before its first layer leaves nothing behind."""
        if finished_layers(self.directory):
            return
        discard_run(self.directory)
        with contextlib.suppress(OSError):  # not empty: the user's files are kept
            self.directory.rmdir()

    def record(self, name: str, module: CompressedModule, report: dict[str, Any]) -> CompressedModule:
        """Write the finished layer ``name`` (tensors, then its entry) and return the module
        rebuilt from what was written (what a resumed run will load)."""
        entry, files, rebuilt = packed_module(name, module)
        self._write(*self._paths(name), files, {"entry": entry, "report": report})
        return rebuilt


def finished_layers(directory: str | os.PathLike[str]) -> int:
    """How many finished layers the run journal in ``directory`` holds (0 if none)."""
    return sum(1 for _ in (Path(directory) / _LAYERS).glob("*.json"))


def discard_run(directory: str | os.PathLike[str]) -> None:
    """Remove the journal of the run in ``directory`` (``run.json`` and the finished layers),
    once its checkpoint is saved; nothing else there is touched."""
    directory = Path(directory)
    shutil.rmtree(directory / _LAYERS, ignore_errors=True)
    shutil.rmtree(directory / _BLOCKS, ignore_errors=True)
    (directory / RUN_NAME).unlink(missing_ok=True)
