"""Resumable runs: the command killed with SIGKILL at any point, run again, ends with the files of
an uninterrupted run; another run's layers are never mixed in."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from matfactor.adapters.command import main

transformers = pytest.importorskip("transformers")

from matfactor.adapters import CheckpointError, Recipe, compress_model  # noqa: E402
from matfactor.adapters.executors import process_pool  # noqa: E402
from matfactor.adapters.journal import RunMismatchError  # noqa: E402
from runs import compress_arguments as command  # noqa: E402
from runs import files, finished_layers, reference_run  # noqa: E402
from text_models import random_bert, random_token_batches, save_tiny_bert  # noqa: E402

HARNESS = Path(__file__).with_name("kill_harness.py")
N_LAYERS = 18  # 3 blocks of 6 linear layers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-block BERT, calibration texts, and the output of an uninterrupted run."""
    return reference_run(tmp_path_factory.mktemp("resume"))


def killed_run(point, count, arguments):
    result = subprocess.run([sys.executable, str(HARNESS), point, str(count), "--", *arguments],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


@pytest.mark.parametrize("point, count", [("after-layers", 5), ("layer-write", 8),
                                          ("checkpoint-write", 1)])
def test_killed_run_resumes_to_identical_files(setup, tmp_path, point, count):
    model, calibration, reference = setup
    out = tmp_path / "out"
    killed_run(point, count, command(model, calibration, out))
    done = finished_layers(out)
    leftovers = [path.name for path in out.rglob(".*.tmp")]
    if point == "after-layers":
        assert len(done) == count and not leftovers
    elif point == "layer-write":  # the half-written layer does not count
        assert len(done) == count - 1 and len(leftovers) == 1
    else:  # every layer recorded, the checkpoint's weights half written, no manifest
        assert len(done) == N_LAYERS and len(leftovers) == 1
        assert not (out / "matfactor.json").exists()
    # resumed with two workers: the numbers do not depend on them
    main(command(model, calibration, out, "--workers", "2"))
    assert files(out) == files(reference)


def test_external_sigkill_mid_run(setup, tmp_path):
    model, calibration, reference = setup
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "matfactor", *command(model, calibration, out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(finished_layers(out)) < 2:  # kill it once two layers are finished
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert 2 <= len(finished_layers(out)) < N_LAYERS
    main(command(model, calibration, out))
    assert files(out) == files(reference)


def test_changed_recipe_or_model_is_refused_unless_restarted(setup, tmp_path, capsys):
    model, calibration, _ = setup
    out = tmp_path / "out"
    killed_run("after-layers", 3, command(model, calibration, out))
    changed = [arguments if arguments != "0.5" else "0.4" for arguments in command(model, calibration, out)]
    with pytest.raises(SystemExit) as exit_info:
        main(changed)
    assert exit_info.value.code == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "holds the finished layers of another run" in message and "the recipe differs" in message
    assert '"density": 0.5' in message and '"density": 0.4' in message
    assert len(finished_layers(out)) == 3  # nothing was touched

    other_model = save_tiny_bert(tmp_path / "other", hidden_size=48, blocks=3, seed=1)
    with pytest.raises(SystemExit):
        main(command(other_model, calibration, out))
    assert "the model differs" in capsys.readouterr().err

    main([*changed, "--restart"])
    assert not (out / "layers").exists()
    manifest = (out / "matfactor.json").read_text()
    assert '"density": 0.4' in manifest and '"density": 0.5' not in manifest


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


class DyingPool(ProcessPoolExecutor):
    """A process pool whose worker dies (SIGKILL) on the solve of one layer."""

    def __init__(self, victim):
        super().__init__(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
        self.victim = victim

    def submit(self, fn, /, *args, **kwargs):
        if args and getattr(args[0], "name", None) == self.victim:
            return super().submit(_die)
        return super().submit(fn, *args, **kwargs)


def resumable(directory, recipe, model=None, **options):
    """``compress_model`` of a random BERT recording its layers in ``directory``; the model."""
    model = random_bert() if model is None else model
    compress_model(model, options.pop("batches", random_token_batches()), recipe,
                   resume_dir=directory, progress=False, **options)
    return model


def test_lost_worker_then_resume(tmp_path):
    recipe = Recipe.single("sparsegpt", density=0.5)
    reference = random_bert()
    compress_model(reference, random_token_batches(), recipe, progress=False)
    victim = "encoder.layer.1.attention.output.dense"
    with DyingPool(victim) as pool, pytest.raises(RuntimeError, match="a worker died while solving") as lost:
        resumable(tmp_path, recipe, executor=pool)
    assert victim in str(lost.value) and "run again to resume" in str(lost.value)
    assert "encoder.layer.0.output.dense" in finished_layers(tmp_path)
    with process_pool(2) as pool:
        model = resumable(tmp_path, recipe, executor=pool)
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def test_damaged_layer_file_is_reported(tmp_path):
    recipe = Recipe.single("wanda", density=0.5)
    resumable(tmp_path, recipe)
    layer = tmp_path / "layers" / "encoder.layer.0.intermediate.dense.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="intermediate.dense.*damaged.*restart the run"):
        resumable(tmp_path, recipe)
    resumable(tmp_path, recipe, restart=True)


def test_library_refuses_other_options(tmp_path):
    recipe = Recipe.single("magnitude", density=0.5)
    resumable(tmp_path, recipe)
    with pytest.raises(RunMismatchError, match=r"the options differ.*\"seed\": 0.*\"seed\": 1"):
        resumable(tmp_path, recipe, seed=1)
    with pytest.raises(RunMismatchError, match="the calibration differs"):
        resumable(tmp_path, recipe, batches=random_token_batches()[:2])
