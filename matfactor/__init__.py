"""matfactor: framework-agnostic matrix factorization for compressing neural networks.

One implementation of each solver runs on NumPy, CuPy and PyTorch arrays (CPU or GPU) through
the Python array API standard. Conventions: a weight is a ``(d_in, d_out)`` matrix ``W`` of
``Y = X @ W``, calibration enters as the Gram matrix ``H = XᵀX``; see the user guide in
``docs/``.
"""

from .admm import AdmmState, admm_prune, admm_solve
from .error import layer_error
from .exceptions import ConvergenceWarning
from .pruning import Pruner, magnitude_prune, sparsegpt_prune, wanda_prune
from .sparsity import (
    SparsityPattern,
    mask_from_scores,
    mask_satisfies,
    nnz_budget,
    parse_pattern,
)

__version__ = "0.1.0"

__all__ = [
    "AdmmState",
    "ConvergenceWarning",
    "Pruner",
    "SparsityPattern",
    "admm_prune",
    "admm_solve",
    "layer_error",
    "magnitude_prune",
    "mask_from_scores",
    "mask_satisfies",
    "nnz_budget",
    "parse_pattern",
    "sparsegpt_prune",
    "wanda_prune",
]
