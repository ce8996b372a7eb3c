"""matfactor: framework-agnostic matrix factorization for compressing neural networks.

One implementation of each solver runs on NumPy, CuPy and PyTorch arrays (CPU or GPU) through
the Python array API standard. Conventions: a weight is a ``(d_in, d_out)`` matrix ``W`` of
``Y = X @ W``, calibration enters as the Gram matrix ``H = XᵀX``; see the user guide in
``docs/``.
"""

from ._contract import contract
from .admm import AdmmState, admm_prune, admm_solve
from .dsf import DoubleSparse, double_sparse, dsf_budget_split
from .error import layer_error
from .exceptions import ConvergenceWarning
from .lowrank_descent import hassle_free_learning_rate, lowrank_gd
from .pifa import Pivoted, pifa_from_dense, pifa_from_factors, pifa_rank_for_density
from .pruning import Pruner, magnitude_prune, sparsegpt_prune, wanda_prune
from .reconstruct import ReconstructionStatistics, mpifa, mpifa_lowrank, update_U, update_V
from .sparse_lowrank import (
    SparseLowRankBudget,
    SparsePlusLowRank,
    sparse_lowrank_budget,
    sparse_lowrank_rank,
    sparse_plus_lowrank,
)
from .sparsity import (
    SparsityPattern,
    magnitude_scores,
    mask_from_scores,
    mask_satisfies,
    nnz_budget,
    parse_pattern,
    wanda_scores,
)
from .svd import LowRank, lowrank_rank_for_density, randomized_svd, truncated_svd, weighted_lowrank
from .sylvester import SylvesterSolver

__version__ = "0.2.0"

__all__ = [
    "AdmmState",
    "ConvergenceWarning",
    "DoubleSparse",
    "LowRank",
    "Pivoted",
    "Pruner",
    "ReconstructionStatistics",
    "SparseLowRankBudget",
    "SparsePlusLowRank",
    "SparsityPattern",
    "SylvesterSolver",
    "admm_prune",
    "admm_solve",
    "contract",
    "double_sparse",
    "dsf_budget_split",
    "hassle_free_learning_rate",
    "layer_error",
    "lowrank_gd",
    "lowrank_rank_for_density",
    "magnitude_prune",
    "magnitude_scores",
    "mask_from_scores",
    "mask_satisfies",
    "mpifa",
    "mpifa_lowrank",
    "nnz_budget",
    "parse_pattern",
    "pifa_from_dense",
    "pifa_from_factors",
    "pifa_rank_for_density",
    "randomized_svd",
    "sparse_lowrank_budget",
    "sparse_lowrank_rank",
    "sparse_plus_lowrank",
    "sparsegpt_prune",
    "truncated_svd",
    "update_U",
    "update_V",
    "wanda_prune",
    "wanda_scores",
    "weighted_lowrank",
]
