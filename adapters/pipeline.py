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

MPIFA needs the inputs of each layer in both the dense and the compressed model: with an
``mpifa`` rule, sequential mode carries a second stream of block inputs through the dense
blocks (twice the activation memory).

Layers are replaced in place and a replaced dense layer is freed at once; the only copy of
dense weights is the one block that carries the dense stream while it is compressed (with
``mix > 0`` or MPIFA).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from matfactor import _validation as check

from .calibration import CalibrationHooks, LayersObserved
from .layers import is_compressible, weight_matrix
from .methods import METHODS, LayerSolution, solve_layer
from .modules import compressed_module, replace_module
from .recipe import Recipe, Rule

__all__ = ["CompressionReport", "LayerReport", "compress_model", "find_blocks"]

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
        lines.extend(self.notes)
        return "\n".join(lines)


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
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _token_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
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


def _solve_and_replace(model: nn.Module, hooks: CalibrationHooks,
                       targets: dict[str, tuple[Rule, int | None]], names: list[str],
                       device: Any, mix: float, seed: int, progress: Any) -> list[LayerReport]:
    reports = []
    for name in names:
        rule, block = targets[name]
        module = model.get_submodule(name)
        W = weight_matrix(module, name).to(device)
        W = W.to(torch.float64 if W.dtype == torch.float64 else torch.float32)
        H, n_samples = hooks.gram(name)
        H = H.to(W.dtype)
        statistics = hooks.statistics(name) if name in hooks.streams else None
        arguments = dict(rule.arguments)
        target = W
        if METHODS[rule.method].needs_streams:
            arguments.setdefault("mix", mix)
        elif statistics is not None and mix > 0:
            # error-accumulation correction for every method (PIFA section 4, eq. 7): approximate
            # the weight whose output on the compressed stream best matches the mixed target
            target = statistics.target_weight(W, mix)
        solution: LayerSolution = solve_layer(
            name, target, H, statistics, rule.method, density=rule.density, rank=rule.rank,
            pattern=rule.pattern, arguments=arguments, seed=seed)
        compression = {"method": rule.method, "arguments": arguments,
                       "pattern": solution.budget.pattern, "density": solution.budget.density,
                       "rank": solution.budget.rank, "rel_error": solution.rel_error}
        replace_module(model, name, compressed_module(module, solution.result, compression=compression))
        reports.append(LayerReport(name, block, tuple(W.shape), rule.method, solution.rel_error,
                                   W.shape[0] * W.shape[1], solution.params_after, solution.seconds,
                                   n_samples))
        progress.update(1)
        progress.set_postfix_str(f"{name}: error {solution.rel_error:.4f}")
    return reports


def compress_model(model: nn.Module, calibration: Iterable[Any], recipe: Recipe, *,
                   blocks: str | list[nn.Module] = "auto", sequential: bool = True,
                   device: str | torch.device | None = None, offload: bool = True,
                   granularity: str = "layer", mix: float = 0.5, gram_dtype: str = "float32",
                   seed: int = 0, progress: bool = True) -> CompressionReport:
    """Compress ``model`` in place following ``recipe``, calibrated on ``calibration``.

    Parameters
    ----------
    model
        A torch model (a Hugging Face ``PreTrainedModel`` or any ``nn.Module``).
    calibration
        Batches the model is called with: dicts of tensors (``model(**batch)``, e.g. a
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
        Seed of the randomized methods: the same seed gives the same model.
    progress
        Show tqdm progress bars (blocks, and layers within a block).

    Returns
    -------
    CompressionReport
        Per layer: name, shape, method, relative layer error, parameters before and after, time.
    """
    from tqdm.auto import tqdm

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
    start = time.perf_counter()
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    storage = torch.device("cpu") if offload else device
    if blocks == "auto":
        block_list = find_blocks(model) if sequential or _findable(model) else []
    elif blocks is None and not sequential:
        block_list = []
    else:
        block_list = _named_blocks(model, blocks)
    block_names = [name for name, _ in block_list]
    targets = _targets(model, recipe, block_names, sequential)
    streams = frozenset(name for name, (rule, _) in targets.items()
                        if METHODS[rule.method].needs_streams or (sequential and mix > 0))
    params_before = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(targets), desc="layers", unit="layer", disable=not progress)
    try:
        with torch.no_grad():
            if sequential:
                reports = _sequential(model, block_list, batches, targets, streams, device, storage,
                                      gram_dtype, granularity, mix, seed, bar, tqdm, progress)
            else:
                reports = _one_shot(model, batches, targets, streams, device, gram_dtype, mix, seed, bar)
    finally:
        bar.close()
        model.train(was_training)
    report = CompressionReport(reports, "sequential" if sequential else "one-shot", len(block_list),
                               len(batches), time.perf_counter() - start, params_before)
    report.model_params_after = params_before - report.params_before + report.params_after
    starved = [layer.name for layer in reports if layer.n_samples < layer.shape[0]]
    if starved:
        report.notes.append(f"note: {len(starved)} layers (e.g. {starved[0]}) saw fewer calibration samples "
                            "than inputs, so their H is singular and the solves fit the calibration "
                            "data closely; give more calibration text")
    return report


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
                device: Any, storage: Any, gram_dtype: str, granularity: str, mix: float, seed: int,
                bar: Any,
                tqdm: Any, progress: bool) -> list[LayerReport]:
    inputs = _capture_first_inputs(model, blocks, batches, storage)
    for item in inputs:
        item.dense_hidden = item.args[0] if streams else None
    reports: list[LayerReport] = []
    for index, (block_name, block) in enumerate(tqdm(blocks, desc="blocks", unit="block",
                                                      disable=not progress, leave=False)):
        home = next(block.parameters(), torch.empty(0)).device
        block.to(device)
        remaining = [name for name, (_, block_index) in targets.items() if block_index == index]
        # MPIFA's dense stream runs through a dense copy of the block while it is compressed
        dense_block = copy.deepcopy(block) if streams else None
        plan: list[list[str]] | None = None
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
            group = plan.pop(0)
            reports += _solve_and_replace(model, hooks, targets, group, device, mix, seed, bar)
            remaining = [name for name in remaining if name not in group]
            block = model.get_submodule(block_name)  # the block itself may have been replaced
        for item in inputs:
            if dense_block is not None:
                item.dense_hidden = item.call(dense_block, device, item.dense_hidden).to(storage)
            output = item.call(block, device).to(storage)   # the compressed block feeds the next
            item.args = (output,) + tuple(item.args[1:])
        dense_block = None  # freed before the next block is copied
        block.to(home)
    return reports


def _one_shot(model: nn.Module, batches: list[Any], targets: dict[str, tuple[Rule, int | None]],
              streams: frozenset[str], device: Any, gram_dtype: str, mix: float, seed: int,
              bar: Any) -> list[LayerReport]:
    layers = {name: model.get_submodule(name) for name in targets}
    with CalibrationHooks(layers, dtype=gram_dtype, streams=streams) as hooks:
        for batch in batches:
            hooks.begin_batch(_token_mask(batch))
            _run(model, batch)
    del layers
    return _solve_and_replace(model, hooks, targets, list(targets), device, mix, seed, bar)
