"""The compression runs of the resume and fault tests: the command's arguments and what a run
leaves in its directory."""

from __future__ import annotations

from pathlib import Path


def compress_arguments(model, calibration, out, *extra):
    """A DSF run of the command without evaluation; ``extra`` replaces ``--workers 1`` (solving
    in the command's process)."""
    return ["compress", "--model", str(model), "--calibration", str(calibration), "--method", "dsf",
            "--density", "0.5", "--no-evaluate", "--quiet", "--out", str(out),
            *(extra or ("--workers", "1"))]


def files(directory):
    """``{relative path: bytes}`` of every file under ``directory``."""
    return {str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(Path(directory).rglob("*")) if path.is_file()}


def finished_layers(out):
    """The names of the layers the run journal in ``out`` has finished."""
    return sorted(path.stem for path in (Path(out) / "layers").glob("*.json"))


def reference_run(root):
    """A 3-block BERT (18 linear layers), calibration texts, and the directory of an uninterrupted
    run of :func:`compress_arguments` on them, under ``root``: ``(model, calibration, reference)``."""
    from text_models import save_tiny_bert, write_texts

    from matfactor.adapters.command import main

    model = save_tiny_bert(root / "model", hidden_size=48, blocks=3)
    calibration = write_texts(root / "calibration.txt", 24, seed=1)
    reference = root / "reference"
    main(compress_arguments(model, calibration, reference))
    return model, calibration, reference
