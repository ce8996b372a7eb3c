"""Run the ``matfactor`` command and SIGKILL it at a chosen point (for tests/test_resume.py).

Usage: ``python tests/kill_harness.py POINT COUNT -- <matfactor arguments>``, where POINT is

- ``after-layers``: right after the COUNT-th finished layer is recorded;
- ``layer-write``: in the middle of writing the COUNT-th layer's tensors (half a temporary file
  on disk, nothing renamed);
- ``checkpoint-write``: in the middle of writing the final checkpoint's weights file.

The process kills itself with SIGKILL, as ``kill -9`` would: no exception handler, ``finally``
clause or exit hook runs.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import matfactor.adapters.checkpoint as checkpoint
import matfactor.adapters.journal as journal
from safetensors.torch import save_file

from matfactor.adapters.command import main


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _half_written(path: str, files: dict, **options) -> None:
    save_file(files, path, **options)
    size = Path(path).stat().st_size
    with open(path, "r+b") as file:
        file.truncate(size // 2)
        file.flush()
        os.fsync(file.fileno())
    _die()


def install(point: str, count: int) -> None:
    calls = {"records": 0, "writes": 0}
    if point == "after-layers":
        record = journal.RunJournal.record

        def record_then_die(self, *args, **kwargs):
            module = record(self, *args, **kwargs)
            calls["records"] += 1
            if calls["records"] == count:
                _die()
            return module

        journal.RunJournal.record = record_then_die
    elif point == "layer-write":
        def save_layer(files, path, **options):
            calls["writes"] += 1
            if calls["writes"] == count:
                _half_written(path, files, **options)
            save_file(files, path, **options)

        journal.save_file = save_layer
    elif point == "checkpoint-write":
        checkpoint.save_file = lambda files, path, **options: _half_written(path, files, **options)
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    point, count, separator, *arguments = sys.argv[1:]
    assert separator == "--"
    install(point, int(count))
    main(arguments)
