"""The training examples of the guide (docs/guide/training.md) run and print what the page says.

Each example runs as the page tells a reader to run it, as a subprocess, in a fast configuration:
the distillation of all-MiniLM-L6-v2 compressed by SparseGPT (solved in seconds, where the
default DSF takes minutes) on a few texts for two steps, then again from the checkpoint it saved
(the ``--compressed`` path); the causal-LM fine-tuning on its tiny default Llama, with short
pre-training and a few Trainer steps. The tests check the printed claims: the masks unchanged
(each example asserts it and prints how many), the losses, fidelities and perplexities finite and
in range, the time and peak memory reported, and the saved checkpoints loading.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
NUMBER = r"([-+0-9.eE,]+|nan|inf)"


def _run(script: str, *arguments: str, timeout: int = 600) -> str:
    """Run ``docs/examples/<script>`` with ``arguments``; its standard output (it must succeed)."""
    threads = os.environ.get("MATFACTOR_TEST_THREADS", "1")
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                   "OPENBLAS_NUM_THREADS": threads}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--threads", threads, *arguments],
                            capture_output=True, text=True, env=environment, timeout=timeout, check=False)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def _numbers(pattern: str, output: str) -> list[float]:
    """The numbers the groups of ``pattern`` match on its line of ``output`` (thousands
    separators dropped); each must be finite."""
    found = re.search(pattern, output, re.MULTILINE)
    assert found is not None, f"no line matching {pattern!r} in:\n{output}"
    values = [float(group.replace(",", "")) for group in found.groups()]
    assert all(math.isfinite(value) for value in values), found.group(0)
    return values


def _check_distillation(output: str, steps: int) -> None:
    (before,) = _numbers(rf"^before training: embedding cosine .* mean {NUMBER},", output)
    (after,) = _numbers(rf"^after training: embedding cosine .* mean {NUMBER},", output)
    assert 0.5 < before <= 1 and 0.5 < after <= 1
    masks, stored, modules = _numbers(rf"^masks unchanged: {NUMBER} masks, {NUMBER} stored values in "
                                      rf"{NUMBER} compressed modules$", output)
    assert masks == modules == 36 and stored > 0   # six linear layers in each of six blocks
    first, last = _numbers(rf"^training loss: first \d+ steps {NUMBER}, last \d+ steps {NUMBER}$", output)
    assert 0 <= first < 1 and 0 <= last < 1
    assert len(re.findall(r"^step \d+: loss ", output, re.MULTILINE)) == steps
    seconds, peak = _numbers(rf"^training time {NUMBER} s .* peak memory {NUMBER} MiB$", output)
    assert seconds > 0 and peak > 100


def test_distillation_keeps_the_masks_and_saves_a_checkpoint_that_trains_again(tmp_path):
    from matfactor.adapters import load_compressed

    fast = ["--texts", "16", "--heldout", "16", "--samples", "16", "--batch-size", "8"]
    output = _run("distill_minilm.py", "--method", "sparsegpt", "--steps", "2", *fast,
                  "--out", str(tmp_path / "trained"))
    assert "compressed by sparsegpt at density 0.5 on 16 texts: 36 layers, 0.500" in output
    _check_distillation(output, steps=2)
    saved = load_compressed(tmp_path / "trained")
    assert type(saved.encoder.layer[0].attention.self.query).__name__ == "SparseLinear"

    again = _run("distill_minilm.py", "--compressed", str(tmp_path / "trained"), "--steps", "1",
                 "--loss", "mse", "--only-compressed", *fast)
    assert f"loaded {tmp_path / 'trained'} (compressed from minilm)" in again
    _check_distillation(again, steps=1)
    # what the second run started from is what the first one ended with
    (first_after,) = _numbers(rf"^after training: embedding cosine .* mean {NUMBER},", output)
    (second_before,) = _numbers(rf"^before training: embedding cosine .* mean {NUMBER},", again)
    assert abs(first_after - second_before) < 1e-4


def test_causal_lm_fine_tuning_with_the_trainer_keeps_the_masks(tmp_path):
    from matfactor.adapters import load_compressed

    output = _run("finetune_causal_lm.py", "--pretrain-steps", "20", "--steps", "4", "--samples", "8",
                  "--eval-windows", "4", "--out", str(tmp_path / "tuned"))
    assert "compressed by sparsegpt (2:4) on 8 windows of 128 tokens: 28 layers, 0.500" in output
    masks, kept = _numbers(rf"^masks unchanged: {NUMBER} masks, {NUMBER} kept entries$", output)
    assert masks == 28 and kept > 0   # seven linear layers in each of four blocks
    dense, compressed, tuned = _numbers(rf"^perplexity: dense {NUMBER}, compressed {NUMBER}, "
                                        rf"fine-tuned {NUMBER}$", output)
    assert all(1 < value < 300 for value in (dense, compressed, tuned))   # 256 byte values
    first, last, _ = _numbers(rf"^training loss: first logged {NUMBER}, last logged {NUMBER}, mean {NUMBER}",
                              output)
    assert 0 < first and 0 < last
    seconds, peak = _numbers(rf"^training time {NUMBER} s .* peak memory {NUMBER} MiB", output)
    assert seconds > 0 and peak > 100

    saved = load_compressed(tmp_path / "tuned")
    assert type(saved).__name__ == "LlamaForCausalLM"
    assert type(saved.model.layers[0].mlp.down_proj).__name__ == "SparseLinear"
