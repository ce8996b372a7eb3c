"""Checkpoints of compressed models: packed safetensors weights and a manifest, validated on load.

A checkpoint is a directory:

``config.json``
    For a Hugging Face model (``transformers.PreTrainedModel``): ``model.config.save_pretrained``,
    with one addition that makes ``transformers`` refuse the directory (see *Foreign loaders*).
``generation_config.json``
    For a model that generates (a causal LM's ``model.generation_config``): its decoding
    defaults and special tokens, which :func:`load_compressed` puts back, so that the loaded
    model's ``generate`` behaves as the original's.
tokenizer files
    When a tokenizer is given (``tokenizer.save_pretrained``): ``AutoTokenizer.from_pretrained``
    reads the directory.
``matfactor.safetensors``
    Every tensor (:data:`WEIGHTS_NAME`; ``model.safetensors`` in checkpoints of format version 1,
    which still load). The model's state dict outside the compressed modules, under its usual names
    (a tensor tied to another one is stored once and listed as an alias); each compressed
    module's tensors under ``<module name>.<tensor>``, a sparse one packed as
    ``<module name>.<tensor>.values`` and ``<module name>.<tensor>.bitmask``.
``matfactor.json``
    The manifest (:data:`MANIFEST_NAME`), written last and atomically (a temporary file, then
    ``os.replace``), after any previous one was removed: a directory whose saving did not finish
    has no manifest, and loading it fails.

Packing. A sparse matrix (a :class:`~matfactor.adapters.modules.SparseLinear` or
:class:`~matfactor.adapters.modules.SparseConv2d` weight, a double sparse ``A`` and ``B``, the
sparse part of a sparse plus low-rank layer) is stored as its nonzeros in row-major order (of the
tensor as the module holds it), in its own dtype, and a bitmask of its shape, one bit per element
in row-major order, most significant bit first (``numpy.packbits``), ``uint8``. With ``b`` bytes
per value that is ``density·b + 1/8`` bytes per element: at density 0.5, 0.531 of the dense
bytes in float32 (``0.5 + 1/32``), 0.5625 in float16 and bfloat16 (``0.5 + 1/16``), 0.516 in
float64; packing beats dense storage below a density of ``1 − 1/(8b)`` (0.97 in float32, 0.94 in
half precision). A double sparse layer pays for two masks, ``d_in·k + k·d_out`` bits: a square
one at total density 0.5 takes ``0.5 + 1/(4b)`` of its dense bytes, 0.5625 in float32 and 0.625 in
half precision. Low-rank and PIFA factors are stored dense, pivot indices as ``int32``.

The manifest (``format`` :data:`FORMAT`, ``format_version`` :data:`FORMAT_VERSION`)::

    {"format", "format_version", "matfactor_version",
     "model_class": type(model).__name__, "architectures": config.architectures or null,
     "dtype": the dtype of the model's first floating-point parameter,
     "source": where the dense model came from (a path or built-in name) or null,
     "weights": {"file": "matfactor.safetensors", "sha256", "bytes"},
     "state": {key: {"shape", "dtype"}},          # the tensors outside the compressed modules
     "aliases": {key: stored key},                # tied tensors, stored once
     "modules": {module name: {
         "kind": "sparse_linear" | "double_sparse_linear" | "lowrank_linear" | "pifa_linear"
                 | "sparse_lowrank_linear" | "sparse_conv2d" | "unfolded_conv2d",
         "inner_kind": the linear kind inside an unfolded_conv2d, else null,
         "shape": [d_in, d_out], "dtype", "bias": bool,
         "conv": {"in_channels", "out_channels", "kernel_size", "stride", "padding",
                  "dilation"} or null,
         "pattern", "density", "compression", "n_params", "nnz" (null without sparse tensors),
         "dense_bytes", "stored_bytes",
         "tensors": {name: {"layout": "dense", "key", "shape", "dtype"}
                           | {"layout": "bitmask", "shape", "dtype", "nnz",
                              "values": {"key", "shape", "dtype"},
                              "bitmask": {"key", "shape", "dtype"}}}}}}

Foreign loaders. ``transformers``' ``from_pretrained`` cannot rebuild compressed modules: given
the directory of a version-1 checkpoint it reported the compressed layers' weights missing,
initialised them at random and returned a model whose embeddings had cosine 0.10 to the dense
one, with no error. So the weights file is not named as ``transformers`` looks for it, and
``config.json`` names, as its ``transformers_weights`` file, a sentence saying how to load the
directory: ``AutoModel*.from_pretrained`` and every model class's ``from_pretrained`` raise an
error that shows it (a ``transformers`` too old to read ``transformers_weights`` finds no weights
file and raises too). A ``quantization_config`` would not do: ``transformers`` skips an unknown
``quant_method`` with a warning and loads the model anyway. :func:`export_dense` writes a plain
dense copy that any loader reads.

Loading checks, each failure a :class:`CheckpointError` naming the file, tensor or module: the
manifest and weights file exist and parse; the weights' sha256 (a damaged file); every tensor of
the file is described by the manifest, once, with its shape and dtype, and none is missing;
bitmasks have as many set bits as there are values and none past the end; the compressed
modules' values are finite, their sparse parts meet their pattern and density, their pivots are
a permutation of the output channels; every manifest module exists in the model as a layer of
the same type, matrix shape and convolution geometry, and the remaining tensors match the
model's state dict. All of it is checked before the model is modified.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import matfactor

from .layers import is_compressible, weight_matrix
from ._storage import (
    CONV_KINDS,
    CheckpointError,
    Tensors,
    dtype_name,
    geometry,
    pack_module,
    rebuild_module,
    sha256,
    write_atomically,
)
from .modules import CompressedModule, replace_module

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "CheckpointSummary",
    "ModuleBytes",
    "checkpoint_source",
    "export_dense",
    "load_compressed",
    "save_compressed",
]

FORMAT = "matfactor-compressed"
FORMAT_VERSION = 2
MANIFEST_NAME = "matfactor.json"
WEIGHTS_NAME = "matfactor.safetensors"
#: The weights file of each format version this matfactor reads.
_WEIGHTS_FILES = {1: "model.safetensors", 2: WEIGHTS_NAME}
#: ``config.json``'s ``transformers_weights``: what ``transformers.from_pretrained`` shows when it
#: refuses the directory (see *Foreign loaders* in the module docstring).
FOREIGN_LOADER_MESSAGE = ("this is a matfactor checkpoint of compressed layers, which transformers "
                          "cannot load: load it with matfactor.adapters.load_compressed(path), or "
                          "write a dense copy that transformers loads with 'matfactor export "
                          "--compressed DIR --out DENSE_DIR' (matfactor.adapters.export_dense)")





@dataclass(frozen=True)
class ModuleBytes:
    """Storage of one compressed module's weight (biases excluded).

    Attributes
    ----------
    kind
        The module's kind in the manifest.
    dense_bytes
        ``d_in · d_out · itemsize``: the dense weight in the module's dtype.
    stored_bytes
        Bytes of the tensors stored for the weight: packed values and bitmasks, dense factors,
        pivot indices.
    """

    kind: str
    dense_bytes: int
    stored_bytes: int

    @property
    def ratio(self) -> float:
        """``stored_bytes / dense_bytes``."""
        return self.stored_bytes / self.dense_bytes


@dataclass(frozen=True)
class CheckpointSummary:
    """What :func:`save_compressed` wrote.

    Attributes
    ----------
    path
        The checkpoint directory.
    modules
        Per compressed module name, its :class:`ModuleBytes`.
    file_bytes
        Size on disk of ``model.safetensors`` (everything, uncompressed parts included).
    """

    path: Path
    modules: dict[str, ModuleBytes]
    file_bytes: int

    @property
    def dense_bytes(self) -> int:
        """Total dense bytes of the compressed modules' weights."""
        return sum(entry.dense_bytes for entry in self.modules.values())

    @property
    def stored_bytes(self) -> int:
        """Total bytes stored for the compressed modules' weights."""
        return sum(entry.stored_bytes for entry in self.modules.values())

    @property
    def ratio(self) -> float:
        """``stored_bytes / dense_bytes`` over the compressed modules (NaN without any)."""
        return self.stored_bytes / self.dense_bytes if self.modules else math.nan


# --------------------------------------------------------------------------- helpers










def _compressed_modules(model: nn.Module) -> dict[str, CompressedModule]:
    """The outermost compressed modules of ``model`` by name (an UnfoldedConv2d, not its inner
    linear module)."""
    found: dict[str, CompressedModule] = {}
    for name, module in model.named_modules():
        if isinstance(module, CompressedModule) and not any(name.startswith(f"{outer}.")
                                                            for outer in found):
            if not name:
                raise ValueError("model is itself a compressed module; save a model that contains "
                                 "it (e.g. nn.Sequential(module))")
            found[name] = module
    return found


def _unshared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``tensors`` without shared memory, which safetensors refuses: of identical views (tied
    weights) the first is kept and the others become aliases of it; partial overlaps are copied."""
    views: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[torch.device, int]] = set()
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, tensor in tensors.items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = storage + (tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and view in views:
            aliases[key] = views[view]
            continue
        if tensor.numel() and storage in storages:
            tensor = tensor.clone()
        else:
            storages.add(storage)
            views[view] = key
        unique[key] = tensor
    return unique, aliases




def _guard_config(config_path: Path) -> None:
    """Name :data:`FOREIGN_LOADER_MESSAGE` as ``config.json``'s ``transformers_weights`` (which
    ``save_pretrained`` never writes), so that ``from_pretrained`` refuses the checkpoint."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["transformers_weights"] = FOREIGN_LOADER_MESSAGE
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_atomically(config_path, lambda target: target.write_text(text, encoding="utf-8"))








# --------------------------------------------------------------------------- saving












def save_compressed(model: nn.Module, path: str | os.PathLike[str], *,
                    tokenizer: Any | None = None, source: str | None = None) -> CheckpointSummary:
    """Save a model with compressed modules as a checkpoint directory (see the module docstring).

    Parameters
    ----------
    model
        Any ``nn.Module``; its :class:`~matfactor.adapters.modules.CompressedModule` submodules
        are packed, the rest of its state dict is stored as is. A Hugging Face model also gets
        its ``config.json``, so that :func:`load_compressed` can rebuild it without ``model=``.
    path
        The directory, created if needed. Files of an earlier checkpoint there are replaced.
    tokenizer
        Saved with its ``save_pretrained`` when given.
    source
        Where the dense model came from (a directory, a ``.gguf`` file or a built-in name),
        recorded in the manifest for ``matfactor evaluate`` to compare against.

    Returns
    -------
    CheckpointSummary
        Dense and stored bytes per compressed module, and the size of ``model.safetensors``.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``, or holds a compressed module of a type checkpoints
        do not know.
    ValueError
        ``model`` is itself a compressed module (wrap it, e.g. in ``nn.Sequential``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    manifest_path = path / MANIFEST_NAME
    if manifest_path.is_file():
        # a version-1 checkpoint saved over: its weights file is one transformers would read
        try:
            version = json.loads(manifest_path.read_text(encoding="utf-8")).get("format_version")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            version = None
        if version == 1:
            (path / _WEIGHTS_FILES[1]).unlink(missing_ok=True)
    # An earlier manifest must not vouch for the files about to be rewritten.
    manifest_path.unlink(missing_ok=True)
    for name in (WEIGHTS_NAME, MANIFEST_NAME):  # temporaries of a save that was killed
        for leftover in path.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)

    compressed = _compressed_modules(model)
    entries: dict[str, Any] = {}
    files: dict[str, torch.Tensor] = {}
    for name, module in compressed.items():
        entries[name], module_files = pack_module(name, module)
        files.update(module_files)
    prefixes = tuple(f"{name}." for name in compressed)
    state, aliases = _unshared({key: value for key, value in model.state_dict().items()
                                if not key.startswith(prefixes)})
    state = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    files.update(state)

    transformers = sys.modules.get("transformers")  # a model can only be one if it is imported
    config = None
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        config = model.config
        if not config.architectures:  # a config read from a GGUF file names no class
            config.architectures = [type(model).__name__]
        config.save_pretrained(path)
        _guard_config(path / "config.json")
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)

    weights_path = path / WEIGHTS_NAME
    write_atomically(weights_path, lambda target: save_file(files, str(target),
                                                             metadata={"format": "pt"}))
    file_bytes = weights_path.stat().st_size
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "matfactor_version": matfactor.__version__,
        "model_class": type(model).__name__,
        "architectures": None if config is None else config.architectures,
        "dtype": None if dtype is None else dtype_name(dtype),
        "source": None if source is None else str(source),
        "weights": {"file": WEIGHTS_NAME, "sha256": sha256(weights_path), "bytes": file_bytes},
        "state": {key: {"shape": list(value.shape), "dtype": dtype_name(value.dtype)}
                  for key, value in state.items()},
        "aliases": aliases,
        "modules": entries,
    }
    text = json.dumps(manifest, indent=1, allow_nan=False)
    write_atomically(manifest_path, lambda target: target.write_text(text, encoding="utf-8"))
    return CheckpointSummary(path, {name: ModuleBytes(entry["kind"], entry["dense_bytes"],
                                                      entry["stored_bytes"])
                                    for name, entry in entries.items()}, file_bytes)


# --------------------------------------------------------------------------- loading


def checkpoint_source(path: str | os.PathLike[str]) -> str | None:
    """Where the dense model of checkpoint ``path`` came from (``save_compressed(source=...)``:
    a directory, a ``.gguf`` file or a built-in model name), ``None`` if not recorded.

    Raises
    ------
    CheckpointError
        ``path`` has no readable manifest.
    """
    source = _read_manifest(Path(path)).get("source")
    return source if isinstance(source, str) else None


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing: {path} is not a matfactor checkpoint, "
                              "or its saving did not finish")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{manifest_path} is not a readable JSON manifest: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} is not a {FORMAT!r} manifest")
    if manifest.get("format_version") not in _WEIGHTS_FILES:
        raise CheckpointError(f"{manifest_path} has format_version "
                              f"{manifest.get('format_version')!r}; this matfactor reads "
                              f"versions {', '.join(map(str, _WEIGHTS_FILES))}")
    for key, kind in (("weights", dict), ("state", dict), ("aliases", dict), ("modules", dict)):
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"{manifest_path}: {key!r} is missing or not a {kind.__name__}")
    return manifest


def _read_weights(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights_path = path / _WEIGHTS_FILES[manifest["format_version"]]
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing")
    if sha256(weights_path) != manifest["weights"].get("sha256"):
        raise CheckpointError(f"{weights_path} is damaged: its sha256 differs from the one in "
                              f"{MANIFEST_NAME} (truncated, modified or from another save)")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as file:
            return {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {error}") from error






def _target_layer(model: nn.Module, name: str, entry: dict[str, Any], where: str) -> nn.Module:
    """The dense layer of ``model`` that the manifest's module ``name`` replaces, checked."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{where} is not in the model ({type(model).__name__}): the "
                              "checkpoint is mismatched with it") from None
    conv = entry["kind"] in CONV_KINDS
    if not is_compressible(layer) or isinstance(layer, nn.Conv2d) != conv:
        raise CheckpointError(f"{where}: the model has a {type(layer).__name__} there, the "
                              f"checkpoint a {entry['kind']} (mismatched)")
    try:
        shape = list(weight_matrix(layer, name).shape)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from error
    if shape != list(entry["shape"]):
        raise CheckpointError(f"{where}: the model's layer has a (d_in, d_out) = {shape} weight "
                              f"matrix, the checkpoint's {entry['shape']} (mismatched)")
    if conv and geometry(layer) != entry["conv"]:
        raise CheckpointError(f"{where}: the model's convolution has geometry {geometry(layer)}, "
                              f"the checkpoint's {entry['conv']} (mismatched)")
    return layer




def _new_model(path: Path, manifest: dict[str, Any]) -> nn.Module:
    """The Hugging Face model of the checkpoint's config, freshly initialised, in its dtype."""
    class_name = manifest.get("model_class")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: it was saved from a {class_name}, not a "
                              "Hugging Face model; pass the model to load into as model=")
    import transformers

    model_class = getattr(transformers, str(class_name), None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise CheckpointError(f"{path / MANIFEST_NAME}: model_class {class_name!r} is not a "
                              "transformers model class; pass the model to load into as model=")
    dtype = manifest.get("dtype")
    if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise CheckpointError(f"{path / MANIFEST_NAME}: dtype {dtype!r} is not a torch dtype")
    try:
        config = transformers.AutoConfig.from_pretrained(path)  # keeps FOREIGN_LOADER_MESSAGE
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / 'config.json'} is not a readable config: {error}") from error
    return model_class._from_config(config, dtype=None if dtype is None else getattr(torch, dtype))


def _rebuild_modules(path: Path, model: nn.Module, manifest: dict[str, Any],
                     tensors: Tensors) -> dict[str, CompressedModule]:
    """The manifest's compressed modules, checked against the model's layers they replace and
    put in those layers' dtype and device."""
    replacements: dict[str, CompressedModule] = {}
    for name, entry in manifest["modules"].items():
        where = f"module {name!r}"
        try:
            layer = _target_layer(model, name, entry, where)
            module = rebuild_module(entry, tensors, where)
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"{path / MANIFEST_NAME}: malformed entry for {where} "
                                  f"({type(error).__name__}: {error})") from error
        replacements[name] = module.to(device=layer.weight.device, dtype=layer.weight.dtype)
    return replacements


def _remaining_state(path: Path, model: nn.Module, manifest: dict[str, Any], tensors: Tensors,
                     prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The stored state outside the compressed modules (aliases resolved), checked to be all of
    the file's remaining tensors and to fit the model's state dict outside ``prefixes``."""
    try:
        state = {key: tensors.take({"key": key, **description}, f"state tensor {key!r}")
                 for key, description in manifest["state"].items()}
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path / MANIFEST_NAME}: malformed 'state' entry "
                              f"({type(error).__name__}: {error})") from error
    extra = sorted(set(tensors.tensors) - tensors.used)
    if extra:
        raise CheckpointError(f"{WEIGHTS_NAME} holds tensors the manifest does not describe: "
                              f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for alias, key in manifest["aliases"].items():
        if key not in state:
            raise CheckpointError(f"{MANIFEST_NAME}: alias {alias!r} refers to {key!r}, which is "
                                  "not a stored state tensor")
        state[alias] = state[key]
    expected = {key: value for key, value in model.state_dict().items()
                if not key.startswith(prefixes)}
    for problem, keys in (("is missing from the checkpoint", expected.keys() - state.keys()),
                          ("is not in the model", state.keys() - expected.keys())):
        if keys:
            raise CheckpointError(f"state tensor {sorted(keys)[0]!r} {problem} "
                                  f"({len(keys)} such tensors): the checkpoint is mismatched "
                                  f"with the {type(model).__name__}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"state tensor {key!r} has shape {list(value.shape)} in the "
                                  f"checkpoint, {list(expected[key].shape)} in the model (mismatched)")
    return state


def load_compressed(path: str | os.PathLike[str], *, model: nn.Module | None = None,
                    device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save_compressed`, validating everything first.

    Parameters
    ----------
    path
        The checkpoint directory.
    model
        The dense model to load into, of the saved architecture (e.g. a CNN built by the
        caller); it is modified in place: each compressed module of the manifest replaces the
        layer of that name, in that layer's dtype and on its device, and the other tensors are
        copied into the model's (``load_state_dict(strict=True)``). ``None``: a Hugging Face
        model is built from the saved ``config.json`` (its class by the manifest's
        ``model_class``, in the saved dtype).
    device, dtype
        Where and in which floating dtype to put the whole model at the end (``model.to``);
        ``None`` leaves it as loaded.

    Returns
    -------
    nn.Module
        The model, in eval mode.

    Raises
    ------
    CheckpointError
        Anything in the directory missing, damaged or inconsistent, or a checkpoint that does not
        fit ``model`` (see the module docstring). ``model`` is not modified then.
    TypeError
        ``model`` not an ``nn.Module`` or ``dtype`` not a floating torch dtype.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be None or a torch.nn.Module, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    path = Path(path)
    manifest = _read_manifest(path)
    tensors = Tensors(_read_weights(path, manifest), WEIGHTS_NAME)
    if model is None:
        model = _new_model(path, manifest)

    replacements = _rebuild_modules(path, model, manifest, tensors)
    prefixes = tuple(f"{name}." for name in replacements)
    state = _remaining_state(path, model, manifest, tensors, prefixes)

    for name, module in replacements.items():
        replace_module(model, name, module)
    # strict=True over the whole state dict: the compressed modules' entries load onto themselves.
    state.update({key: value for key, value in model.state_dict().items() if key.startswith(prefixes)})
    model.load_state_dict(state, strict=True)
    _load_generation_config(path, model)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def _load_generation_config(path: Path, model: nn.Module) -> None:
    """Put the checkpoint's ``generation_config.json`` on a model that generates."""
    if not (path / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    import transformers

    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / 'generation_config.json'} is not a readable generation "
                              f"config: {error}") from error


def export_dense(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a dense copy of a Hugging Face checkpoint that plain ``transformers`` loads.

    Each compressed module's ``Ŵ`` is written back as the weight of the layer it replaced (of that
    layer's type: ``nn.Linear``, ``Conv1D``, ``nn.Conv2d``), so that ``from_pretrained`` of the
    model's class (or ``AutoModel*``) gives a model whose outputs are the compressed model's up to
    rounding, for serving with runtimes that do not know matfactor. It takes the dense model's
    bytes: the compression is in the values, not the storage.

    Parameters
    ----------
    path
        A checkpoint written by :func:`save_compressed` from a ``transformers`` model.
    out
        The directory of the dense copy (created if needed): ``config.json`` (without the
        foreign-loader guard), ``model.safetensors``, the generation config where the model has
        one, and the tokenizer when the checkpoint holds one.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    CheckpointError
        ``path`` is not a loadable checkpoint of a ``transformers`` model.
    ValueError
        ``out`` is ``path`` itself (the checkpoint would be overwritten).
    """
    from .layers import set_weight_matrix

    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve():
        raise ValueError(f"out must differ from path: the dense copy would overwrite the checkpoint {path}")
    manifest = _read_manifest(path)
    compressed = load_compressed(path)
    dense = _new_model(path, manifest)
    prefixes = tuple(f"{name}." for name in manifest["modules"])
    state = {key: value for key, value in compressed.state_dict().items() if not key.startswith(prefixes)}
    with torch.no_grad():
        for name in manifest["modules"]:
            module, layer = compressed.get_submodule(name), dense.get_submodule(name)
            set_weight_matrix(layer, module.dense_weight())
            state[f"{name}.weight"] = layer.weight
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias
    dense.load_state_dict(state, strict=True)
    if hasattr(compressed, "generation_config") and hasattr(dense, "generation_config"):
        dense.generation_config = compressed.generation_config
    if getattr(dense.config, "transformers_weights", None) == FOREIGN_LOADER_MESSAGE:
        del dense.config.transformers_weights
    out.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(out)
    if (path / "tokenizer_config.json").is_file():
        import transformers

        transformers.AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out
