"""The pipeline's observer: its events and their order in every mode, with executors and on
resumed runs; and the memory plan given to ``compress_model`` once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

transformers = pytest.importorskip("transformers")

from matfactor.adapters import (  # noqa: E402
    MemoryPlan,
    PipelineObserver,
    Recipe,
    Rule,
    compress_model,
    compression_plan,
)
from matfactor.adapters import pipeline as pipeline_module  # noqa: E402
from matfactor.adapters.command import main  # noqa: E402
from matfactor.adapters.executors import process_pool  # noqa: E402
from text_models import random_bert, random_token_batches, save_tiny_bert, write_texts  # noqa: E402

RECIPE = Recipe.single("sparsegpt", density=0.5)
BLOCKS = ("encoder.layer.0", "encoder.layer.1")
#: The groups of a BERT block that read one input, in the order they run.
GROUPS = (("attention.self.query", "attention.self.key", "attention.self.value"),
          ("attention.output.dense",), ("intermediate.dense",), ("output.dense",))


class Recording(PipelineObserver):
    """Every event with its arguments, and the threads they came in."""

    def __init__(self, fail_after_solves: int | None = None) -> None:
        self.events: list[tuple] = []
        self.threads: set[int] = set()
        self.fail_after_solves = fail_after_solves

    def _record(self, *event) -> None:
        self.events.append(event)
        self.threads.add(threading.get_ident())

    def layer_solved(self, report, solution):
        self._record("layer_solved", report, solution)
        if self.fail_after_solves is not None and len(self.named("layer_solved")) == self.fail_after_solves:
            raise KeyboardInterrupt  # as a user's Ctrl-C would, mid-run

    def named(self, kind):
        return [event for event in self.events if event[0] == kind]

    def outline(self):
        """The events with layers and blocks by name: ``("solved", name)``, ``("block", i)``..."""
        short = {"layer_solved": "solved", "layer_resumed": "resumed"}
        lines = []
        for kind, *args in self.events:
            if kind in short:
                lines.append((short[kind], args[0].name))
            elif kind in ("block_started", "block_finished"):
                lines.append((kind, args[0], args[1]))
            elif kind == "layers_calibrated":
                lines.append((kind, args[0]))
            else:
                lines.append((kind,))
        return lines


def _recorder(event):
    def record(self, *args):
        self._record(event, *args)
    return record


for _event in ("run_started", "block_started", "layers_calibrated", "layer_resumed", "block_finished",
               "run_finished", "run_failed"):
    setattr(Recording, _event, _recorder(_event))


def expected_sequential(done=()):
    """The outline of a sequential run of :data:`RECIPE` on the random BERT, layer granularity,
    in this process; the layers ``done`` are taken from the journal."""
    lines = [("run_started",)]
    for index, block in enumerate(BLOCKS):
        lines.append(("block_started", index, block))
        for group in GROUPS:
            names = tuple(f"{block}.{name}" for name in group)
            lines.append(("layers_calibrated", names))
            lines += [("resumed", name) for name in names if name in done]
            lines += [("solved", name) for name in names if name not in done]
        lines.append(("block_finished", index, block))
    return lines + [("run_finished",)]


def check_run(observer, report, *, blocks, resumed=0):
    """What every run's events say: the run's plan, blocks and layers first, each layer once,
    the reports those of the run's report, all in the caller's thread."""
    _, plan, started_blocks, layers, started_resumed = observer.events[0]
    assert plan is report.plan and started_blocks == blocks and started_resumed == resumed
    assert layers == tuple(layer.name for layer in report.layers)
    assert observer.events[-1] == ("run_finished", report)
    layer_events = observer.named("layer_solved") + observer.named("layer_resumed")
    assert sorted(event[1].name for event in layer_events) == sorted(layers)
    by_name = {layer.name: layer for layer in report.layers}
    for _, layer, *solution in layer_events:
        assert layer == by_name[layer.name]
        if solution:
            assert solution[0].rel_error == layer.rel_error and solution[0].seconds == layer.seconds
    assert observer.threads == {threading.get_ident()}


def test_sequential_events_in_order():
    observer = Recording()
    report = compress_model(random_bert(), random_token_batches(), RECIPE, progress=False,
                            observer=observer)
    assert observer.outline() == expected_sequential()
    check_run(observer, report, blocks=BLOCKS)


def test_block_granularity_calibrates_a_block_at_once():
    observer = Recording()
    report = compress_model(random_bert(), random_token_batches(), RECIPE, granularity="block",
                            progress=False, observer=observer)
    calibrated = [event[1] for event in observer.named("layers_calibrated")]
    assert calibrated == [tuple(f"{block}.{name}" for group in GROUPS for name in group) for block in BLOCKS]
    check_run(observer, report, blocks=BLOCKS)


def test_one_shot_events():
    observer = Recording()
    report = compress_model(random_bert(), random_token_batches(), Recipe.single("wanda", density=0.5),
                            sequential=False, progress=False, observer=observer)
    names = tuple(layer.name for layer in report.layers)
    assert observer.outline() == [("run_started",), ("layers_calibrated", names),
                                  *[("solved", name) for name in names], ("run_finished",)]
    check_run(observer, report, blocks=())


@pytest.mark.parametrize("sequential", [True, False])
def test_events_with_a_thread_pool_come_in_the_callers_thread(sequential):
    observer = Recording()
    with ThreadPoolExecutor(2) as pool:
        report = compress_model(random_bert(), random_token_batches(), RECIPE, sequential=sequential,
                                executor=pool, progress=False, observer=observer)
    if sequential:  # within a group, the layers come as their solves finish
        expected = expected_sequential()
        outline = observer.outline()
        assert [line for line in outline if line[0] != "solved"] == \
            [line for line in expected if line[0] != "solved"]
        groups = [index for index, line in enumerate(outline) if line[0] == "layers_calibrated"]
        for index in groups:
            names = outline[index][1]
            assert sorted(outline[index + 1:index + 1 + len(names)]) == sorted(("solved", n) for n in names)
    check_run(observer, report, blocks=BLOCKS if sequential else ())


def test_events_with_a_process_pool():
    observer = Recording()
    recipe = Recipe.single("magnitude", density=0.5)
    with process_pool(2) as pool:
        report = compress_model(random_bert(), random_token_batches(), recipe, sequential=False,
                                executor=pool, progress=False, observer=observer)
    check_run(observer, report, blocks=())
    assert len(observer.named("layer_solved")) == 12


def test_interrupted_then_resumed_run(tmp_path):
    """An observer's exception ends the run (``run_failed``); the rerun takes the finished layers
    from the journal (``layer_resumed``) and solves the others."""
    failing = Recording(fail_after_solves=4)
    with pytest.raises(KeyboardInterrupt):
        compress_model(random_bert(), random_token_batches(), RECIPE, resume_dir=tmp_path,
                       progress=False, observer=failing)
    assert failing.events[-1][0] == "run_failed" and isinstance(failing.events[-1][1], KeyboardInterrupt)
    assert not failing.named("run_finished")
    done = [event[1].name for event in failing.named("layer_solved")]
    assert len(done) == 4

    resumed = Recording()
    model = random_bert()
    report = compress_model(model, random_token_batches(), RECIPE, resume_dir=tmp_path, progress=False,
                            observer=resumed)
    assert resumed.outline() == expected_sequential(done=done)
    check_run(resumed, report, blocks=BLOCKS, resumed=4)
    reference = random_bert()
    compress_model(reference, random_token_batches(), RECIPE, progress=False)
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def test_progress_bars_are_an_observer_beside_the_callers(tmp_path, capsys):
    compress_model(random_bert(), random_token_batches(), RECIPE, resume_dir=tmp_path, progress=False)
    observer = Recording()
    compress_model(random_bert(), random_token_batches(), RECIPE, resume_dir=tmp_path, observer=observer)
    printed = capsys.readouterr()
    assert f"resuming: 12 of 12 layers done in {tmp_path}" in printed.out
    assert "layers: 100%" in printed.err and "12/12" in printed.err
    assert len(observer.named("layer_resumed")) == 12 and not observer.named("layer_solved")


def test_observer_must_be_a_pipeline_observer():
    with pytest.raises(TypeError, match="observer must be None or a PipelineObserver, got function"):
        compress_model(random_bert(), random_token_batches(), RECIPE, observer=lambda *event: None)


# ------------------------------------------------------------------ the plan, given once


def test_the_plan_given_is_the_plan_used(monkeypatch):
    model, reference = random_bert(), random_bert()
    plan = compression_plan(model, RECIPE)
    derived = []
    memory_plan = pipeline_module.memory_plan

    def spy(*args, **kwargs):  # a plan that asks the device what it has, or takes a limit
        if kwargs["concurrent"] is not None or kwargs.get("memory_limit") is not None:
            derived.append(kwargs)
        return memory_plan(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "memory_plan", spy)
    report = compress_model(model, random_token_batches(), RECIPE, plan=plan, progress=False)
    assert report.plan is plan and not derived
    compress_model(reference, random_token_batches(), RECIPE, progress=False)
    assert len(derived) == 1  # without a plan, compress_model makes its own
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("made_with, message", [
    ({"recipe": Recipe.single("dsf", density=0.5)},
     r"plan was made for another recipe or model: it solves layer 'encoder.layer.0.attention.self.query' "
     r"with dsf .*, this run with sparsegpt"),
    ({"recipe": Recipe((Rule("sparsegpt", targets=("*.query",), density=0.5),))},
     r"plan covers other layers than this run compresses \(not in the plan: \['encoder.layer.0.attention"),
    ({"mix": 0.0}, r"plan counts 0 bytes of blocks held on cpu, this run holds \d+: it was made with "
                   "other blocks, sequential or mix"),
    ({"device": "meta"}, "plan was made for solves on meta, but this run solves on cpu"),
])
def test_a_plan_of_another_run_is_refused(made_with, message):
    model = random_bert()
    arguments = {"recipe": RECIPE, **made_with}
    plan = compression_plan(model, arguments.pop("recipe"), **arguments)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        compress_model(model, random_token_batches(), RECIPE, plan=plan, progress=False)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_plan_errors_name_the_argument():
    model = random_bert()
    plan = compression_plan(model, RECIPE)
    with pytest.raises(ValueError, match="plan and memory_limit were both given"):
        compress_model(model, random_token_batches(), RECIPE, plan=plan, memory_limit=2**30)
    with pytest.raises(TypeError, match="plan must be None or a MemoryPlan"):
        compress_model(model, random_token_batches(), RECIPE, plan=plan.solves)
    small = compression_plan(model, RECIPE, memory_limit=1)
    assert isinstance(small, MemoryPlan)
    with pytest.raises(MemoryError, match=r"\(memory_limit\)"):  # the given plan's limit is the limit
        compress_model(model, random_token_batches(), RECIPE, plan=small)


def test_the_command_passes_its_plan(tmp_path, monkeypatch, capsys):
    """``matfactor compress`` prints a plan and compresses under that plan, not another."""
    import matfactor.adapters as adapters

    made, given = [], []

    def planned(*args, **kwargs):
        made.append(compression_plan(*args, **kwargs))
        return made[-1]

    def compressed(*args, **kwargs):
        given.append(kwargs["plan"])
        return compress_model(*args, **kwargs)

    monkeypatch.setattr(adapters, "compression_plan", planned)
    monkeypatch.setattr(adapters, "compress_model", compressed)
    model = save_tiny_bert(tmp_path / "model")
    calibration = write_texts(tmp_path / "calibration.txt", 16, seed=1)
    main(["compress", "--model", str(model), "--method", "magnitude", "--density", "0.5", "--calibration",
          str(calibration), "--no-evaluate", "--workers", "1", "--out", str(tmp_path / "out")])
    assert len(made) == 1 and given == made
    printed = capsys.readouterr().out
    assert made[0].format_table() in printed and "12 layers (sequential, 2 blocks" in printed
