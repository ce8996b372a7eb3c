"""Storage of compressed modules: the engine that checkpoints and the journal of resumable runs share.

A compressed module is stored as the tensors its class declares (``packed``: a sparse matrix as its
nonzeros and a bitmask; ``stored``: as they are, integer indices as ``int32``) and a manifest entry;
:func:`packed_module` writes that form, :func:`module_from_files` and :func:`rebuild_module` read it
back, checking everything (see :mod:`matfactor.adapters.checkpoint` for the format). Files are
written atomically (:func:`write_atomically`) and checked by their sha256.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from .modules import CompressedModule, SparseConv2d, UnfoldedConv2d, module_kinds

#: The kinds of the convolution modules, which record their geometry.
CONV_KINDS = ("sparse_conv2d", "unfolded_conv2d")
GEOMETRY = ("kernel_size", "stride", "padding", "dilation")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: missing, damaged, inconsistent or not
    fitting the model. The message names the file, tensor or module at fault."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(key: str, tensor: torch.Tensor) -> dict[str, Any]:
    return {"key": key, "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}


def geometry(conv: nn.Module) -> dict[str, Any]:
    """The geometry of an ``nn.Conv2d`` or compressed convolution, as the manifest records it."""
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
            **{key: list(getattr(conv, key)) for key in GEOMETRY}}


def matrix_shape(module: CompressedModule) -> tuple[int, int]:
    """``(d_in, d_out)`` of a compressed module's ``Ŵ``, without forming it."""
    if isinstance(module, SparseConv2d):
        return module.weight[0].numel(), module.out_channels
    inner = module.linear if isinstance(module, UnfoldedConv2d) else module
    return inner.in_features, inner.out_features


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file next to ``target``, flush it to disk, then rename it over
    ``target``: readers see the old file or the complete new one, never a partial one."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        try:
            write(temporary)
        except SafetensorError as error:  # e.g. a full disk, reported by the Rust writer
            raise OSError(f"cannot write {target}: {error}") from error
        except OSError as error:  # the message names the file (a full disk's does not)
            raise OSError(error.errno, f"cannot write {target}: {error.strerror or error}") from error
        # safetensors creates its files readable by the owner only; every file of a checkpoint
        # gets the mode of any new file (0644 under the usual umask)
        os.chmod(temporary, 0o666 & ~_umask())
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
        _fsync_directory(target.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _umask() -> int:
    """The process's file mode creation mask (reading it means setting it: set it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename in it) to disk, where the system allows it."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # a system without directory descriptors (Windows)
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pack_sparse(key: str, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``tensor``'s nonzeros in row-major order and its bitmask (``numpy.packbits`` of the
    row-major support), as file tensors under ``key``, and their manifest description."""
    mask = tensor != 0
    values = tensor[mask]
    bitmask = torch.from_numpy(np.packbits(mask.numpy().reshape(-1)))
    values_key, bitmask_key = f"{key}.values", f"{key}.bitmask"
    return {values_key: values, bitmask_key: bitmask}, {
        "layout": "bitmask", "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype),
        "nnz": values.numel(), "values": describe(values_key, values),
        "bitmask": describe(bitmask_key, bitmask)}


def pack_dense(key: str, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``tensor`` as a file tensor under ``key`` (indices as ``int32``, plenty for any layer
    width) and its manifest description."""
    tensor = tensor.contiguous() if tensor.is_floating_point() else tensor.to(torch.int32)
    return {key: tensor}, {"layout": "dense", **describe(key, tensor)}


def pack_module(name: str, module: CompressedModule,
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest entry of ``module`` and its tensors for the file (on the CPU)."""
    inner = module.linear if isinstance(module, UnfoldedConv2d) else module
    if module_kinds().get(inner.kind) is not type(inner):
        raise TypeError(f"module {name!r}: cannot save a {type(inner).__name__} (kind "
                        f"{inner.kind!r}); checkpoints hold the modules of "
                        "matfactor.adapters.modules and those registered with register_module")
    sparse, dense = inner.packed, inner.stored
    files: dict[str, torch.Tensor] = {}
    described: dict[str, Any] = {}
    for attribute in sparse + dense:
        pack = _pack_sparse if attribute in sparse else pack_dense
        tensor_files, described[attribute] = pack(f"{name}.{attribute}",
                                                   getattr(inner, attribute).detach().cpu())
        files.update(tensor_files)
    stored_bytes = sum(tensor.nbytes for tensor in files.values())
    if inner.bias is not None:
        bias_files, described["bias"] = pack_dense(f"{name}.bias", inner.bias.detach().cpu())
        files.update(bias_files)
    dtype = next(t.dtype for t in inner.parameters())
    d_in, d_out = matrix_shape(module)
    entry = {"kind": module.kind, "inner_kind": inner.kind if inner is not module else None,
             "shape": [d_in, d_out], "dtype": dtype_name(dtype), "bias": inner.bias is not None,
             "conv": geometry(module) if module.kind in CONV_KINDS else None,
             "pattern": getattr(inner, "pattern", None), "density": getattr(inner, "density", None),
             "compression": module.compression, "n_params": module.n_params,
             "nnz": sum(described[a]["nnz"] for a in sparse) if sparse else None,
             "dense_bytes": d_in * d_out * dtype.itemsize, "stored_bytes": stored_bytes,
             "tensors": described}
    return entry, files


def packed_module(name: str, module: CompressedModule,
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor], CompressedModule]:
    """``module`` as a checkpoint stores it, and the module rebuilt from that.

    Returns
    -------
    entry, files, rebuilt
        Its manifest entry, its tensors for a safetensors file (on the CPU), and the module
        :func:`load_compressed` makes of them, in ``module``'s device and training mode. The
        rebuilt module computes exactly what a loaded checkpoint computes, so that a pipeline
        that goes on with it is reproduced by one that resumes from the stored files.
    """
    entry, files = pack_module(name, module)
    rebuilt = rebuild_module(entry, Tensors(dict(files)), f"module {name!r}")
    device = next(module.parameters()).device
    return entry, files, rebuilt.to(device).train(module.training)


def module_from_files(name: str, entry: dict[str, Any], files: dict[str, torch.Tensor]) -> CompressedModule:
    """The compressed module of a manifest ``entry`` and its tensors ``files`` (as written by
    :func:`packed_module`), all of them checked as :func:`load_compressed` checks them.

    Raises
    ------
    CheckpointError
        Tensors missing, extra, of another shape or dtype, or values the module refuses.
    """
    tensors = Tensors(files)
    try:
        module = rebuild_module(entry, tensors, f"module {name!r}")
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"module {name!r}: malformed entry ({type(error).__name__}: {error})") \
            from error
    extra = sorted(set(files) - tensors.used)
    if extra:
        raise CheckpointError(f"module {name!r}: tensors not in its entry: {extra}")
    return module


class Tensors:
    """A file's tensors, each handed out once against its manifest description; ``source``
    names the file in messages."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str = "the stored tensors") -> None:
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()

    def take(self, description: dict[str, Any], where: str) -> torch.Tensor:
        key = description["key"]
        if key in self.used:
            raise CheckpointError(f"{where}: tensor {key!r} is described twice in the manifest")
        if key not in self.tensors:
            raise CheckpointError(f"{where}: tensor {key!r} is missing from {self.source}")
        tensor = self.tensors[key]
        found = (list(tensor.shape), dtype_name(tensor.dtype))
        if found != (list(description["shape"]), description["dtype"]):
            raise CheckpointError(f"{where}: tensor {key!r} is {found[1]} of shape {found[0]} in "
                                  f"{self.source}, but the manifest says {description['dtype']} "
                                  f"of shape {description['shape']}")
        self.used.add(key)
        return tensor


def unpack(description: dict[str, Any], tensors: Tensors, where: str) -> torch.Tensor:
    """The dense tensor of a (dense or bitmask-packed) manifest tensor description."""
    if description["layout"] == "dense":
        return tensors.take(description, where)
    if description["layout"] != "bitmask":
        raise CheckpointError(f"{where}: unknown layout {description['layout']!r}")
    values = tensors.take(description["values"], where)
    bitmask = tensors.take(description["bitmask"], where)
    shape = tuple(description["shape"])
    size = math.prod(shape)
    if values.ndim != 1 or dtype_name(values.dtype) != description["dtype"] \
            or bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (-(-size // 8),):
        raise CheckpointError(f"{where}: a {description['dtype']} tensor of shape {list(shape)} "
                              f"needs 1-D {description['dtype']} values and a uint8 bitmask of "
                              f"{-(-size // 8)} bytes, got {list(values.shape)} "
                              f"{dtype_name(values.dtype)} and {list(bitmask.shape)} "
                              f"{dtype_name(bitmask.dtype)}")
    bits = np.unpackbits(bitmask.numpy())
    if bits[size:].any():
        raise CheckpointError(f"{where}: bitmask {description['bitmask']['key']!r} has bits set "
                              f"past the tensor's {size} elements")
    mask = torch.from_numpy(bits[:size].astype(bool)).reshape(shape)
    count = int(mask.sum())
    if count != values.numel():
        raise CheckpointError(f"{where}: bitmask {description['bitmask']['key']!r} has {count} bits "
                              f"set but {description['values']['key']!r} holds {values.numel()} "
                              "values")
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values
    return dense


def rebuild_module(entry: dict[str, Any], tensors: Tensors, where: str) -> CompressedModule:
    kind = entry["kind"]
    linear_kind = entry["inner_kind"] if kind == "unfolded_conv2d" else kind
    kinds = module_kinds()
    if linear_kind not in kinds or (kind == "unfolded_conv2d" and linear_kind in CONV_KINDS):
        raise CheckpointError(f"{where}: unknown kind {kind!r} (inner kind {entry['inner_kind']!r}); "
                              "a module kind of a user's method loads once its module is registered "
                              "(import the module that registers it)")
    module_class = kinds[linear_kind]
    expected = set(module_class.packed + module_class.stored) | ({"bias"} if entry["bias"] else set())
    if set(entry["tensors"]) != expected:
        raise CheckpointError(f"{where}: a {linear_kind} has the tensors {sorted(expected)}, the "
                              f"manifest lists {sorted(entry['tensors'])}")
    values = {attribute: unpack(description, tensors, f"{where}, tensor {attribute!r}")
              for attribute, description in entry["tensors"].items()}
    try:
        module = module_class.from_tensors(values, entry)
        if kind == "unfolded_conv2d":
            conv = entry["conv"]
            module = UnfoldedConv2d(module, in_channels=conv["in_channels"],
                                    **{key: conv[key] for key in GEOMETRY})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: {error}") from error
    built = {"shape": list(matrix_shape(module)),
             "dtype": dtype_name(next(module.parameters()).dtype)}
    if kind in CONV_KINDS:
        built["conv"] = geometry(module)
    described = {key: entry[key] for key in built}
    if built != described:
        raise CheckpointError(f"{where}: its tensors make a module with {built}, the manifest "
                              f"says {described}")
    return module
