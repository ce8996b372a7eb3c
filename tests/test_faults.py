"""The command when things go wrong: killed, interrupted, a worker lost, the disk full.

Each test runs ``matfactor compress`` as a user would (a separate process, a local pool of two
worker processes), makes it fail, and checks what a user sees: one clear line, no process of the
run left behind, a journal whose every finished layer verifies, and a rerun of the same command
that says it resumes and ends with the files of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

psutil = pytest.importorskip("psutil")
transformers = pytest.importorskip("transformers")

from runs import compress_arguments, files, reference_run

N_LAYERS = 18  # 3 blocks of 6 linear layers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-block BERT, calibration texts, and the output of an uninterrupted run."""
    return reference_run(tmp_path_factory.mktemp("faults"))


def arguments(model, calibration, out, *extra):
    """The run of :func:`runs.compress_arguments` on a local pool of two workers (unless ``extra``
    says otherwise)."""
    return compress_arguments(model, calibration, out, *(extra or ("--workers", "2")))


def finished(out):
    return sorted((Path(out) / "layers").glob("*.json"))


def assert_journal_consistent(out):
    """Every finished layer's tensors are there and match their entry's sha256; no temporary file."""
    for entry_path in finished(out):
        entry = json.loads(entry_path.read_text())
        tensors = entry_path.with_suffix(".safetensors")
        assert hashlib.sha256(tensors.read_bytes()).hexdigest() == entry["sha256"], entry_path.name
    assert not list(Path(out).rglob(".*.tmp"))


@pytest.fixture
def temporary():
    """An empty directory for the command's temporary files (short: Ray's socket paths must fit
    in 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="mf-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def start(command_arguments, temporary):
    """The command in its own process group (as a shell starts a foreground job), its temporary
    files in ``temporary``."""
    return subprocess.Popen([sys.executable, "-m", "matfactor", *command_arguments],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "TMPDIR": str(temporary)})


def wait_until(condition, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def workers_of(process):
    """The pool's worker processes (and multiprocessing's resource tracker) of ``process``."""
    return psutil.Process(process.pid).children(recursive=True)


def assert_no_survivor(processes):
    """Every process of the run has ended (a worker notices its parent is gone within a moment)."""
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, [(p.pid, p.cmdline()) for p in alive if p.is_running()]


def assert_no_socket_directory(temporary):
    """No ``pymp-*`` directory is left: a tensor sent between processes by file descriptor leaves
    one behind when a process ends abruptly (Dask's scratch space and Ray's session logs are
    theirs to keep; Dask purges stale scratch directories when it next starts)."""
    assert not list(temporary.glob("pymp-*"))


def rerun_resumes(setup, out, done):
    """The same command, run again: it says it resumes, and ends with the reference's files."""
    model, calibration, reference = setup
    result = subprocess.run([sys.executable, "-m", "matfactor",
                             *[a for a in arguments(model, calibration, out) if a != "--quiet"]],
                            check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    if done:
        assert f"resuming: {done} of {N_LAYERS} layers done in {out}" in result.stdout
        assert f"{done} of these layers were finished by an earlier, interrupted run" in result.stdout
    assert files(out) == files(reference)


def engine(name):
    """The command's flags for a local pool of two workers of executor ``name``."""
    if name != "process":
        pytest.importorskip({"dask": "distributed"}.get(name, name))
    return ("--workers", "2", "--executor", name)


# Ray is left out: after a kill -9 of its driver, a local Ray instance's dashboard and
# runtime-env agents took between 30 and 120 s to end by themselves (measured with Ray 2.60).
@pytest.mark.parametrize("executor", ["process", "dask"])
def test_kill_9_leaves_no_process_and_resumes(setup, tmp_path, temporary, executor):
    model, calibration, _ = setup
    out = tmp_path / "out"
    process = start(arguments(model, calibration, out, *engine(executor)), temporary)
    wait_until(lambda: len(finished(out)) >= 2 and len(workers_of(process)) >= 2, process)
    processes = workers_of(process)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert_no_survivor(processes)
    assert_no_socket_directory(temporary)
    assert_journal_consistent(out)
    rerun_resumes(setup, out, len(finished(out)))


@pytest.mark.parametrize("signal_number, executor", [(signal.SIGINT, "process"), (signal.SIGTERM, "process"),
                                                     (signal.SIGINT, "dask"), (signal.SIGINT, "ray")])
def test_interrupt_prints_one_line_and_resumes(setup, tmp_path, temporary, signal_number, executor):
    model, calibration, _ = setup
    out = tmp_path / "out"
    process = start(arguments(model, calibration, out, *engine(executor)), temporary)
    wait_until(lambda: len(finished(out)) >= 2 and len(workers_of(process)) >= 2, process)
    processes = workers_of(process)
    if signal_number == signal.SIGINT:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    else:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert_no_survivor(processes)
    assert_no_socket_directory(temporary)
    done = len(finished(out))
    lines = [line for line in stderr.splitlines() if line.strip()]
    expected = (f"matfactor: interrupted: {done} finished layers kept in {out}; run the same "
                "command again to continue from there")
    assert lines == [expected], stderr
    assert_journal_consistent(out)
    rerun_resumes(setup, out, done)


class FailingBlock(torch.nn.Module):
    """Wraps a block and raises in its forward pass after the first ``calls`` calls."""

    def __init__(self, block, calls):
        super().__init__()
        self.block, self.calls = block, calls

    def forward(self, *args, **kwargs):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("this block cannot run")
        return self.block(*args, **kwargs)


def test_a_run_that_fails_before_its_first_layer_leaves_nothing(tmp_path):
    from matfactor.adapters import Recipe, compress_model
    from text_models import random_bert, random_token_batches

    model = random_bert()
    blocks = list(model.encoder.layer)
    # the blocks' first pass (checking they chain) works; the calibration pass of block 0 fails
    model.encoder.layer[0] = FailingBlock(blocks[0], calls=len(random_token_batches()))
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match="this block cannot run"):
        compress_model(model, random_token_batches(), Recipe.single("magnitude", density=0.5),
                       blocks=[model.encoder.layer[0], *blocks[1:]], resume_dir=out, progress=False)
    assert not out.exists() and (tmp_path / "new").exists()


def test_worker_killed_mid_solve(setup, tmp_path, temporary):
    model, calibration, _ = setup
    out = tmp_path / "out"
    process = start(arguments(model, calibration, out), temporary)
    wait_until(lambda: len(finished(out)) >= 1, process)
    processes = workers_of(process)
    victim = next(p for p in processes if "resource_tracker" not in " ".join(p.cmdline()))
    victim.kill()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert "matfactor: error: a worker died while solving" in stderr and "Traceback" not in stderr
    assert "run again to resume" in stderr
    assert_no_survivor(processes)
    assert_no_socket_directory(temporary)
    assert_journal_consistent(out)
    rerun_resumes(setup, out, len(finished(out)))


@contextlib.contextmanager
def small_filesystem(directory, size):
    """A tmpfs of ``size`` mounted on ``directory`` (root only; the test skips otherwise)."""
    directory.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                            check=False, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(directory)],
                                              check=True)
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_disk_full_during_a_layer_write(setup, tmp_path):
    """The disk fills up after a few layers: a clear error, a consistent journal, and once there
    is room again the same command completes the run."""
    model, calibration, _ = setup
    disk = tmp_path / "disk"
    out = disk / "out"
    # tmpfs gives each file at least one 4 KiB page: 64 KiB hold run.json and a few layers
    with small_filesystem(disk, "64k") as resize:
        result = subprocess.run([sys.executable, "-m", "matfactor", *arguments(model, calibration, out)],
                                check=False, capture_output=True, text=True, timeout=600)
        assert result.returncode == 2, result.stderr[-3000:]
        message = result.stderr.strip().splitlines()
        assert len(message) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert message[0].startswith("matfactor: error:") and "No space left on device" in message[0]
        assert f"cannot write {out}" in message[0]
        done = len(finished(out))
        assert 0 < done < N_LAYERS
        assert f"({done} finished layers kept in {out}: the same command continues" in message[0]
        assert_journal_consistent(out)
        resize("16m")
        rerun_resumes(setup, out, done)
