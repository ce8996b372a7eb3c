"""Compress a whole model: blocks, sequential calibration, layer solves, module surgery.

:func:`compress_model` follows the pipeline of SparseGPT, DSF and llm-compressor's one-shot
mode:

1. **Blocks.** The model's repeated layers (BERT ``encoder.layer``, Llama ``model.layers``,
   GPT-2 ``transformer.h``, found from the class names Hugging Face lists in
   ``_no_split_modules``) or a list of modules given by the caller. Each block must feed the
   next: the output of block ``i`` is the input of block ``i + 1`` (checked on the first batch).
2. **Inputs of the first block.** Each calibration batch runs through the model up to the first
   block, whose positional and keyword arguments (hidden states, attention masks, rotary
   embeddings, ...) are captured and the forward pass is stopped there.
3. **Block by block** (sequential mode, the default): the block runs on its stored inputs with
   hooks that accumulate every target layer's ``H = XᵀX``
   (:class:`~matfactor.adapters.calibration.CalibrationHooks`); each layer problem is solved and
   the layer is replaced by its compressed module; the *compressed* block then runs again to
   produce the next block's inputs. So each block is calibrated on what the compressed
   predecessors really give it. Only one block's inputs are held at a time, on the CPU when
   ``offload=True`` while the block runs on ``device``.
4. **One-shot mode** (``sequential=False``), for comparison: every ``H`` comes from one pass of
   the dense model, and all layers are then compressed.
5. **Block refinement** (a recipe's ``refine``, :mod:`~matfactor.adapters.refinement`): once a
   block's layers are solved, its stored values are optimised so that the block, fed its
   inputs (the compressed predecessors' outputs; in one-shot mode the dense model's), gives the
   dense model's outputs of that block; in sequential mode the refined block then produces the
   next block's inputs. It runs in this process, on ``device``, and needs the dense stream
   (the dense model's inputs and outputs of each block, carried through a dense copy of the
   block as for ``mix``).

MPIFA needs the inputs of each layer in both the dense and the compressed model: with an
``mpifa`` rule, sequential mode carries a second stream of block inputs through the dense
blocks (twice the activation memory).

Layers are replaced in place and a replaced dense layer is freed at once; the only copy of
dense weights is the one block that carries the dense stream while it is compressed (with
``mix > 0`` or MPIFA).

Where the solves run. The layers whose statistics are collected together (a group in
sequential mode, every layer in one-shot mode) are independent problems: they are shipped to an
``executor`` (:mod:`~matfactor.adapters.executors`: a process pool, Dask, Ray) as
:class:`~matfactor.adapters.executors.LayerTask` s, with a fixed number of threads each, so that
the model does not depend on the engine or its number of workers. With ``resume_dir``, each
finished layer is recorded as it returns (:mod:`~matfactor.adapters.journal`), and a rerun takes
it instead of solving it. Before anything runs, the memory plan (:func:`compression_plan`,
:mod:`~matfactor.adapters.memory`) refuses a run whose largest solve cannot fit; a caller that
has made the plan already (to print it, as the ``matfactor`` command does) passes it as
``plan=``.

What a run does is told to a :class:`PipelineObserver` as it happens (the run, each block,
each group of layers calibrated together, each layer solved or taken from the journal): the
progress bars of ``progress=True`` are one.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import sys
import time
from concurrent.futures import BrokenExecutor, Executor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from matfactor import _validation as check

from .calibration import CalibrationHooks, LayersObserved
from ._storage import CheckpointError, packed_module
from .executors import LayerTask, run_task
from .journal import RunJournal, finished_layers, run_identity
from .layers import is_compressible, weight_matrix
from .memory import MemoryPlan, PlannedSolve, memory_plan
from .methods import METHODS, LayerSolution
from .modules import UnfoldedConv2d, compressed_module, replace_module
from .recipe import Recipe, Rule
from .refinement import Refinement, RefinementReport, refine_block

__all__ = ["CompressionReport", "LayerReport", "PipelineObserver", "compress_model", "compression_plan",
           "find_blocks"]

#: Where Hugging Face models keep their repeated blocks, tried when ``_no_split_modules`` does
#: not identify them.
_BLOCK_PATHS = ("encoder.layer", "model.layers", "transformer.h", "model.decoder.layers",
                "encoder.layers", "decoder.layers", "layers", "h", "blocks")


@dataclass(frozen=True)
class LayerReport:
    """What happened to one layer."""

    name: str
    block: int | None
    shape: tuple[int, int]          # (d_in, d_out) of its matrix problem
    method: str
    rel_error: float                # tr(DᵀHD) / tr(WᵀHW) on its calibration inputs
    params_before: int
    params_after: int
    seconds: float
    n_samples: int                  # calibration rows behind its H


@dataclass
class CompressionReport:
    """The per-layer report of :func:`compress_model` and its totals."""

    layers: list[LayerReport]
    mode: str                       # "sequential" or "one-shot"
    n_blocks: int
    n_batches: int
    seconds: float = 0.0
    model_params_before: int = 0
    model_params_after: int = 0
    notes: list[str] = field(default_factory=list)
    plan: MemoryPlan | None = None
    resumed: int = 0                # layers taken from the journal of an interrupted run
    refinements: list[RefinementReport] = field(default_factory=list)   # one per refined block

    @property
    def params_before(self) -> int:
        """Dense parameters of the compressed layers."""
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Stored values of the compressed layers."""
        return sum(layer.params_after for layer in self.layers)

    def format_table(self) -> str:
        """The report as a text table, one row per layer, then the totals."""
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'method':<16}{'rel. error':>11}"
                 f"{'params':>10}{'kept':>8}{'time [s]':>10}"]
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            kept = layer.params_after / layer.params_before
            lines.append(f"{layer.name:<{width}}  {shape:>11}  {layer.method:<16}{layer.rel_error:>11.5f}"
                         f"{layer.params_after:>10}{kept:>8.3f}{layer.seconds:>10.2f}")
        before, after = self.params_before, self.params_after
        lines.append(f"{len(self.layers)} layers ({self.mode}, {self.n_blocks} blocks, {self.n_batches} "
                     f"calibration batches): parameters {before:,} -> {after:,} "
                     f"({after / max(before, 1):.3f}); whole model {self.model_params_before:,} -> "
                     f"{self.model_params_after:,}; {self.seconds:.1f} s")
        if self.refinements:
            kept = [r for r in self.refinements if r.kept]
            before = sum(r.loss_before for r in self.refinements) / len(self.refinements)
            after = sum(r.loss_after for r in self.refinements) / len(self.refinements)
            lines.append(f"block refinement: {self.refinements[0].steps} steps on each of "
                         f"{len(self.refinements)} blocks ({len(kept)} kept), mean block loss "
                         f"{before:.5f} -> {after:.5f}, "
                         f"{sum(r.seconds for r in self.refinements):.1f} s")
        if self.resumed:
            lines.append(f"{self.resumed} of these layers were finished by an earlier, interrupted run")
        lines.extend(self.notes)
        return "\n".join(lines)


class PipelineObserver:
    """What a :func:`compress_model` run does, told as it happens: for progress displays, logs
    and measurements.

    Subclass it and override the events of interest (each method here does nothing), then pass
    an instance as ``compress_model(..., observer=...)``. Every event is called in the thread
    that called :func:`compress_model`, also when the solves run in other processes (an
    ``executor``): a layer's event comes once its solution is back and the layer is replaced.
    An exception raised by an event ends the run as any error does.

    The order of the events of a sequential run::

        run_started
        block_started                      for each block, in order
            layers_calibrated              for each group of layers calibrated together
                layer_resumed/layer_solved for each layer of the group, as each is done
            block_refined                  with a recipe's ``refine``
        block_finished
        run_finished, or run_failed

    A one-shot run has no block events but ``block_refined``, and one ``layers_calibrated`` with
    every layer.
    """

    def run_started(self, plan: MemoryPlan, blocks: tuple[str, ...], layers: tuple[str, ...],
                    resumed: int) -> None:
        """The arguments and the memory plan are checked; nothing is changed yet.

        Parameters
        ----------
        plan
            The memory plan of the run (:func:`compression_plan`).
        blocks
            The blocks compressed one after the other, in order: a :meth:`block_started` comes
            for each. Empty in one-shot mode.
        layers
            The layers to compress.
        resumed
            How many of them an earlier run recorded in ``resume_dir`` (each comes as a
            :meth:`layer_resumed`).
        """

    def block_started(self, index: int, name: str) -> None:
        """Block ``blocks[index]``, named ``name``, is about to be calibrated and compressed."""

    def layers_calibrated(self, layers: tuple[str, ...]) -> None:
        """The calibration statistics of ``layers`` are collected; their solves begin.

        In sequential mode with ``granularity="layer"``, one group of a block (the layers that
        read one input); with ``"block"``, a whole block's layers; in one-shot mode, every layer.
        """

    def layer_resumed(self, report: LayerReport) -> None:
        """A layer was taken from the journal of an earlier run instead of solved.

        ``report`` is the earlier run's (its ``seconds`` are that run's solve).
        """

    def layer_solved(self, report: LayerReport, solution: LayerSolution) -> None:
        """A layer was solved and replaced by its compressed module.

        Parameters
        ----------
        report
            Its line of the run's report: ``report.seconds`` is the time of the solve itself,
            wherever it ran.
        solution
            The solve's result (:class:`~matfactor.adapters.methods.LayerSolution`), on the CPU
            when a worker solved it.
        """

    def block_refined(self, index: int, name: str, report: RefinementReport) -> None:
        """Block ``blocks[index]``, named ``name``, was refined (or taken refined from the
        journal of an earlier run); ``report`` says how its loss changed."""

    def block_finished(self, index: int, name: str) -> None:
        """Block ``blocks[index]`` is compressed and its outputs are the next block's inputs."""

    def run_finished(self, report: CompressionReport) -> None:
        """The run ended; ``report`` is what :func:`compress_model` returns."""

    def run_failed(self, error: BaseException) -> None:
        """The run ends with ``error`` (raised by :func:`compress_model` after this returns)."""


class _Observers(PipelineObserver):
    """Several observers, each told every event, in the order given."""

    def __init__(self, observers: list[PipelineObserver]) -> None:
        self._observers = observers


def _broadcast(event: str) -> Callable[..., None]:
    def tell(self: _Observers, *args: Any) -> None:
        for observer in self._observers:
            getattr(observer, event)(*args)
    tell.__name__ = event
    return tell


for _event in ("run_started", "block_started", "layers_calibrated", "layer_resumed", "layer_solved",
               "block_refined", "block_finished", "run_finished", "run_failed"):
    setattr(_Observers, _event, _broadcast(_event))


class _ProgressBars(PipelineObserver):
    """The tqdm bars of ``progress=True``: the layers (left on screen at the end) and, in
    sequential mode, the blocks (cleared at the end)."""

    def __init__(self, resume_dir: Any) -> None:
        self._resume_dir = resume_dir
        self._n_blocks = 0
        self._layers: Any = None
        self._blocks: Any = None

    def run_started(self, plan: MemoryPlan, blocks: tuple[str, ...], layers: tuple[str, ...],
                    resumed: int) -> None:
        from tqdm.auto import tqdm

        if resumed:
            tqdm.write(f"resuming: {resumed} of {len(layers)} layers done in {self._resume_dir}")
        self._layers = tqdm(total=len(layers), desc="layers", unit="layer")
        self._n_blocks = len(blocks)

    def block_started(self, index: int, name: str) -> None:
        if self._blocks is None:
            from tqdm.auto import tqdm

            self._blocks = tqdm(total=self._n_blocks, desc="blocks", unit="block", leave=False)

    def layer_resumed(self, report: LayerReport) -> None:
        self._layers.update(1)

    def layer_solved(self, report: LayerReport, solution: LayerSolution) -> None:
        self._layers.update(1)
        self._layers.set_postfix_str(f"{report.name}: error {report.rel_error:.4f}")

    def block_refined(self, index: int, name: str, report: RefinementReport) -> None:
        self._layers.set_postfix_str(f"{name}: refined, block loss {report.loss_before:.4f} -> "
                                     f"{report.loss_after:.4f}")

    def block_finished(self, index: int, name: str) -> None:
        self._blocks.update(1)
        if index + 1 == self._n_blocks:
            self._close_blocks()

    def run_finished(self, report: CompressionReport) -> None:
        self._close()

    def run_failed(self, error: BaseException) -> None:
        self._close()

    def _close_blocks(self) -> None:
        if self._blocks is not None:
            self._blocks.close()
            self._blocks = None

    def _close(self) -> None:
        self._close_blocks()
        if self._layers is not None:
            self._layers.close()


class _FirstBlockReached(Exception):
    """Raised by the pre-hook of the first block to stop a calibration forward pass there."""


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of a Hugging Face encoder or decoder, in order.

    First the ``nn.ModuleList`` whose children are all of a class the model lists in
    ``_no_split_modules`` (Hugging Face's own name for its repeated layer), then the usual paths
    (``encoder.layer``, ``model.layers``, ``transformer.h``, ...).

    Raises
    ------
    ValueError
        If no block list is found; pass ``blocks=[...]`` to :func:`compress_model`.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 \
                and all(type(child).__name__ in no_split for child in module):
            candidates.append((name, module))
    if not candidates:
        for path in _BLOCK_PATHS:
            module = model.get_submodule(path) if _has_submodule(model, path) else None
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                candidates.append((path, module))
                break
    if not candidates:
        raise ValueError(f"no repeated blocks found in {type(model).__name__} (looked for a ModuleList "
                         f"of its _no_split_modules classes and at {list(_BLOCK_PATHS)}); pass "
                         "blocks=[...] (modules that feed each other in order) or use one-shot mode")
    name, blocks = max(candidates, key=lambda item: len(item[1]))
    return [(f"{name}.{index}", block) for index, block in enumerate(blocks)]


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _move(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it (nested in tuples, lists, dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(item, device) for item in value)
    if isinstance(value, list):
        return [_move(item, device) for item in value]
    if isinstance(value, dict):
        return {key: _move(item, device) for key, item in value.items()}
    return value


def _run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding
        if "use_cache" not in batch and "use_cache" in inspect.signature(model.forward).parameters:
            # a decoder's key/value cache is inference state, and a calibration pass has none
            batch = {**batch, "use_cache": False}
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _token_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def _hidden(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class _BlockInputs:
    """The stored inputs of the current block for one calibration batch."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None
    dense_hidden: torch.Tensor | None = None   # the dense stream's hidden states (MPIFA)

    def call(self, block: nn.Module, device: Any, hidden: torch.Tensor | None = None) -> torch.Tensor:
        args = _move(self.args, device)
        if hidden is not None:
            args = (hidden.to(device),) + tuple(args[1:])
        return _hidden(block(*args, **_move(self.kwargs, device)))


def _observe(item: _BlockInputs, block: nn.Module, device: Any, hidden: torch.Tensor | None = None) -> None:
    """Run ``block`` on ``item`` for its hooks, stopping where they say all is observed."""
    try:
        item.call(block, device, hidden)
    except LayersObserved:
        pass


def _capture_first_inputs(model: nn.Module, blocks: list[tuple[str, nn.Module]], batches: list[Any],
                          storage: Any) -> list[_BlockInputs]:
    """Run each batch up to the first block and keep that block's arguments.

    The first batch runs the whole model, with hooks checking that each block's output is the
    next block's input; later batches stop at the first block.
    """
    captured: list[_BlockInputs] = []
    chain: list[tuple[str, Any, Any]] = []
    state = {"stop": False}

    def first_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        args, kwargs = _without_cache(args, kwargs)
        captured.append(_BlockInputs(_move(args, storage), _move(kwargs, storage), None))
        if state["stop"]:
            raise _FirstBlockReached

    def chain_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            chain.append((name, args[0] if args else None, _hidden(output)))
        return hook

    handles = [blocks[0][1].register_forward_pre_hook(first_pre_hook, with_kwargs=True)]
    handles += [block.register_forward_hook(chain_hook(name)) for name, block in blocks]
    try:
        for index, batch in enumerate(batches):
            state["stop"] = index > 0
            before = len(captured)
            try:
                _run(model, batch)
            except _FirstBlockReached:
                pass
            if len(captured) != before + 1:
                raise ValueError(f"the first block {blocks[0][0]!r} ran {len(captured) - before} times "
                                 "in one forward pass; blocks must run once each, in order")
            if not captured[-1].args:
                raise ValueError(f"the first block {blocks[0][0]!r} received its hidden states as a "
                                 "keyword argument; pass them positionally or give other blocks")
            captured[-1].token_mask = _token_mask(batch)
            if index == 0:
                _check_chain(blocks, chain)
                chain.clear()
                for handle in handles[1:]:
                    handle.remove()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _without_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block's arguments with any key/value cache replaced by ``None``.

    The stored inputs are replayed through each block many times (once per group of layers,
    then for the next block's inputs); a decoder block given a cache appends its keys and values
    to it on every call, so that each replay would attend to the tokens of the earlier ones (and
    fail on the first attention mask, whose length no longer matches). Decoders pass the cache
    positionally (GPT-2) or by keyword (Llama), so both are cleaned.
    """
    def clean(value: Any) -> Any:
        return None if _is_cache(value) else value

    return tuple(clean(value) for value in args), {key: clean(value) for key, value in kwargs.items()}


def _is_cache(value: Any) -> bool:
    transformers = sys.modules.get("transformers")
    cache_type = getattr(getattr(transformers, "cache_utils", None), "Cache", None)
    return cache_type is not None and isinstance(value, cache_type)


def _check_chain(blocks: list[tuple[str, nn.Module]], chain: list[tuple[str, Any, Any]]) -> None:
    order = [name for name, _, _ in chain]
    if order != [name for name, _ in blocks]:
        raise ValueError(f"the blocks ran in the order {order}, expected each of "
                         f"{[name for name, _ in blocks]} once, in order")
    for (name, _, output), (next_name, next_input, _) in zip(chain, chain[1:]):
        if not (isinstance(next_input, torch.Tensor) and isinstance(output, torch.Tensor)
                and next_input.shape == output.shape and torch.equal(next_input, output)):
            raise ValueError(f"block {next_name!r} does not read the output of block {name!r}: "
                             "sequential calibration needs blocks that feed each other directly")


def _targets(model: nn.Module, recipe: Recipe, block_names: list[str],
             sequential: bool) -> dict[str, tuple[Rule, int | None]]:
    """Every layer a rule applies to: ``{name: (rule, block index or None)}``.

    Modules are looked up by name when they are needed, never held here: a replaced dense
    layer must be freed as soon as its compressed module is in place.
    """
    targets = {}
    for name, module in model.named_modules():
        if not is_compressible(module):
            continue
        block = next((index for index, prefix in enumerate(block_names)
                      if name == prefix or name.startswith(prefix + ".")), None)
        rule = recipe.rule_for(name, in_block=block is not None)
        if rule is None:
            continue
        if block is None and sequential:
            raise ValueError(f"layer {name!r} is outside the blocks {block_names[0]!r}...; sequential "
                             "mode compresses layers inside blocks only: use one-shot mode or "
                             "add it to the recipe's 'ignore' list")
        weight_matrix(module, name)  # refuses unsupported layers (grouped convolutions) up front
        targets[name] = (rule, block)
    if not targets:
        raise ValueError("the recipe selects no layer of the model: check its targets and ignore "
                         "patterns against the module names (model.named_modules())")
    return targets


@dataclass
class _Solves:
    """How the layer solves of a run are done: where, with how many threads, recorded where, and
    who is told."""

    executor: Executor | None       # None: in this process
    threads: int
    device: torch.device
    mix: float
    seed: int
    journal: RunJournal | None
    observer: PipelineObserver
    refine: Refinement | None = None

    def run(self, tasks: list[LayerTask]) -> Iterator[tuple[LayerTask, LayerSolution]]:
        """Solve ``tasks``, yielding each with its solution as it completes."""
        if self.executor is None:
            for task in tasks:
                yield task, run_task(task)
            return
        futures = {self.executor.submit(run_task, task): task for task in tasks}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BrokenExecutor as lost:
            done = 0 if self.journal is None else finished_layers(self.journal.directory)
            where = f"; {done} finished layers are recorded in {self.journal.directory}: run again " \
                "to resume" if done else ""
            raise RuntimeError(f"a worker died while solving {', '.join(t.name for t in tasks)} "
                               f"({type(lost).__name__}: {lost}){where}") from lost
        finally:
            for future in futures:
                future.cancel()


def _layer_task(model: nn.Module, hooks: CalibrationHooks, targets: dict[str, tuple[Rule, int | None]],
                name: str, solves: _Solves) -> tuple[LayerTask, int]:
    """The solve of layer ``name`` (its weight or error-corrected target, ``H`` or MPIFA's
    statistics, and its rule, shipped to the CPU when a worker solves it), and the number of
    calibration samples behind its ``H``."""
    rule, _ = targets[name]
    W = weight_matrix(model.get_submodule(name), name).to(solves.device)
    W = W.to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    H, n_samples = hooks.gram(name)
    H = H.to(W.dtype)
    statistics = hooks.statistics(name) if name in hooks.streams else None
    arguments = dict(rule.arguments)
    target = W
    method = METHODS[rule.method]
    if method.takes_mix:  # the method corrects the error accumulation itself (MPIFA)
        arguments.setdefault("mix", solves.mix)
    elif statistics is not None and solves.mix > 0:
        # error-accumulation correction for every method (PIFA section 4, eq. 7): approximate
        # the weight whose output on the compressed stream best matches the mixed target
        target = statistics.target_weight(W, solves.mix)
    if not method.needs_streams:
        statistics = None
    if solves.executor is not None:  # workers get CPU tensors and move them to the solve device
        cpu = torch.device("cpu")
        target, H = target.to(cpu), H.to(cpu)
        statistics = None if statistics is None else statistics.to_device(cpu)
    task = LayerTask(name, target, H, statistics, rule.method, rule.density, rule.rank, rule.pattern,
                     arguments, solves.seed, solves.threads, str(solves.device))
    return task, n_samples


def _solve_and_replace(model: nn.Module, hooks: CalibrationHooks,
                       targets: dict[str, tuple[Rule, int | None]], names: list[str],
                       solves: _Solves) -> list[LayerReport]:
    """Compress the layers ``names`` (independent problems), each replaced as its solve returns.

    A layer the journal has finished is taken from it instead of solved; every new module goes
    through its stored form (:func:`~matfactor.adapters._storage.packed_module`), so that the
    model continues exactly as a resumed run's would, whether or not a journal keeps it.
    """
    solves.observer.layers_calibrated(tuple(names))
    reports: dict[str, LayerReport] = {}
    tasks, n_samples = [], {}
    for name in names:
        finished = solves.journal.finished(name) if solves.journal is not None else None
        if finished is None:
            task, n_samples[name] = _layer_task(model, hooks, targets, name, solves)
            tasks.append(task)
            continue
        module, report = finished
        replace_module(model, name, _like(module, model.get_submodule(name)))
        reports[name] = LayerReport(**{**report, "shape": tuple(report["shape"])})
        solves.observer.layer_resumed(reports[name])
    for task, solution in solves.run(tasks):
        reports[task.name] = _install(model, task, solution, targets[task.name][1], n_samples[task.name],
                                      solves.journal)
        solves.observer.layer_solved(reports[task.name], solution)
    return [reports[name] for name in names]


def _like(module: nn.Module, layer: nn.Module) -> nn.Module:
    """``module`` on ``layer``'s device and in its training mode."""
    return module.to(next(layer.parameters()).device).train(layer.training)


def _install(model: nn.Module, task: LayerTask, solution: LayerSolution, block: int | None,
             n_samples: int, journal: RunJournal | None) -> LayerReport:
    """Replace layer ``task.name`` by its compressed module, recorded in ``journal``; the dense
    layer is not referenced once this returns, so that it is freed while other solves run."""
    compression = {"method": task.method, "arguments": task.arguments,
                   "pattern": solution.budget.pattern, "density": solution.budget.density,
                   "rank": solution.budget.rank, "rel_error": solution.rel_error}
    module = compressed_module(model.get_submodule(task.name), solution.result, compression=compression)
    d_in, d_out = task.W.shape
    report = LayerReport(task.name, block, (d_in, d_out), task.method, solution.rel_error, d_in * d_out,
                         solution.params_after, solution.seconds, n_samples)
    if journal is not None:
        module = journal.record(task.name, module, dataclasses.asdict(report))
    else:
        module = packed_module(task.name, module)[2]
    replace_module(model, task.name, module)
    return report


def compress_model(model: nn.Module, calibration: Iterable[Any], recipe: Recipe, *,
                   blocks: str | list[nn.Module] = "auto", sequential: bool = True,
                   device: str | torch.device | None = None, offload: bool = True,
                   granularity: str = "layer", mix: float = 0.5, gram_dtype: str = "float32",
                   seed: int = 0, executor: Executor | None = None, threads: int = 1,
                   resume_dir: str | os.PathLike[str] | None = None, restart: bool = False,
                   memory_limit: int | None = None, plan: MemoryPlan | None = None,
                   progress: bool = True, observer: PipelineObserver | None = None) -> CompressionReport:
    """Compress ``model`` in place following ``recipe``, calibrated on ``calibration``.

    Parameters
    ----------
    model
        A torch model (a Hugging Face ``PreTrainedModel`` or any ``nn.Module``).
    calibration
        Batches the model is called with: mappings of tensors (``model(**batch)``, e.g. a
        tokenizer's output; its ``attention_mask`` marks the real tokens, padding positions are
        not calibration samples), tuples (``model(*batch)``) or tensors (``model(batch)``).
    recipe
        Which layers, which method, which budget (:class:`~matfactor.adapters.recipe.Recipe`).
    blocks
        ``"auto"`` (:func:`find_blocks`) or the list of block modules, in the order they run,
        each feeding the next (e.g. ``list(cnn.children())`` for a ``Sequential``).
    sequential
        Calibrate each block on the compressed predecessors' outputs (default); ``False``:
        one-shot, every Gram from the dense model (then layers outside blocks can be targets,
        and ``blocks`` may be ``None``).
    device
        Where the blocks and the solves run (default: where the model is). With a GPU here and
        the model on the CPU, each block moves to the GPU while it is processed.
    offload
        Keep the stored block inputs on the CPU between uses (default), not on ``device``.
    granularity
        Sequential mode within a block: ``"layer"`` (default; SparseGPT's "true sequential")
        compresses the layers that read one input (query/key/value, then the attention
        output, ...) one group at a time, in the order they run, each calibrated on the outputs
        of the compressed earlier groups; ``"block"`` calibrates all of a block's layers on one
        pass of its dense weights.
    mix
        Error-accumulation correction in sequential mode, ``λ`` in [0, 1] (PIFA paper,
        section 4, eq. 7, applied to every method): each layer approximates, under the
        compressed stream's ``H``, the weight whose output best matches
        ``λ·(dense model's output) + (1 − λ)·(dense weight on the compressed stream)``
        (:meth:`matfactor.ReconstructionStatistics.target_weight`). ``0`` is SparseGPT's plain
        sequential calibration; it needs a second stream of block inputs through a dense copy
        of each block. Default 0.5, the best of 0, 0.25, 0.5 and 1 for SparseGPT at density 0.5
        on all-MiniLM-L6-v2 (guide). MPIFA gets it as its own ``mix`` unless the recipe sets one.
    gram_dtype
        ``"float32"`` (default) or ``"float64"``: accumulation dtype of ``H``.
    seed
        Seed of the randomized methods: the same seed (and ``threads``) gives the same model.
    executor
        Where the layer solves run: ``None`` (default) in this process, or any
        :class:`concurrent.futures.Executor` (:mod:`matfactor.adapters.executors`: a local
        process pool, a Dask or a Ray executor). The layers whose
        statistics are collected together (a group of the sequential mode, every layer in
        one-shot mode) are solved concurrently; each task carries only the layer's weight, its
        ``H`` (or MPIFA's statistics), the method and its arguments, and returns the factors.
        Blocks are still processed in order.
    threads
        Torch intra-op threads of each layer solve (default 1), wherever it runs. The numbers
        depend on it (parallel sums add in another order), not on the executor nor its number
        of workers: the same seed and ``threads`` give the same model.
    resume_dir
        Record each finished layer in this directory as it completes, and take the layers a
        previous run of the same model, calibration, recipe and options finished there
        (:class:`~matfactor.adapters.journal.RunJournal`): an interrupted run continues where it
        stopped and ends with the same model as an uninterrupted one.
    restart
        With ``resume_dir``: discard a previous run there instead of refusing a different one.
    memory_limit
        Bytes one layer solve may use on its device. ``None``: without an executor, the memory
        the solve device has available now; with one, no limit is checked (the pools of
        :func:`~matfactor.adapters.executors.open_pool` know theirs). A run with a layer whose
        solve needs more (:func:`compression_plan`) is refused before anything runs.
    plan
        The memory plan of this run made beforehand (:func:`compression_plan` of the same
        model, recipe, ``blocks``, ``sequential``, ``device`` and ``mix``), to check and report
        instead of making one here: what it says a solve may use is the limit (so it comes
        without ``memory_limit``). A plan whose layers, solves or device are not this run's is
        refused.
    progress
        Show tqdm progress bars (the layers, and the blocks in sequential mode).
    observer
        Told what the run does as it happens (:class:`PipelineObserver`), besides the
        progress bars.

    Returns
    -------
    CompressionReport
        Per layer: name, shape, method, relative layer error, parameters before and after, time;
        and the memory plan.

    Raises
    ------
    MemoryError
        A layer solve needs more than ``memory_limit`` or than ``plan`` allows (nothing has been
        changed then).
    ValueError
        ``plan`` is not the plan of this run, or comes with ``memory_limit``.
    RunMismatchError
        ``resume_dir`` holds a run of another model, calibration, recipe or options.
    RuntimeError
        A worker of ``executor`` died (the finished layers are in ``resume_dir``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a matfactor.adapters.Recipe, got {type(recipe).__name__}")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: give at least one batch")
    granularity = check.choice("granularity", granularity, ("layer", "block"))
    mix = check.real("mix", mix, minimum=0.0, maximum=1.0)
    progress = check.flag("progress", progress)
    sequential = check.flag("sequential", sequential)
    offload = check.flag("offload", offload)
    seed = check.integer("seed", seed, minimum=0)
    threads = check.integer("threads", threads, minimum=1)
    restart = check.flag("restart", restart)
    if executor is not None and not callable(getattr(executor, "submit", None)):
        raise TypeError(f"executor must be None or a concurrent.futures.Executor, got "
                        f"{type(executor).__name__}")
    if plan is not None and not isinstance(plan, MemoryPlan):
        raise TypeError(f"plan must be None or a MemoryPlan (compression_plan), got {type(plan).__name__}")
    if plan is not None and memory_limit is not None:
        raise ValueError("plan and memory_limit were both given: a plan carries its limit (give "
                         "memory_limit to compression_plan instead)")
    if observer is not None and not isinstance(observer, PipelineObserver):
        raise TypeError(f"observer must be None or a PipelineObserver, got {type(observer).__name__}")
    start = time.perf_counter()
    device = _solve_device(model, device)
    storage = torch.device("cpu") if offload else device
    block_list, targets = _selection(model, recipe, blocks, sequential)
    block_names = [name for name, _ in block_list]
    streams = frozenset(name for name, (rule, _) in targets.items()
                        if METHODS[rule.method].needs_streams or (sequential and mix > 0))
    if recipe.refine is not None and not block_list:
        raise ValueError("the recipe's refine needs the model's blocks (blocks='auto' found none): "
                         "give blocks=[...] or drop refine")
    resident = _resident_bytes(model, block_list, device, sequential, bool(streams),
                               recipe.refine is not None)
    if plan is None:
        plan = memory_plan(model, targets, device=device, concurrent=1 if executor is None else None,
                           memory_limit=memory_limit, resident=resident)
    else:  # what this run's solves need, without asking the device what it has
        _check_plan(plan, memory_plan(model, targets, device=device, concurrent=None, resident=resident),
                    list(targets))
    plan.check()
    journal = None
    if resume_dir is not None:
        options = {"sequential": sequential, "granularity": granularity, "mix": mix,
                   "gram_dtype": gram_dtype, "seed": seed, "threads": threads,
                   "device": device.type, "blocks": block_names}
        journal = RunJournal(resume_dir, run_identity(model, batches, recipe.to_dict(), options),
                             restart=restart)
    params_before = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    resumed = 0 if journal is None else journal.finished_count(list(targets))
    bars = [_ProgressBars(None if journal is None else journal.directory)] if progress else []
    observers = _Observers(bars + ([] if observer is None else [observer]))
    solves = _Solves(executor, threads, device, mix, seed, journal, observers, recipe.refine)
    try:
        observers.run_started(plan, tuple(block_names) if sequential else (), tuple(targets), resumed)
        with torch.no_grad():
            if sequential:
                reports, refinements = _sequential(model, block_list, batches, targets, streams,
                                                   storage, gram_dtype, granularity, solves)
            else:
                reports, refinements = _one_shot(model, block_list, batches, targets, streams, storage,
                                                 gram_dtype, solves)
    except BaseException as error:
        if journal is not None:
            journal.discard_if_empty()
        observers.run_failed(error)
        raise
    finally:
        model.train(was_training)
    report = CompressionReport(reports, "sequential" if sequential else "one-shot", len(block_list),
                               len(batches), time.perf_counter() - start, params_before, plan=plan,
                               resumed=resumed, refinements=refinements)
    report.model_params_after = params_before - report.params_before + report.params_after
    starved = [layer.name for layer in reports if layer.n_samples < layer.shape[0]]
    if starved:
        report.notes.append(f"note: {len(starved)} layers (e.g. {starved[0]}) saw fewer calibration samples "
                            "than inputs, so their H is singular and the solves fit the calibration "
                            "data closely; give more calibration text")
    observers.run_finished(report)
    return report


def _check_plan(plan: MemoryPlan, needed: MemoryPlan, layers: list[str]) -> None:
    """Refuse a ``plan`` given to :func:`compress_model` that is not the plan of its run, whose
    solves and held blocks are ``needed`` (a plan without a limit) for ``layers``, in order."""
    if plan.device != needed.device:
        raise ValueError(f"plan was made for solves on {plan.device}, but this run solves on "
                         f"{needed.device}")

    def solve(row: PlannedSolve) -> str:
        return (f"{row.method} ({row.pattern}, W {row.shape[0]}x{row.shape[1]} {row.dtype}, "
                f"{row.live} live bytes)")

    # compared layer by layer: a plan's rows group the layers by rule, and rules that differ (in
    # density, say) may need the same memory
    given = {layer: solve(row) for row in plan.solves for layer in row.layers}
    wanted = {layer: solve(row) for row in needed.solves for layer in row.layers}
    if given.keys() != wanted.keys():
        missing, extra = sorted(wanted.keys() - given.keys()), sorted(given.keys() - wanted.keys())
        raise ValueError(f"plan covers other layers than this run compresses (not in the plan: "
                         f"{missing[:3]}, not in the run: {extra[:3]}): it was made for another model "
                         "or recipe")
    for layer in layers:
        if given[layer] != wanted[layer]:
            raise ValueError(f"plan was made for another recipe or model: it solves layer {layer!r} "
                             f"with {given[layer]}, this run with {wanted[layer]}")
    if plan.resident != needed.resident:
        raise ValueError(f"plan counts {plan.resident} bytes of blocks held on {plan.device}, this run "
                         f"holds {needed.resident}: it was made with other blocks, sequential or mix")


def _solve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _selection(model: nn.Module, recipe: Recipe, blocks: str | list[nn.Module] | None,
               sequential: bool) -> tuple[list[tuple[str, nn.Module]], dict[str, tuple[Rule, int | None]]]:
    """The named blocks and the target layers (:func:`_targets`) of a run."""
    if blocks == "auto":
        block_list = find_blocks(model) if sequential or _findable(model) else []
    elif blocks is None and not sequential:
        block_list = []
    else:
        block_list = _named_blocks(model, blocks)
    return block_list, _targets(model, recipe, [name for name, _ in block_list], sequential)


def compression_plan(model: nn.Module, recipe: Recipe, *, blocks: str | list[nn.Module] = "auto",
                     sequential: bool = True, device: str | torch.device | None = None,
                     concurrent: int | None = 1, memory_limit: int | None = None,
                     mix: float = 0.5) -> MemoryPlan:
    """The memory plan of :func:`compress_model` with these arguments, before it runs.

    Parameters
    ----------
    model, recipe, blocks, sequential, device, memory_limit, mix
        As for :func:`compress_model`.
    concurrent
        Solves that run at once on ``device``: 1 in this process (default), the number of
        workers of a local pool; ``None`` for a remote executor (then only ``memory_limit`` is
        checked).

    Returns
    -------
    MemoryPlan
        Per method, shape and dtype, the peak memory of one layer solve; and what one solve may
        use (:meth:`~matfactor.adapters.memory.MemoryPlan.check` refuses it if it does not fit).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a matfactor.adapters.Recipe, got {type(recipe).__name__}")
    sequential = check.flag("sequential", sequential)
    mix = check.real("mix", mix, minimum=0.0, maximum=1.0)
    block_list, targets = _selection(model, recipe, blocks, sequential)
    if concurrent is not None:
        concurrent = check.integer("concurrent", concurrent, minimum=1)
    device = _solve_device(model, device)
    dense_stream = any(METHODS[rule.method].needs_streams or (sequential and mix > 0)
                       for rule, _ in targets.values())
    resident = _resident_bytes(model, block_list, device, sequential, dense_stream, recipe.refine is not None)
    return memory_plan(model, targets, device=device, concurrent=concurrent, memory_limit=memory_limit,
                       resident=resident)


def _resident_bytes(model: nn.Module, blocks: list[tuple[str, nn.Module]], device: torch.device,
                    sequential: bool, dense_stream: bool, refine: bool) -> int:
    """Bytes the pipeline holds on ``device`` besides the solves.

    Each block is moved to ``device`` while it is processed (the sequential onloading of
    llm-compressor: a model larger than the device goes through one block at a time), so the
    largest block counts once when some of the model's weights live elsewhere; the dense copy of
    the block that carries the dense stream (``mix``, MPIFA, refinement) counts once more. Block
    refinement adds, at most, a gradient and Adam's two moments per stored value: three times
    the largest block, bounded by its dense size (the activations of one batch's backward pass
    are not counted, as no forward pass's are). Already-resident weights are not counted: they
    are not part of what the device has available.
    """
    if not blocks or not (sequential or refine):
        return 0
    largest = max(sum(t.numel() * t.element_size() for t in (*block.parameters(), *block.buffers()))
                  for _, block in blocks)
    if not sequential:  # one-shot: only the refinement, on the blocks where they are
        return 3 * largest
    moved = not all(_same_device(p.device, device) for p in model.parameters())
    return largest * (int(moved) + int(dense_stream or refine) + 3 * int(refine))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _findable(model: nn.Module) -> bool:
    try:
        find_blocks(model)
    except ValueError:
        return False
    return True


def _named_blocks(model: nn.Module, blocks: Any) -> list[tuple[str, nn.Module]]:
    if isinstance(blocks, nn.Module) or not isinstance(blocks, (list, tuple)) or not blocks:
        raise ValueError(f"blocks must be 'auto' or a non-empty list of the model's modules, got {blocks!r}")
    names = {id(module): name for name, module in model.named_modules()}
    named = []
    for index, block in enumerate(blocks):
        if not isinstance(block, nn.Module) or id(block) not in names:
            raise ValueError(f"blocks[{index}] is not a submodule of the model")
        named.append((names[id(block)], block))
    return named


def _sequential(model: nn.Module, blocks: list[tuple[str, nn.Module]], batches: list[Any],
                targets: dict[str, tuple[Rule, int | None]], streams: frozenset[str],
                storage: Any, gram_dtype: str, granularity: str, solves: _Solves,
                ) -> tuple[list[LayerReport], list[RefinementReport]]:
    device = solves.device
    inputs = _capture_first_inputs(model, blocks, batches, storage)
    # the dense model's stream of block inputs: for MPIFA and mix, and the refinement's targets
    dense_stream = bool(streams) or solves.refine is not None
    for item in inputs:
        item.dense_hidden = item.args[0] if dense_stream else None
    reports: list[LayerReport] = []
    refinements: list[RefinementReport] = []
    # The groups of a block, by the block's class and its target layers' names within it: the
    # repeated blocks of a model share them, so that only the first block of each kind needs the
    # full pass that finds them (the other blocks' passes stop at each group).
    known_plans: dict[tuple[type, tuple[str, ...]], list[list[str]]] = {}
    for index, (block_name, block) in enumerate(blocks):
        solves.observer.block_started(index, block_name)
        home = next(block.parameters(), torch.empty(0)).device
        block.to(device)
        remaining = [name for name, (_, block_index) in targets.items() if block_index == index]
        block_layers = list(remaining)
        # the dense stream runs through a dense copy of the block while it is compressed
        dense_block = copy.deepcopy(block) if dense_stream else None
        refined = _refined_from_journal(model, block_name, block_layers, solves)
        if refined is not None:
            reports += _resumed_reports(block_layers, solves)
            refinements.append(refined)
            solves.observer.block_refined(index, block_name, refined)
            remaining = []
            block = model.get_submodule(block_name)
        kind = (type(block), tuple(_relative(name, block_name) for name in remaining))
        plan: list[list[str]] | None = None
        if granularity == "layer" and kind in known_plans:
            plan = [[f"{block_name}.{name}" if name else block_name for name in group]
                    for group in known_plans[kind]]
        while remaining:
            observed = remaining if plan is None else plan[0]
            block_streams = streams & set(observed)
            dense_layers = {name: dense_block.get_submodule(name.removeprefix(block_name).removeprefix("."))
                            for name in block_streams}
            layers = {name: model.get_submodule(name) for name in observed}
            # once the order is known, a pass stops when its group has run: the rest of the
            # block's forward pass would be thrown away
            with CalibrationHooks(layers, dtype=gram_dtype, streams=block_streams,
                                  dense_layers=dense_layers, stop_when_observed=plan is not None) as hooks:
                for item in inputs:
                    if block_streams:
                        hooks.begin_batch(item.token_mask, "capture")
                        _observe(item, dense_block, device, item.dense_hidden)
                        hooks.begin_batch(item.token_mask, "streams")
                    else:
                        hooks.begin_batch(item.token_mask)
                    _observe(item, block, device)
            del layers
            if plan is None:
                for name in remaining:
                    hooks.gram(name)  # a layer that never ran is an error naming it
                # layer granularity: compress the layers that read one input, in the order they
                # run, each group calibrated on the outputs of the compressed earlier ones
                plan = hooks.groups() if granularity == "layer" else [list(remaining)]
                if granularity == "layer":
                    known_plans[kind] = [[_relative(name, block_name) for name in group] for group in plan]
            group = plan.pop(0)
            reports += _solve_and_replace(model, hooks, targets, group, solves)
            remaining = [name for name in remaining if name not in group]
            block = model.get_submodule(block_name)  # the block itself may have been replaced
        if dense_block is not None:
            for item in inputs:
                item.dense_hidden = item.call(dense_block, device, item.dense_hidden).to(storage)
        dense_block = None  # freed before the next block is copied
        if solves.refine is not None and refined is None:
            refinements.append(_refine(model, index, block_name, block_layers, inputs,
                                       [item.dense_hidden for item in inputs], device, solves))
            block = model.get_submodule(block_name)
        for item in inputs:
            output = item.call(block, device).to(storage)   # the compressed block feeds the next
            item.args = (output,) + tuple(item.args[1:])
        block.to(home)
        solves.observer.block_finished(index, block_name)
    return reports, refinements


def _refine(model: nn.Module, index: int, block_name: str, layers: list[str], inputs: list[_BlockInputs],
            targets: list[torch.Tensor], device: Any, solves: _Solves,
            hidden: list[torch.Tensor] | None = None) -> RefinementReport:
    """Refine block ``block_name`` (:func:`~matfactor.adapters.refinement.refine_block`) on
    ``inputs`` (with ``hidden`` as their hidden states, if given) towards ``targets``, and put
    its refined ``layers`` through their stored form, recorded in the journal if there is one
    (so that the model continues as a resumed run's would)."""
    block = model.get_submodule(block_name)

    def run(batch: int) -> torch.Tensor:
        return inputs[batch].call(block, device, None if hidden is None else hidden[batch])

    report = refine_block(block, run, targets, [item.token_mask for item in inputs], solves.refine,
                          name=block_name, seed=solves.seed + index)
    modules = {name: model.get_submodule(name) for name in layers}
    for module in modules.values():  # its compression record says how it was refined
        inner = module.linear if isinstance(module, UnfoldedConv2d) else module
        inner.compression = {**inner.compression, "refine": {**solves.refine.to_dict(), "kept": report.kept}}
    if solves.journal is not None:
        rebuilt = solves.journal.record_block(block_name, modules, dataclasses.asdict(report))
    else:
        rebuilt = {name: packed_module(name, module)[2] for name, module in modules.items()}
    for name, module in rebuilt.items():
        replace_module(model, name, _like(module, modules[name]))
    solves.observer.block_refined(index, block_name, report)
    return report


def _refined_from_journal(model: nn.Module, block_name: str, layers: list[str], solves: _Solves,
                          ) -> RefinementReport | None:
    """Block ``block_name``'s refined ``layers`` installed from the journal of an earlier run,
    and its refinement report; ``None`` (nothing done) if the journal has not refined it."""
    if solves.refine is None or solves.journal is None:
        return None
    refined = solves.journal.refined_block(block_name)
    if refined is None:
        return None
    modules, refinement = refined
    if sorted(modules) != sorted(layers):
        raise CheckpointError(f"the refined block {block_name!r} in {solves.journal.directory} holds "
                              f"the layers {sorted(modules)}, this run compresses {sorted(layers)}; "
                              "restart the run")
    for name in layers:
        replace_module(model, name, _like(modules[name], model.get_submodule(name)))
    return RefinementReport(**refinement)


def _resumed_reports(layers: list[str], solves: _Solves) -> list[LayerReport]:
    """The journal's reports of the solves of ``layers`` (of a refined block), each told to the
    observer as resumed."""
    reports = []
    for name in layers:
        finished = solves.journal.finished(name)
        if finished is None:
            raise CheckpointError(f"layer {name!r} of a refined block has no recorded solve in "
                                  f"{solves.journal.directory}; restart the run")
        report = finished[1]
        reports.append(LayerReport(**{**report, "shape": tuple(report["shape"])}))
        solves.observer.layer_resumed(reports[-1])
    return reports


def _relative(name: str, block_name: str) -> str:
    """A layer's name inside its block (``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``)."""
    return name.removeprefix(block_name).removeprefix(".")


def _one_shot(model: nn.Module, blocks: list[tuple[str, nn.Module]], batches: list[Any],
              targets: dict[str, tuple[Rule, int | None]], streams: frozenset[str], storage: Any,
              gram_dtype: str, solves: _Solves) -> tuple[list[LayerReport], list[RefinementReport]]:
    if solves.refine is not None:
        # the dense model's inputs of every block (and the last one's outputs), before any layer
        # is compressed: each block is refined on its dense inputs towards its dense outputs
        inputs = _capture_first_inputs(model, blocks, batches, storage)
        stream = [[item.args[0] for item in inputs]]
        for _, block in blocks:
            where = next(block.parameters()).device
            stream.append([item.call(block, where, hidden).to(storage)
                           for item, hidden in zip(inputs, stream[-1])])
    layers = {name: model.get_submodule(name) for name in targets}
    with CalibrationHooks(layers, dtype=gram_dtype, streams=streams) as hooks:
        for batch in batches:
            hooks.begin_batch(_token_mask(batch))
            _run(model, batch)
    del layers
    reports = _solve_and_replace(model, hooks, targets, list(targets), solves)
    refinements: list[RefinementReport] = []
    if solves.refine is None:
        return reports, refinements
    for index, (block_name, block) in enumerate(blocks):
        block_layers = [name for name, (_, block_index) in targets.items() if block_index == index]
        if not block_layers:
            continue
        refined = _refined_from_journal(model, block_name, block_layers, solves)
        if refined is not None:
            refinements.append(refined)
            solves.observer.block_refined(index, block_name, refined)
            continue
        where = next(model.get_submodule(block_name).parameters()).device
        refinements.append(_refine(model, index, block_name, block_layers, inputs, stream[index + 1],
                                   where, solves, hidden=stream[index]))
    return reports, refinements
