"""Block refinement in the pipeline: zero steps is the pipeline without it; refined blocks match
the dense model better with the solvers' structure kept, in sequential and one-shot mode; a
refined run resumes to the same model; a refinement that would make a block worse is undone;
recipes and the command take it and name bad values."""

from __future__ import annotations

import json

import pytest
import torch

import matfactor as mf

transformers = pytest.importorskip("transformers")

from matfactor.adapters import (  # noqa: E402
    PipelineObserver,
    Recipe,
    Refinement,
    Rule,
    SparseParameter,
    compress_model,
    stored_parameters,
)
from matfactor.adapters.executors import process_pool  # noqa: E402
from matfactor.adapters.command import main  # noqa: E402
from runs import compress_arguments  # noqa: E402
from text_models import random_bert, random_token_batches, save_tiny_bert, write_texts  # noqa: E402

STEPS = Refinement(steps=12, lr=3e-2)


def _recipe(method="sparsegpt", refine=None, **budget):
    budget = budget or {"density": 0.5}
    return Recipe(Recipe.single(method, **budget).rules, refine=refine)


def _compress(recipe, **options):
    model = random_bert()
    report = compress_model(model, random_token_batches(), recipe, progress=False, **options)
    return model, report


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _masks(model) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if key.endswith("_mask")}


def _block_output_error(model, block: int) -> float:
    """Relative squared error of block ``block``'s output against the dense model's, on the
    calibration batches (the dense and compressed models fed the same tokens)."""
    dense = random_bert()
    errors = []
    for batch in random_token_batches():
        outputs = []
        for network in (dense, model):
            captured = []
            handle = network.encoder.layer[block].register_forward_hook(
                lambda module, args, output: captured.append(output[0] if isinstance(output, tuple)
                                                             else output))
            with torch.no_grad():
                network(**batch)
            handle.remove()
            outputs.append(captured[0])
        errors.append((float((outputs[1] - outputs[0]).square().sum()), float(outputs[0].square().sum())))
    return sum(e for e, _ in errors) / sum(n for _, n in errors)


def test_zero_steps_is_the_pipeline_without_refinement():
    assert _recipe(refine=Refinement(steps=0)).refine is None
    plain, plain_report = _compress(_recipe())
    zero, zero_report = _compress(_recipe(refine=Refinement(steps=0)))
    assert _same(plain, zero) and not zero_report.refinements
    refined, _ = _compress(_recipe(refine=STEPS))
    assert not _same(plain, refined)


@pytest.mark.parametrize("method, budget", [("sparsegpt", {"pattern": "2:4"}), ("dsf", {"density": 0.25}),
                                            ("lowrank", {"density": 0.5})])
@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_refined_blocks_match_the_dense_model_better_with_the_structure_kept(method, budget, mix):
    unrefined, _ = _compress(_recipe(method, **budget), mix=mix)
    refined, report = _compress(_recipe(method, refine=STEPS, **budget), mix=mix)
    assert [r.block for r in report.refinements] == ["encoder.layer.0", "encoder.layer.1"]
    for block in report.refinements:
        assert block.steps == STEPS.steps
        assert block.loss_after < block.loss_before if block.kept else block.loss_after == block.loss_before
    assert report.refinements[0].kept
    # block 0 sees the same inputs in both runs: the same solves, so the same supports, and a
    # smaller output error once refined
    # (and for the factored methods, the same shapes: the same ranks)
    before, after = unrefined.state_dict(), refined.state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert all(torch.equal(v, after[k]) for k, v in _masks(unrefined).items()
               if k.startswith("encoder.layer.0."))
    assert _block_output_error(refined, 0) < _block_output_error(unrefined, 0)
    assert sum(p.numel() for p in refined.parameters()) == sum(p.numel() for p in unrefined.parameters())
    if "pattern" in budget:
        for name, module in refined.named_modules():
            if any(isinstance(vars(cls).get("weight"), SparseParameter) for cls in type(module).__mro__):
                assert mf.mask_satisfies(module.weight.T != 0, None, mf.parse_pattern("2:4"), exact=False)
    # the flags are restored: the compressed modules frozen, the model's own parameters as they were
    stored = {id(p) for p in stored_parameters(refined)}
    assert stored and all(p.requires_grad == (id(p) not in stored) for p in refined.parameters())
    assert all(p.grad is None for p in refined.parameters())


def test_one_shot_refines_each_block_on_the_dense_inputs():
    unrefined, _ = _compress(_recipe("wanda"), sequential=False)
    refined, report = _compress(_recipe("wanda", refine=STEPS), sequential=False)
    assert len(report.refinements) == 2 and report.refinements[0].kept
    assert _block_output_error(refined, 0) < _block_output_error(unrefined, 0)
    assert _masks(refined).keys() == _masks(unrefined).keys()
    assert all(torch.equal(v, _masks(refined)[k]) for k, v in _masks(unrefined).items())


def test_a_refinement_that_makes_a_block_worse_is_undone():
    plain, _ = _compress(_recipe())
    diverged, report = _compress(_recipe(refine=Refinement(steps=4, lr=10.0)))
    assert not any(r.kept for r in report.refinements)
    assert all(r.loss_after == r.loss_before for r in report.refinements)
    assert _same(plain, diverged)


class _Stop(Exception):
    pass


class _StopAt(PipelineObserver):
    def __init__(self, event, name):
        self.event, self.name = event, name

    def block_finished(self, index, name):
        if self.event == "block_finished" and name == self.name:
            raise _Stop

    def layer_solved(self, report, solution):
        if self.event == "layer_solved" and report.name == self.name:
            raise _Stop


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("event, name", [("block_finished", "encoder.layer.0"),
                                         ("layer_solved", "encoder.layer.1.attention.output.dense")])
def test_an_interrupted_refined_run_resumes_to_the_same_model(tmp_path, sequential, event, name):
    if not sequential and event == "block_finished":
        pytest.skip("one-shot runs have no block_finished event")
    recipe = _recipe(refine=STEPS)
    reference, _ = _compress(recipe, sequential=sequential)
    with pytest.raises(_Stop):
        _compress(recipe, sequential=sequential, resume_dir=tmp_path, observer=_StopAt(event, name))
    refined_blocks = sorted(path.name for path in (tmp_path / "blocks").glob("*.json"))
    assert refined_blocks == (["encoder.layer.0.json"] if sequential else [])
    resumed, report = _compress(recipe, sequential=sequential, resume_dir=tmp_path)
    assert report.resumed > 0 and len(report.refinements) == 2
    assert _same(reference, resumed)


def test_refinement_with_a_process_pool_is_the_in_process_refinement():
    recipe = _recipe("dsf", refine=STEPS)
    reference, _ = _compress(recipe)
    with process_pool(2) as pool:
        pooled, _ = _compress(recipe, executor=pool)
    assert _same(reference, pooled)


@pytest.mark.parametrize("refine, message", [
    ({"steps": -1}, "steps"), ({"steps": 2.5}, "steps"), ({"lr": 0}, "lr must be a real number > 0"),
    ({"lr": float("nan")}, "lr"), ({"loss": "l1"}, "loss"), ({"epochs": 3}, "'steps', 'lr' and 'loss'"),
    ([4], "refine must be a mapping")])
def test_bad_refinements_name_the_problem(refine, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict({"method": "dsf", "density": 0.5, "refine": refine})


def test_recipe_round_trip_and_refinement_without_blocks():
    recipe = Recipe.from_dict({"method": "dsf", "density": 0.5, "refine": {"steps": 8, "loss": "cosine"}})
    assert recipe.refine == Refinement(steps=8, loss="cosine")
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert "refine" not in _recipe().to_dict()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    recipe = Recipe((Rule("magnitude", targets=["*"], density=0.5),), refine=STEPS)
    with pytest.raises(ValueError, match="refine needs the model's blocks"):
        compress_model(model, [torch.randn(4, 8)], recipe, sequential=False, blocks=None, progress=False)


def test_the_command_refines_and_records_it(tmp_path, capsys):
    model = save_tiny_bert(tmp_path / "model", hidden_size=32, blocks=2)
    calibration = write_texts(tmp_path / "calibration.txt", 24, seed=1)
    out = tmp_path / "out"
    main(compress_arguments(model, calibration, out, "--workers", "1", "--density", "0.25",
                            "--refine-steps", "6", "--refine-lr", "0.03"))
    printed = capsys.readouterr().out
    assert "block refinement: 6 steps on each of 2 blocks" in printed
    assert "'refine': {'steps': 6, 'lr': 0.03, 'loss': 'mse'}" in printed
    modules = json.loads((out / "matfactor.json").read_text())["modules"]
    assert modules and all(entry["compression"]["refine"] == {"steps": 6, "lr": 0.03, "loss": "mse",
                                                              "kept": entry["compression"]["refine"]["kept"]}
                           for entry in modules.values())
    assert any(entry["compression"]["refine"]["kept"] for entry in modules.values())
