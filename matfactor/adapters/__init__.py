"""Framework adapters, imported as ``matfactor.adapters`` (never as a top-level ``adapters``).

They map torch models onto the matrix problems of the core and back: which layers have a
problem and how their weight is read (:mod:`~matfactor.adapters.layers`), calibration hooks
that accumulate ``H = XᵀX`` (:mod:`~matfactor.adapters.calibration`), recipes
(:mod:`~matfactor.adapters.recipe`) and methods (:mod:`~matfactor.adapters.methods`), the
sequential pipeline (:mod:`~matfactor.adapters.pipeline`), where its layer solves run
(:mod:`~matfactor.adapters.executors`), how an interrupted run resumes
(:mod:`~matfactor.adapters.journal`) and what memory its solves need
(:mod:`~matfactor.adapters.memory`), the compressed modules
(:mod:`~matfactor.adapters.modules`), checkpoints (:mod:`~matfactor.adapters.checkpoint`),
text models, built in or loaded from a directory or GGUF file (:mod:`~matfactor.adapters.text`),
and the calibration windows and perplexity of causal language models
(:mod:`~matfactor.adapters.causal_lm`). They need torch, and the Hugging Face
parts need the ``hf`` extra (``pip install -e ".[hf]"``). The core never imports this package.
"""

from .checkpoint import CheckpointError, CheckpointSummary, export_dense, load_compressed, save_compressed
from .journal import RunMismatchError
from .layers import is_compressible, layer_inputs, weight_matrix
from .memory import MemoryPlan
from .methods import METHODS
from .modules import (
    CompressedModule,
    DoubleSparseLinear,
    LowRankLinear,
    PifaLinear,
    SparseConv2d,
    SparseLinear,
    SparseLowRankLinear,
    UnfoldedConv2d,
    compressed_module,
    replace_module,
)
from .pipeline import CompressionReport, LayerReport, compress_model, compression_plan, find_blocks
from .recipe import Recipe, Rule

__all__ = [
    "METHODS",
    "CheckpointError",
    "CheckpointSummary",
    "CompressedModule",
    "CompressionReport",
    "DoubleSparseLinear",
    "LayerReport",
    "LowRankLinear",
    "MemoryPlan",
    "PifaLinear",
    "Recipe",
    "Rule",
    "RunMismatchError",
    "SparseConv2d",
    "SparseLinear",
    "SparseLowRankLinear",
    "UnfoldedConv2d",
    "compress_model",
    "compressed_module",
    "compression_plan",
    "export_dense",
    "find_blocks",
    "is_compressible",
    "layer_inputs",
    "load_compressed",
    "replace_module",
    "save_compressed",
    "weight_matrix",
]
