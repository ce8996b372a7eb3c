"""Calibration statistics from forward hooks: Gram matrices ``H = XᵀX`` and MPIFA's two streams.

:class:`CalibrationHooks` registers a forward hook on each layer to compress. Each time a layer
runs, its input is turned into the rows ``X`` of its matrix problem
(:func:`matfactor.adapters.layers.layer_inputs`), padding positions are dropped when a token
mask is set for the batch, and ``XᵀX`` is added to the layer's accumulator in float32 (or
float64 on request), with the count of samples.

Layers that read the very same input tensor in a forward pass (a transformer's query, key and
value projections; a gated MLP's gate and up projections) share one accumulator: they have the
same ``H``, so it is accumulated and stored once. Sharing is decided on the first batch, by
tensor identity, and checked on every later batch.

Two modes:

- ``"gram"``: accumulate ``H`` (every method but MPIFA);
- ``"capture"`` then ``"streams"``: for MPIFA's error-accumulation-aware reconstruction, the same
  batch runs first through the dense stream (the layer inputs are captured), then through the
  compressed stream, whose hook feeds both to a :class:`matfactor.ReconstructionStatistics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from matfactor import ReconstructionStatistics

from .layers import layer_inputs

__all__ = ["CalibrationHooks", "GramAccumulator", "LayersObserved"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class LayersObserved(Exception):
    """Raised by the hooks with ``stop_when_observed`` once every observed layer has run."""


@dataclass
class GramAccumulator:
    """A running ``H = Σ XᵀX`` over calibration batches and its sample count."""

    H: torch.Tensor | None = None
    n_samples: int = 0

    def update(self, X: torch.Tensor, dtype: torch.dtype) -> None:
        X = X.to(dtype)
        if self.H is None:
            self.H = torch.zeros((X.shape[1], X.shape[1]), dtype=dtype, device=X.device)
        self.H.addmm_(X.T, X)
        self.n_samples += int(X.shape[0])


class CalibrationHooks:
    """Forward hooks that collect the calibration statistics of a set of layers.

    Use as a context manager around the forward passes; call :meth:`begin_batch` before each
    batch with its token mask (or ``None``).

    Parameters
    ----------
    layers
        ``{name: module}`` of the layers to observe (Linear, HF Conv1D, Conv2d).
    dtype
        ``"float32"`` (default, as SparseGPT and llm-compressor) or ``"float64"``: the
        accumulation dtype of ``H``.
    streams
        Collect MPIFA's two-stream statistics for these layer names (a subset of ``layers``)
        in addition to ``H``.
    dense_layers
        For two-stream statistics: ``{name: module}`` of the same layers in a dense copy of the
        block, which the dense stream runs through in ``"capture"`` mode.
    stop_when_observed
        Raise :class:`LayersObserved` as soon as every observed layer has run in the batch, so
        that the caller can skip the rest of the forward pass. Only for layers known to run
        once per forward pass (a later call would be missed).
    """

    def __init__(self, layers: dict[str, nn.Module], *, dtype: str = "float32",
                 streams: frozenset[str] = frozenset(),
                 dense_layers: dict[str, nn.Module] | None = None,
                 stop_when_observed: bool = False) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"gram_dtype must be 'float32' or 'float64', got {dtype!r}")
        self.layers = layers
        self.dense_layers = dense_layers or {}
        self.stop_when_observed = stop_when_observed
        self.dtype = _DTYPES[dtype]
        self.streams = streams
        self.mode = "gram"
        self._owner: dict[str, str] = {}          # layer name -> layer whose accumulator it shares
        self._accumulators: dict[str, GramAccumulator] = {}
        self._statistics: dict[str, ReconstructionStatistics] = {}
        self._batch_inputs: dict[str, torch.Tensor] = {}
        self._captured: dict[str, torch.Tensor] = {}
        self._token_mask: torch.Tensor | None = None
        self._first_batch = True
        self._order: list[str] = []               # layers in the order they first ran
        self._handles: list[Any] = []

    def __enter__(self) -> CalibrationHooks:
        for layers in (self.layers, self.dense_layers):
            for name, module in layers.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        # drop the module references: the statistics outlive the layers they were taken from
        self.layers = dict.fromkeys(self.layers)
        self.dense_layers = dict.fromkeys(self.dense_layers)
        self._batch_inputs.clear()
        self._captured.clear()

    def begin_batch(self, token_mask: torch.Tensor | None, mode: str = "gram") -> None:
        """Start a batch: its boolean ``(batch, sequence)`` mask of real tokens, and the mode.

        ``mode`` is ``"gram"``, ``"capture"`` (dense stream of a two-stream batch: store the
        inputs of the ``streams`` layers) or ``"streams"`` (compressed stream of the same batch:
        accumulate ``H`` and the two-stream statistics).
        """
        if self._batch_inputs:
            self._first_batch = False
        self._batch_inputs.clear()
        if mode != "streams":
            self._captured.clear()
        self._token_mask = None if token_mask is None else token_mask.bool()
        self.mode = mode

    def _rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        mask = self._token_mask
        if mask is not None and not isinstance(module, nn.Conv2d) and tuple(x.shape[:-1]) == tuple(mask.shape):
            x = x[mask.to(x.device)]  # padding positions are not calibration samples
        return layer_inputs(module, x)

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0]
            if name not in self._order:
                self._order.append(name)
            owner = self._shared_with(name, x)
            self._batch_inputs[name] = x
            if owner is not None:
                self._stop_if_observed()
                return  # its accumulator and captured rows are the owner's
            rows = self._rows(module, x).to(self.dtype)
            if self.mode == "capture":
                self._captured[name] = rows
            elif name in self._statistics_names():  # H is the statistics' own
                statistics = self._statistics.setdefault(name, ReconstructionStatistics(
                    dtype="float64" if self.dtype == torch.float64 else "float32"))
                if self.mode == "streams":
                    statistics.update(self._captured[name], rows)
                else:  # one stream: the layer's inputs are the same in the dense model
                    statistics.update(rows)
            else:
                self._accumulators.setdefault(name, GramAccumulator()).update(rows, self.dtype)
            self._stop_if_observed()
        return hook

    def _stop_if_observed(self) -> None:
        observed = self.dense_layers if self.mode == "capture" else self.layers
        if self.stop_when_observed and all(name in self._batch_inputs for name in observed):
            raise LayersObserved

    def _statistics_names(self) -> set[str]:
        return {self._owner.get(name, name) for name in self.streams}

    def _shared_with(self, name: str, x: torch.Tensor) -> str | None:
        """The layer whose accumulator ``name`` shares for input ``x`` (``None``: its own)."""
        if self._first_batch:
            for other, seen in self._batch_inputs.items():
                if seen is x and other != name:
                    self._owner[name] = self._owner.get(other, other)
                    break
            return self._owner.get(name)
        owner = self._owner.get(name)
        if owner is not None and self._batch_inputs.get(owner) is not x:
            raise RuntimeError(f"calibration: layer {name!r} read the same input as {owner!r} in the "
                               "first batch but not in this one; the model's forward pass changes "
                               "between batches")
        return owner

    def gram(self, name: str) -> tuple[torch.Tensor, int]:
        """``(H, n_samples)`` of layer ``name`` (shared with the layers that read its input)."""
        key = self._owner.get(name, name)
        if key in self._statistics:
            return self._statistics[key].H, self._statistics[key].n_samples
        accumulator = self._accumulators.get(key)
        if accumulator is None or accumulator.H is None:
            raise RuntimeError(f"calibration: layer {name!r} never ran during the calibration "
                               "forward passes, so it has no statistics; check that it is used by "
                               "the model's forward pass, or exclude it with the recipe's 'ignore' list")
        return accumulator.H, accumulator.n_samples

    def statistics(self, name: str) -> ReconstructionStatistics:
        """MPIFA's two-stream statistics of layer ``name`` (collected in ``"streams"`` mode)."""
        key = self._owner.get(name, name)
        if key not in self._statistics:
            raise RuntimeError(f"calibration: no two-stream statistics for layer {name!r}")
        return self._statistics[key]

    def groups(self) -> list[list[str]]:
        """The observed layers in groups that read one input, groups in the order they ran."""
        groups: dict[str, list[str]] = {}
        for name in self._order:
            groups.setdefault(self._owner.get(name, name), []).append(name)
        return list(groups.values())
