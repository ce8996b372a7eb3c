"""The method registry: built-in declarations, and a user's method run through everything.

The user's method is the guide's example, ``docs/examples/kept_inputs.py`` (structured input
pruning with its own result type and module form), imported from its file as a user would.
Each test that registers something runs on a copy of the registries, restored afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import matfactor
from matfactor.adapters import (
    METHODS,
    CheckpointError,
    CompressedLinear,
    Method,
    Recipe,
    Rule,
    compress_model,
    compressed_module,
    compression_plan,
    import_plugin,
    load_compressed,
    register_method,
    register_module,
    save_compressed,
)
from matfactor.adapters import methods as methods_module
from matfactor.adapters import modules as modules_module
from matfactor.adapters.command import main
from matfactor.adapters.executors import process_pool
from matfactor.adapters.memory import solve_bytes
from matfactor.adapters.methods import Budget, declaring_modules, resolve_budget
from text_models import random_bert, random_token_batches, save_tiny_bert, write_texts

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "kept_inputs.py"
BUILT_IN = ("magnitude", "wanda", "sparsegpt", "admm", "dsf", "lowrank", "weighted_lowrank", "pifa",
            "mpifa", "sparse_lowrank")


@pytest.fixture
def registries(monkeypatch):
    """Private copies of the method and module registries (and of the example's import)."""
    assert len(METHODS) >= 10  # the built-in methods loaded before the copy
    monkeypatch.setattr(METHODS, "_methods", dict(METHODS._methods))
    monkeypatch.setattr(METHODS, "modules", dict(METHODS.modules))
    monkeypatch.setattr(modules_module, "_FORMS", dict(modules_module._FORMS))
    monkeypatch.setattr(modules_module, "_KINDS", dict(modules_module._KINDS))
    monkeypatch.delitem(sys.modules, EXAMPLE.stem, raising=False)
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))


@pytest.fixture
def user_method(registries):
    import_plugin(str(EXAMPLE))
    return sys.modules[EXAMPLE.stem]


def test_every_built_in_method_is_declared_once_with_a_memory_model():
    assert tuple(METHODS)[:len(BUILT_IN)] == BUILT_IN
    for name in BUILT_IN:
        method = METHODS[name]
        assert method.name == name
        budget = resolve_budget(method, (256, 128), density=0.5, rank=None, pattern="unstructured",
                                arguments={}, name="layer")
        assert solve_bytes(name, (256, 128), budget, {}, 4) > 256 * 128 * 4
    assert "outer_iters" in METHODS["dsf"].accepted() and "rtol" in METHODS["pifa"].accepted()
    assert METHODS["mpifa"].needs_streams and METHODS["mpifa"].takes_mix
    assert not any(METHODS[name].needs_streams for name in BUILT_IN if name != "mpifa")
    assert {name for name in BUILT_IN if METHODS[name].pattern} == {
        "magnitude", "wanda", "sparsegpt", "admm", "sparse_lowrank"}


@pytest.mark.parametrize("changes, error", [
    ({"name": "not a name"}, ValueError),
    ({"budget": "bits"}, ValueError),
    ({"statistics": "activations"}, ValueError),
    ({"budget": "rank"}, ValueError),               # a rank budget without rank_for_density
    ({"takes_mix": True}, ValueError),              # mix without the two streams
    ({"solve": 3}, TypeError),
    ({"work_bytes": None}, TypeError),
    ({"options": "damping"}, TypeError),
])
def test_bad_declarations_are_refused(changes, error):
    fields = {"name": "toy", "solve": lambda call: call.W, "budget": "density",
              "work_bytes": lambda shape, budget, arguments, itemsize: 0, **changes}
    with pytest.raises(error):
        Method(**fields)


def test_a_name_is_registered_once(registries):
    other = Method("dsf", lambda call: call.W, "density", lambda *_: 0)
    with pytest.raises(ValueError, match="already registered"):
        register_method(other)
    register_method(METHODS["dsf"])                 # the same declaration again: nothing happens
    assert register_method(other, replace=True) is METHODS["dsf"] is other
    with pytest.raises(TypeError, match="Method"):
        register_method("dsf")


def test_module_forms_are_declared_and_checked(registries):
    class NoResult(CompressedLinear):
        kind = "no_result_linear"
        stored = ("weight",)

    class NoTensors(CompressedLinear):
        kind = "no_tensors_linear"
        result_type = object

    class TakenKind(CompressedLinear):
        kind = "sparse_linear"
        result_type = complex
        stored = ("weight",)

    with pytest.raises(TypeError, match="result_type"):
        register_module(NoResult)
    with pytest.raises(ValueError, match="tensors"):
        register_module(NoTensors)
    with pytest.raises(ValueError, match="already the kind"):
        register_module(TakenKind)
    with pytest.raises(TypeError, match="result must be one of"):
        compressed_module(nn.Linear(4, 3), object(), compression=None)


def test_the_sparse_lowrank_split_counts_the_budget_as_the_core_does():
    # floor(0.29 · 100) is 28 in floating point; the core's count (nnz_budget) keeps 29
    budget = resolve_budget(METHODS["sparse_lowrank"], (10, 10), density=0.29, rank=1,
                            pattern="unstructured", arguments={}, name="layer")
    total = matfactor.nnz_budget((10, 10), 0.29, "unstructured")
    assert total == 29
    assert matfactor.nnz_budget((10, 10), budget.density, "unstructured") == total - 1 * (10 + 10)


def test_a_users_method_runs_through_recipe_pipeline_checkpoint_resume_and_plan(user_method, tmp_path):
    assert "kept_inputs" in METHODS and user_method.__name__ in declaring_modules()
    Rule("kept_inputs", density=0.5, arguments={"damping": 0.1})
    with pytest.raises(ValueError, match="takes no argument"):
        Rule("kept_inputs", density=0.5, arguments={"bogus": 1})
    with pytest.raises(ValueError, match="takes no sparsity pattern"):
        Rule("kept_inputs", pattern="2:4")

    dense, batches = random_bert(), random_token_batches()
    recipe = Recipe.single("kept_inputs", density=0.5)
    plan = compression_plan(dense, recipe)
    assert {solve.method for solve in plan.solves} == {"kept_inputs"} and plan.peak > 0

    model = random_bert()
    with process_pool(1) as pool:  # the worker imports the example's module by itself
        report = compress_model(model, batches, recipe, executor=pool, resume_dir=tmp_path / "run",
                                progress=False)
    layers = [module for module in model.modules() if isinstance(module, user_method.KeptInputsLinear)]
    assert len(layers) == len(report.layers) == 12
    for layer, row in zip(layers, report.layers):
        d_in, d_out = row.shape
        assert layer.index.numel() == d_in // 2 and row.params_after == d_in // 2 * d_out
        assert torch.equal(torch.unique(layer.index), layer.index)     # distinct, sorted inputs

    save_compressed(model, tmp_path / "checkpoint")
    loaded = load_compressed(tmp_path / "checkpoint", model=random_bert(seed=5))
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).last_hidden_state, loaded(**batches[0]).last_hidden_state)

    again = random_bert()
    resumed = compress_model(again, batches, recipe, resume_dir=tmp_path / "run", progress=False)
    assert resumed.resumed == 12
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    del modules_module._KINDS["kept_inputs_linear"]   # a process that never imported the module
    with pytest.raises(CheckpointError, match="register"):
        load_compressed(tmp_path / "checkpoint", model=random_bert())


def test_the_command_takes_a_plugin(registries, tmp_path, capsys):
    model = save_tiny_bert(tmp_path / "tiny")
    texts = write_texts(tmp_path / "texts.txt", 24, seed=3)
    with pytest.raises(SystemExit):
        main(["compress", "--model", str(model), "--method", "kept_inputs", "--out", str(tmp_path / "no")])
    assert "unknown method 'kept_inputs'" in capsys.readouterr().err
    out = tmp_path / "out"
    main(["compress", "--model", str(model), "--method", "kept_inputs", "--plugin", str(EXAMPLE),
          "--calibration", str(texts), "--texts", str(texts), "--workers", "1", "--out", str(out),
          "--quiet"])
    printed = capsys.readouterr().out
    assert "kept_inputs" in printed and "embedding cosine" in printed
    main(["evaluate", "--plugin", str(EXAMPLE), "--model", str(model), "--compressed", str(out),
          "--texts", str(texts)])
    assert "embedding cosine" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compress", "--plugin", str(tmp_path / "missing.py"), "--out", str(tmp_path / "x")])
    assert "--plugin" in capsys.readouterr().err


def test_methods_solve_with_the_budget_they_declare(user_method):
    W = torch.randn(16, 8, dtype=torch.float64)
    X = torch.randn(64, 16, dtype=torch.float64)
    solution = methods_module.solve_layer("layer", W, X.T @ X, None, "kept_inputs", density=0.25,
                                          rank=None, pattern="unstructured", arguments={})
    assert solution.params_after == 4 * 8 and solution.budget == Budget(0.25, None, "unstructured")
    # the refit is the least-squares optimum on the kept inputs: the residual is orthogonal to them
    kept = solution.result.index
    residual = X @ W - X[:, kept] @ solution.result.W
    gradient = X[:, kept].T @ residual
    damping = 0.01 * torch.diagonal(X[:, kept].T @ X[:, kept]).mean()
    assert torch.allclose(gradient, damping * solution.result.W, atol=1e-9)
