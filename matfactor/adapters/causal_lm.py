"""Causal language models: calibration windows and held-out perplexity.

Calibration follows SparseGPT (section 4, "Calibration data") and the papers after it
(Wanda, DSF, HASSLE-free, PIFA): ``N`` windows of ``L`` consecutive tokens, each starting at a
position drawn with a seed from the calibration text (they draw 128 windows of 2048 tokens from
C4). Here the calibration text is one token stream, the texts joined by blank lines.

Perplexity is measured as SparseGPT and Wanda evaluate WikiText-2: the held-out texts are
joined by blank lines and tokenized once, cut into non-overlapping windows of ``L`` tokens (the
incomplete last one dropped), and

    PPL = exp( Σ_windows Σ_t −log p(x_t | x_<t) / Σ_windows (L − 1) ),

the mean negative log-likelihood of every token predicted from its window's earlier tokens
(each window starts without context, as theirs do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from matfactor import _validation as check

__all__ = ["Perplexity", "calibration_windows", "check_seq_len", "context_length", "perplexity",
           "token_stream"]


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """The texts joined by blank lines as one 1-D tensor of token ids (no special tokens)."""
    if not texts:
        raise ValueError("texts is empty")
    # verbose=False: a stream longer than the model's context is the point, not a mistake
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def context_length(model: Any) -> int | None:
    """The longest sequence a model (or its ``transformers`` config) takes, or ``None``."""
    config = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(seq_len: Any, model: Any | None = None) -> int:
    """``seq_len`` checked to be an integer of at least 2 and at most ``model``'s context length
    (a model or its config; ``None``: not checked)."""
    seq_len = check.integer("seq_len", seq_len, minimum=2)
    limit = None if model is None else context_length(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context of {limit} tokens")
    return seq_len


def calibration_windows(tokenizer: Any, texts: list[str], *, n_windows: int = 64, seq_len: int = 256,
                        seed: int = 0, batch_size: int = 8, model: Any | None = None,
                        device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """``n_windows`` windows of ``seq_len`` tokens drawn with ``seed`` from ``texts``, in batches.

    Each window starts at a uniformly drawn position of :func:`token_stream` (windows may
    overlap, as SparseGPT's C4 windows may). The batches are dicts of ``input_ids`` and an
    all-ones ``attention_mask`` of shape ``(batch, seq_len)``, as
    :func:`~matfactor.adapters.compress_model` takes them.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    texts
        Calibration texts (joined by blank lines).
    n_windows, seq_len
        How many windows, of how many tokens (defaults 64 and 256: the command's defaults on a
        CPU; the papers use 128 × 2048).
    seed
        Seed of the window positions.
    batch_size
        Windows per batch.
    model
        If given, ``seq_len`` is checked against its context length.
    device
        Where the batches are put.

    Raises
    ------
    ValueError
        The text has fewer tokens than one window, or ``seq_len`` exceeds the model's context.
    """
    n_windows = check.integer("n_windows", n_windows, minimum=1)
    seq_len = check_seq_len(seq_len, model)
    seed = check.integer("seed", seed, minimum=0)
    batch_size = check.integer("batch_size", batch_size, minimum=1)
    stream = token_stream(tokenizer, texts)
    if stream.numel() < seq_len:
        raise ValueError(f"the calibration text has {stream.numel()} tokens, fewer than one window of "
                         f"seq_len={seq_len}: give more text or a shorter seq_len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (n_windows,), generator=generator)
    windows = torch.stack([stream[start:start + seq_len] for start in starts.tolist()])
    return [{"input_ids": chunk.to(device), "attention_mask": torch.ones_like(chunk).to(device)}
            for chunk in windows.split(batch_size)]


@dataclass(frozen=True)
class Perplexity:
    """Held-out perplexity of a causal LM and what it was measured on."""

    value: float
    n_windows: int
    seq_len: int
    n_tokens: int               # tokens predicted: n_windows · (seq_len − 1)

    def __str__(self) -> str:
        return (f"perplexity {self.value:.3f} on {self.n_windows} windows of {self.seq_len} tokens "
                f"({self.n_tokens:,} tokens predicted)")


def perplexity(model: Any, tokenizer: Any, texts: list[str], *, seq_len: int = 256,
               max_windows: int | None = None, batch_size: int = 4,
               device: str | torch.device | None = None, progress: bool = False,
               description: str = "perplexity") -> Perplexity:
    """Perplexity of a causal LM on non-overlapping windows of ``texts`` (module docstring).

    Parameters
    ----------
    model
        A causal LM whose forward takes ``input_ids`` and returns ``logits`` (any Hugging Face
        ``...ForCausalLM``, compressed or not).
    tokenizer
        Its tokenizer.
    texts
        The held-out texts, joined by blank lines into one stream.
    seq_len
        Tokens per window (default 256); at most the model's context length.
    max_windows
        Use only the first this many windows (``None``: all).
    batch_size
        Windows per forward pass.
    device
        Where the windows go (default: the device of the model's first parameter).
    progress, description
        A tqdm bar over the batches, labelled ``description``.

    Raises
    ------
    ValueError
        The text has fewer tokens than one window, ``seq_len`` exceeds the model's context, or
        the model gives a non-finite loss (its outputs hold NaN or infinity).
    """
    from tqdm.auto import tqdm

    seq_len = check_seq_len(seq_len, model)
    if max_windows is not None:
        max_windows = check.integer("max_windows", max_windows, minimum=1)
    batch_size = check.integer("batch_size", batch_size, minimum=1)
    stream = token_stream(tokenizer, texts)
    n_windows = stream.numel() // seq_len
    if n_windows == 0:
        raise ValueError(f"the held-out text has {stream.numel()} tokens, fewer than one window of "
                         f"seq_len={seq_len}: give more text or a shorter seq_len")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = stream[:n_windows * seq_len].view(n_windows, seq_len)
    if device is None:
        device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for chunk in tqdm(windows.split(batch_size), desc=description, unit="batch", disable=not progress,
                          leave=False):
            chunk = chunk.to(device)
            logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     chunk[:, 1:].reshape(-1), reduction="sum")
            total += loss.double().cpu()
    n_tokens = n_windows * (seq_len - 1)
    mean = float(total) / n_tokens
    if not math.isfinite(mean):
        raise ValueError(f"the model's loss on the held-out text is {mean}: its outputs are not finite")
    return Perplexity(math.exp(mean), n_windows, seq_len, n_tokens)
