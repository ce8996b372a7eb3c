"""Checkpoints: a tiny BERT and a small CNN with compressed layers (real solver results) survive
save and load exactly; the manifest describes the file; sparse layers take the promised bytes;
every kind of damage or mismatch is a CheckpointError naming the culprit, and leaves the model
untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import matfactor as mf
from matfactor.adapters.checkpoint import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    export_dense,
    load_compressed,
    save_compressed,
)
from matfactor.adapters.layers import layer_inputs, weight_matrix
from matfactor.adapters.modules import (
    CompressedModule,
    SparseConv2d,
    SparseLinear,
    UnfoldedConv2d,
    compressed_module,
    replace_module,
)

transformers = pytest.importorskip("transformers")

BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=100)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]

# Which layer of the tiny BERT gets which compression.
BERT_PLAN = {
    "encoder.layer.0.attention.self.query": "pruned",
    "encoder.layer.0.attention.self.key": "lowrank",
    "encoder.layer.0.attention.self.value": "pifa",
    "encoder.layer.0.attention.output.dense": "pruned_2:4",
    "encoder.layer.0.intermediate.dense": "double_sparse",
    "encoder.layer.1.output.dense": "sparse_lowrank",
}
PIFA = "encoder.layer.0.attention.self.value"
NM = "encoder.layer.0.attention.output.dense"
PRUNED = "encoder.layer.0.attention.self.query"




def solve(kind: str, W: torch.Tensor, H: torch.Tensor):
    """A real solver's result and the compression record for it."""
    if kind == "pruned":
        return mf.sparsegpt_prune(W, H, density=0.5), {"pattern": "unstructured", "density": 0.5}
    if kind == "pruned_2:4":
        return mf.sparsegpt_prune(W, H, pattern="2:4"), {"pattern": "2:4", "density": None}
    if kind == "double_sparse":
        return mf.double_sparse(W, 0.5, H, outer_iters=10), {"density": 0.5}
    if kind in ("lowrank", "pifa"):
        lowrank = mf.weighted_lowrank(W, H, 8)
        return (lowrank if kind == "lowrank" else mf.pifa_from_factors(lowrank.U, lowrank.V)), {}
    return (mf.sparse_plus_lowrank(W, H, 4, density=0.25, iters=3),
            {"pattern": "unstructured", "density": 0.25})


def gram_matrices(model: nn.Module, names: list[str], run) -> dict[str, torch.Tensor]:
    """``H = XᵀX`` of each named layer's inputs over ``run(model)`` (float32, from hooks)."""
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            X = layer_inputs(module, args[0].detach()).float()
            grams[name] = grams.get(name, 0) + X.T @ X
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    with torch.no_grad():
        run(model)
    for handle in handles:
        handle.remove()
    return grams


def compress(model: nn.Module, plan: dict[str, str], run) -> nn.Module:
    grams = gram_matrices(model, list(plan), run)
    for name, kind in plan.items():
        layer = model.get_submodule(name)
        result, sparsity = solve(kind, weight_matrix(layer).float(), grams[name])
        module = compressed_module(layer, result, compression={"method": kind, "arguments": {},
                                                               **sparsity})
        replace_module(model, name, module)
    return model.eval()


def input_ids() -> torch.Tensor:
    return torch.randint(0, BERT["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(1))


def bert_output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).last_hidden_state


def new_bert(**changes) -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**{**BERT, **changes})).eval()


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    """``(model, tokenizer, path)``: a compressed tiny BERT saved once for the module's tests."""
    model = compress(new_bert(), BERT_PLAN, lambda m: m(input_ids()))
    tokenizer = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)})
    path = tmp_path_factory.mktemp("bert")
    summary = save_compressed(model, path, tokenizer=tokenizer)
    return model, tokenizer, path, summary


@pytest.fixture
def checkpoint_copy(bert_checkpoint, tmp_path) -> Path:
    """A private copy of the BERT checkpoint, to damage."""
    return Path(shutil.copytree(bert_checkpoint[2], tmp_path / "copy"))


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text())


def write_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def rewrite_weights(path: Path, edit) -> None:
    """Edit the weights file's tensors and record its new sha256, as a consistent but wrong
    save would: the damage must then be caught by the deeper checks."""
    tensors = load_file(path / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    manifest = read_manifest(path)
    manifest["weights"]["sha256"] = hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()
    write_manifest(path, manifest)


def unpack(tensors: dict, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    bits = np.unpackbits(tensors[f"{key}.bitmask"].numpy())[:int(np.prod(shape))]
    dense = torch.zeros(shape, dtype=tensors[f"{key}.values"].dtype)
    dense[torch.from_numpy(bits.astype(bool)).reshape(shape)] = tensors[f"{key}.values"]
    return dense


def repack(tensors: dict, key: str, dense: torch.Tensor) -> None:
    mask = dense != 0
    tensors[f"{key}.values"] = dense[mask]
    tensors[f"{key}.bitmask"] = torch.from_numpy(np.packbits(mask.numpy().reshape(-1)))


# --------------------------------------------------------------------------- round trips


def test_bert_round_trip_is_exact(bert_checkpoint):
    model, tokenizer, path, _ = bert_checkpoint
    loaded = load_compressed(path)
    assert type(loaded) is transformers.BertModel and not loaded.training
    assert torch.equal(bert_output(loaded), bert_output(model))
    for name in BERT_PLAN:
        original, restored = model.get_submodule(name), loaded.get_submodule(name)
        assert type(restored) is type(original)
        assert restored.compression == original.compression
        assert restored.n_params == original.n_params
        assert torch.equal(restored.dense_weight(), original.dense_weight())
    assert loaded.get_submodule(NM).pattern == "2:4"
    text = "w1 w2 w17 unknown"
    assert transformers.AutoTokenizer.from_pretrained(path)(text)["input_ids"] \
        == tokenizer(text)["input_ids"]


def test_bert_loads_into_a_given_model_and_converts(bert_checkpoint):
    model, _, path, _ = bert_checkpoint
    target = new_bert()
    loaded = load_compressed(path, model=target, dtype=torch.float64)
    assert loaded is target
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert loaded.get_submodule(PIFA).pivots.dtype == torch.int64
    torch.testing.assert_close(bert_output(loaded).float(), bert_output(model), rtol=1e-5,
                               atol=1e-5)


def test_manifest_describes_the_file(bert_checkpoint):
    model, _, path, summary = bert_checkpoint
    manifest = read_manifest(path)
    assert manifest["format"] == "matfactor-compressed" and manifest["format_version"] == 2
    assert manifest["model_class"] == "BertModel" and manifest["dtype"] == "float32"
    weights = path / WEIGHTS_NAME
    assert manifest["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["weights"]["bytes"] == weights.stat().st_size == summary.file_bytes
    kinds = {name: entry["kind"] for name, entry in manifest["modules"].items()}
    assert kinds == {name: model.get_submodule(name).kind for name in BERT_PLAN}
    tensors = load_file(weights)
    described = set(manifest["state"]) | {
        d[part]["key"] if d["layout"] == "bitmask" else d["key"]
        for entry in manifest["modules"].values() for d in entry["tensors"].values()
        for part in (("values", "bitmask") if d["layout"] == "bitmask" else ("key",))}
    assert described == set(tensors)
    entry = manifest["modules"][PIFA]
    assert entry["tensors"]["pivots"]["dtype"] == "int32"
    assert entry["compression"] == {"method": "pifa", "arguments": {}}
    assert manifest["modules"][PRUNED]["nnz"] == model.get_submodule(PRUNED).n_params
    assert (path / "config.json").is_file()


def test_sparse_layers_take_the_promised_bytes(bert_checkpoint, tmp_path):
    _, _, _, summary = bert_checkpoint
    pruned = summary.modules[PRUNED]
    assert pruned.kind == "sparse_linear" and pruned.dense_bytes == 32 * 32 * 4
    assert pruned.ratio <= 0.56  # 0.5 + 1/32
    assert summary.stored_bytes == sum(m.stored_bytes for m in summary.modules.values())
    # Half precision: 0.5 + 1/16 exactly for a 50% layer.
    W = torch.randn(64, 32)
    W[torch.rand(64, 32).argsort(dim=0) < 32] = 0
    half = nn.Sequential(SparseLinear(W.bfloat16(), density=0.5, pattern="per_output"))
    assert save_compressed(half, tmp_path).modules["0"].ratio == 0.5 + 1 / 16


def test_cnn_round_trip_into_a_fresh_model(tmp_path):
    def cnn():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval()

    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    model = compress(cnn(), {"0": "pruned", "2": "lowrank", "5": "double_sparse"},
                     lambda m: m(images))
    assert isinstance(model[0], SparseConv2d) and isinstance(model[2], UnfoldedConv2d)
    with torch.no_grad():
        expected = model(images)
    save_compressed(model, tmp_path)
    with pytest.raises(CheckpointError, match="no config.json: it was saved from a Sequential"):
        load_compressed(tmp_path)
    loaded = load_compressed(tmp_path, model=cnn())
    assert isinstance(loaded[0], SparseConv2d) and isinstance(loaded[2], UnfoldedConv2d)
    with torch.no_grad():
        assert torch.equal(loaded(images), expected)
    other = cnn()
    other[2] = nn.Conv2d(8, 16, 3, stride=1, padding=1)
    with pytest.raises(CheckpointError, match=r"module '2': the model's convolution has geometry "
                                              r".*'stride': \[1, 1\].* the checkpoint's .*"
                                              r"'stride': \[2, 2\].*\(mismatched\)"):
        load_compressed(tmp_path, model=other)


def test_tied_weights_are_stored_once(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False))
    model[2].weight = model[0].weight
    replace_module(model, "1", compressed_module(model[1], mf.truncated_svd(
        weight_matrix(model[1]).float(), 2), compression={"method": "svd", "arguments": {}}))
    save_compressed(model, tmp_path)
    assert read_manifest(tmp_path)["aliases"] == {"2.weight": "0.weight"}
    fresh = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False))
    loaded = load_compressed(tmp_path, model=fresh)
    tokens = torch.arange(10)
    assert torch.equal(loaded(tokens), model(tokens))


def test_saving_again_replaces_the_checkpoint(bert_checkpoint, checkpoint_copy):
    model = nn.Sequential(SparseLinear(torch.eye(4)))
    save_compressed(model, checkpoint_copy)
    assert set(read_manifest(checkpoint_copy)["modules"]) == {"0"}
    assert not list(checkpoint_copy.glob(".*.tmp"))


# --------------------------------------------------------------------------- damage and mismatch


def assert_untouched_after_failure(path: Path, match: str, **kwargs) -> None:
    """Loading fails with ``match`` and the given model (if any) is left as it was."""
    model = new_bert()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        load_compressed(path, model=model, **kwargs)
    assert not any(isinstance(m, CompressedModule) for m in model.modules())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_missing_files(checkpoint_copy):
    (checkpoint_copy / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="matfactor.safetensors is missing"):
        load_compressed(checkpoint_copy)
    (checkpoint_copy / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="matfactor.json is missing"):
        load_compressed(checkpoint_copy)


def test_flipped_byte_is_damage(checkpoint_copy):
    weights = checkpoint_copy / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert_untouched_after_failure(checkpoint_copy, "matfactor.safetensors is damaged: its sha256")


def test_truncated_file_is_damage(checkpoint_copy):
    weights = checkpoint_copy / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="matfactor.safetensors is damaged"):
        load_compressed(checkpoint_copy)


def test_garbled_file_with_a_matching_sha256_is_unreadable(checkpoint_copy):
    weights = checkpoint_copy / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    manifest = read_manifest(checkpoint_copy)
    manifest["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    write_manifest(checkpoint_copy, manifest)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_compressed(checkpoint_copy)


def test_manifest_shape_edited(checkpoint_copy):
    manifest = read_manifest(checkpoint_copy)
    manifest["modules"][PIFA]["tensors"]["C"]["shape"][1] += 1
    write_manifest(checkpoint_copy, manifest)
    assert_untouched_after_failure(checkpoint_copy, rf"module '{PIFA}', tensor 'C': tensor "
                                   rf"'{PIFA}.C' is float32 of shape \[8, 24\] in "
                                   r"matfactor.safetensors, but the manifest says float32 of shape "
                                   r"\[8, 25\]")


def test_deleted_extra_and_retyped_tensors(checkpoint_copy):
    rewrite_weights(checkpoint_copy, lambda t: t.pop(f"{PIFA}.W_p"))
    assert_untouched_after_failure(checkpoint_copy, rf"tensor '{PIFA}.W_p' is missing from "
                                   "matfactor.safetensors")
    rewrite_weights(checkpoint_copy, lambda t: t.update({f"{PIFA}.W_p": torch.zeros(32, 8),
                                                         "stowaway": torch.zeros(3)}))
    assert_untouched_after_failure(checkpoint_copy, r"tensors the manifest does not describe: "
                                   r"\['stowaway'\]")
    rewrite_weights(checkpoint_copy, lambda t: (t.pop("stowaway"), t.update(
        {"embeddings.LayerNorm.bias": t["embeddings.LayerNorm.bias"].double()})))
    assert_untouched_after_failure(checkpoint_copy, "state tensor 'embeddings.LayerNorm.bias': "
                                   "tensor 'embeddings.LayerNorm.bias' is float64")


def test_mismatched_model(bert_checkpoint):
    path = bert_checkpoint[2]
    with pytest.raises(CheckpointError, match=r"module 'encoder.layer.0.attention.self.query': the "
                                              r"model's layer has a \(d_in, d_out\) = \[48, 48\] "
                                              r"weight matrix, the checkpoint's \[32, 32\] "
                                              r"\(mismatched\)"):
        load_compressed(path, model=new_bert(hidden_size=48))
    with pytest.raises(CheckpointError, match="module 'encoder.layer.1.output.dense' is not in the "
                                              "model"):
        load_compressed(path, model=new_bert(num_hidden_layers=1))
    with pytest.raises(CheckpointError, match=f"module '{PRUNED}' is not in the model "
                                              r"\(Sequential\)"):
        load_compressed(path, model=nn.Sequential(nn.Linear(32, 32)))


def test_mask_violating_its_pattern(checkpoint_copy):
    def add_a_third_weight_to_a_group(tensors):
        dense = unpack(tensors, f"{NM}.weight", (32, 32))
        dense[0, :4] = 1.0  # all four of the first group of inputs of output 0
        repack(tensors, f"{NM}.weight", dense)

    rewrite_weights(checkpoint_copy, add_a_third_weight_to_a_group)
    manifest = read_manifest(checkpoint_copy)
    described = manifest["modules"][NM]["tensors"]["weight"]
    tensors = load_file(checkpoint_copy / WEIGHTS_NAME)
    for part in ("values", "bitmask"):
        described[part]["shape"] = list(tensors[f"{NM}.weight.{part}"].shape)
    write_manifest(checkpoint_copy, manifest)
    assert_untouched_after_failure(checkpoint_copy, rf"module '{NM}': SparseLinear: W violates its "
                                   "sparsity pattern '2:4'")


def test_bitmask_and_values_disagree(checkpoint_copy):
    key = f"{PRUNED}.weight.values"
    rewrite_weights(checkpoint_copy, lambda t: t.update({key: t[key][:-1]}))
    manifest = read_manifest(checkpoint_copy)
    manifest["modules"][PRUNED]["tensors"]["weight"]["values"]["shape"][0] -= 1
    write_manifest(checkpoint_copy, manifest)
    assert_untouched_after_failure(checkpoint_copy, rf"bitmask '{PRUNED}.weight.bitmask' has 512 "
                                   rf"bits set but '{key}' holds 511 values")


def test_pivots_not_a_permutation(checkpoint_copy):
    def duplicate(tensors):
        tensors[f"{PIFA}.pivots"][1] = tensors[f"{PIFA}.pivots"][0]

    rewrite_weights(checkpoint_copy, duplicate)
    assert_untouched_after_failure(checkpoint_copy, rf"module '{PIFA}': PifaLinear: pivots and "
                                   "non_pivots must together be a permutation")


def test_non_finite_values(checkpoint_copy):
    key = f"{PRUNED}.weight.values"
    rewrite_weights(checkpoint_copy, lambda t: t[key].__setitem__(3, float("inf")))
    assert_untouched_after_failure(checkpoint_copy, rf"module '{PRUNED}': SparseLinear: W contains "
                                   "NaN or Inf")


def test_malformed_or_foreign_manifest(checkpoint_copy):
    manifest = read_manifest(checkpoint_copy)
    del manifest["modules"][PIFA]["kind"]
    write_manifest(checkpoint_copy, manifest)
    assert_untouched_after_failure(checkpoint_copy, rf"malformed entry for module '{PIFA}'")
    write_manifest(checkpoint_copy, {**manifest, "format_version": 99})
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_compressed(checkpoint_copy)
    (checkpoint_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON manifest"):
        load_compressed(checkpoint_copy)


# --------------------------------------------------------------------------- foreign loaders, dense export


@pytest.mark.parametrize("loader", ["AutoModel", "BertModel", "AutoModelForMaskedLM"])
def test_transformers_refuses_a_checkpoint_and_says_how_to_load_it(bert_checkpoint, loader):
    """``from_pretrained`` of a compressed checkpoint raises, naming load_compressed and the
    dense export, instead of returning a model with randomly initialised layers."""
    path = bert_checkpoint[2]
    with pytest.raises((ValueError, OSError)) as refusal:
        getattr(transformers, loader).from_pretrained(path)
    message = str(refusal.value)
    assert "matfactor.adapters.load_compressed" in message and "matfactor export" in message
    assert transformers.AutoConfig.from_pretrained(path).hidden_size == BERT["hidden_size"]
    assert transformers.AutoTokenizer.from_pretrained(path)("the value")["input_ids"]


def test_dense_export_loads_in_plain_transformers(bert_checkpoint, tmp_path):
    model, _, path, _ = bert_checkpoint
    out = export_dense(path, tmp_path / "dense")
    dense = transformers.AutoModel.from_pretrained(out).eval()
    assert type(dense) is transformers.BertModel
    assert not any(isinstance(module, CompressedModule) for module in dense.modules())
    torch.testing.assert_close(bert_output(dense), bert_output(model), rtol=1e-5, atol=1e-6)
    # the zeros of the compressed layers are in the dense copy's weights
    assert torch.equal(dense.get_submodule(PRUNED).weight == 0, model.get_submodule(PRUNED).weight == 0)
    assert transformers.AutoTokenizer.from_pretrained(out)("the value")["input_ids"]
    with pytest.raises(ValueError, match="out must differ from path"):
        export_dense(path, path)


def test_every_file_gets_the_mode_of_a_new_file(bert_checkpoint):
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {file.name: stat.S_IMODE(file.stat().st_mode) for file in bert_checkpoint[2].iterdir()}
    assert WEIGHTS_NAME in modes and MANIFEST_NAME in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_version_1_checkpoints_still_load(bert_checkpoint, checkpoint_copy):
    """Checkpoints of format version 1 (weights in model.safetensors) load as before."""
    (checkpoint_copy / WEIGHTS_NAME).rename(checkpoint_copy / "model.safetensors")
    manifest = read_manifest(checkpoint_copy)
    write_manifest(checkpoint_copy, {**manifest, "format_version": 1,
                                     "weights": {**manifest["weights"], "file": "model.safetensors"}})
    torch.testing.assert_close(bert_output(load_compressed(checkpoint_copy)),
                               bert_output(bert_checkpoint[0]), rtol=0, atol=0)
    save_compressed(load_compressed(checkpoint_copy), checkpoint_copy)  # saved over: version 2
    assert not (checkpoint_copy / "model.safetensors").exists()
    assert read_manifest(checkpoint_copy)["format_version"] == 2
