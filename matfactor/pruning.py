"""Layer-wise pruners: magnitude, Wanda and SparseGPT.

Every pruner has one signature, the :class:`Pruner` protocol::

    prune(W, H, *, density=None, pattern="unstructured") -> W_sparse

with ``W`` the ``(d_in, d_out)`` weight of ``Y = X @ W`` and ``H = XᵀX`` the calibration Gram
matrix (unused by magnitude pruning). The result is in the compute dtype (float32, or float64
for float64 input), on the inputs' device, and its support meets ``pattern`` and the exact
budget of :func:`matfactor.sparsity.nnz_budget`. The ADMM pruner in :mod:`matfactor.admm` has
the same signature, so all four plug into the sparse-plus-low-rank alternation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from . import _memory
from . import _validation as check
from ._array import cholesky, spd_inverse, top_k_mask
from ._contract import Parameter, contract, declare
from ._hessian import damped_hessian, input_norms
from .sparsity import SparsityPattern, _keep_count, _mask, _wanda_scores, nnz_budget

__all__ = ["Pruner", "magnitude_prune", "wanda_prune", "sparsegpt_prune"]

# The parameters every pruner shares (the Pruner protocol), declared once.
_PRUNER_PARAMETERS = (
    Parameter("W", "array", doc="``(d_in, d_out)`` weight."),
    Parameter("H", "array", doc="``(d_in, d_in)`` Gram matrix ``XᵀX`` of the calibration inputs."),
    Parameter("density", "density", doc="Kept fraction in (0, 1]; ``None`` for ``'n:m'`` (implied n/m)."),
    Parameter("pattern", "pattern", doc="``'unstructured'``, ``'per_output'`` or ``'n:m'`` "
                                        "(:mod:`matfactor.sparsity`)."))


class Pruner(Protocol):
    """The signature shared by all pruners."""

    @declare(*_PRUNER_PARAMETERS)
    def __call__(self, W: Any, H: Any | None, *, density: float | None = None,
                 pattern: str | SparsityPattern = "unstructured") -> Any: ...


@dataclass(frozen=True)
class _PruningProblem:
    """Validated inputs of a pruner, in the compute dtype.

    Every pruner is independent of the scale of ``H`` and scales its result with ``W``, and
    exactly so under powers of two. So each computes on the parts it needs scaled to unit
    magnitude by powers of two (:meth:`scaled_W`, :meth:`scaled_H`, ``input_norms``):
    numbers of order 1 whatever the input's scale, the same result as an unscaled
    computation that does not overflow.
    """

    xp: Any
    device: Any
    W: Any
    H: Any | None
    density: float
    pattern: SparsityPattern

    def scaled_W(self) -> tuple[Any, int]:
        """``(W · 2**-e, e)`` with ``2**e`` near ``max |W|``."""
        return check.normalised(self.xp, self.W, "W")

    def scaled_H(self) -> Any:
        """``H`` divided by an even power of two near its magnitude."""
        return check.normalised(self.xp, self.H, "H", even=True)[0]

    def keep(self, mask: Any) -> Any:
        """``W`` on ``mask``, zero elsewhere."""
        return self.xp.where(mask, self.W, self.xp.zeros_like(self.W))


def _prepare_pruning_problem(W: Any, H: Any | None, density: float | None,
                             pattern: str | SparsityPattern, *, needs_H: bool) -> _PruningProblem:
    """Validate the shared pruner arguments (shapes, dtypes, finiteness, pattern, budget)."""
    xp, device, W, H, _ = check.layer_problem(W, H, needs_H=needs_H, require_live=needs_H,
                                              scale=False)
    pattern, density = contract(Pruner.__call__).validate(pattern=pattern, density=density).values()
    if nnz_budget(tuple(W.shape), density, pattern) == 0:
        raise ValueError(f"density={density} keeps no entry of a {tuple(W.shape)} weight under "
                         f"pattern '{pattern}'; increase density")
    return _PruningProblem(xp, device, W, H, density, pattern)


@declare(*_PRUNER_PARAMETERS)
def magnitude_prune(W: Any, H: Any | None = None, *, density: float | None = None,
                    pattern: str | SparsityPattern = "unstructured") -> Any:
    """Keep the largest ``|W|`` under ``pattern``: the Frobenius projection onto the pattern.

    ``H`` is accepted for the shared signature and validated, but not used.
    """
    problem = _prepare_pruning_problem(W, H, density, pattern, needs_H=False)
    xp = problem.xp
    return problem.keep(_mask(xp, xp.abs(problem.W), problem.density, problem.pattern))


@declare(*_PRUNER_PARAMETERS)
def wanda_prune(W: Any, H: Any, *, density: float | None = None,
                pattern: str | SparsityPattern = "unstructured") -> Any:
    """Wanda (Sun et al., 2023): keep the largest ``|W_ij| · ||X_i||`` under ``pattern``.

    ``||X_i||² = H_ii`` is the squared norm of input ``i`` over the calibration set. No weight
    is updated. Wanda's own setting is ``pattern="per_output"``; every pattern is accepted.
    """
    problem = _prepare_pruning_problem(W, H, density, pattern, needs_H=True)
    xp = problem.xp
    # Scores of W at unit magnitude: the same order as the user's, and no overflow.
    scores = _wanda_scores(xp, problem.scaled_W()[0], input_norms(xp, problem.H)[0])
    return problem.keep(_mask(xp, scores, problem.density, problem.pattern))



@declare(*_PRUNER_PARAMETERS, Parameter("damping", "damping", low_open=True),
         Parameter("block_size", "integer", minimum=1))
def sparsegpt_prune(W: Any, H: Any, *, density: float | None = None,
                    pattern: str | SparsityPattern = "unstructured", damping: float = 0.01,
                    block_size: int = 128) -> Any:
    """SparseGPT (Frantar & Alistarh, 2023): optimal-brain-surgeon pruning with lazy updates.

    Inputs are processed in order, in blocks of ``block_size``. Within a block each input's
    weights are pruned against the mask, and the error is compensated on the block's later
    inputs through the upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``U[i, i:]`` is the
    optimal-brain-surgeon update row); the block's accumulated error then updates all later
    inputs with one GEMM. The mask is chosen adaptively with the score ``w² / U_ii²``:

    - unstructured: per block, over all outputs; block budgets are split in proportion to the
      block size so that the whole matrix keeps exactly ``nnz_budget`` entries;
    - per_output: per block and output column, likewise summing to the column budget;
    - n:m: for each group of ``m`` inputs, from the weights already updated by earlier groups.

    Parameters
    ----------
    W
        ``(d_in, d_out)`` weight.
    H
        ``(d_in, d_in)`` Gram matrix ``XᵀX``; singular ``H`` (dead inputs) is valid.
    density, pattern
        Kept fraction and sparsity pattern (see :mod:`matfactor.sparsity`).
    damping
        ``λ = damping · mean(diag(H))`` is added to the diagonal (SparseGPT's 1%).
    block_size
        Inputs per lazy-update block (rounded down to a multiple of ``m`` for n:m, at least m).

    Returns
    -------
    W_sparse
        The pruned and updated weight; weights of dead inputs are zero.
    """
    problem = _prepare_pruning_problem(W, H, density, pattern, needs_H=True)
    damping, block_size = contract(sparsegpt_prune).validate(damping=damping,
                                                             block_size=block_size).values()
    factor = _sparsegpt_factor(problem.xp, problem.scaled_H(), damping)
    W_scaled, w_exponent = problem.scaled_W()
    W_pruned = _sparsegpt_with_factor(problem.xp, W_scaled, factor, problem.density,
                                      problem.pattern, block_size)
    return check.times_power_of_two(problem.xp, W_pruned, w_exponent)


@dataclass(frozen=True)
class _SparseGptFactor:
    """What SparseGPT needs of ``H``, computed once and reusable for any weight.

    Attributes
    ----------
    U
        Upper Cholesky factor of ``(H + λI)⁻¹`` (``H⁻¹ = UᵀU``): row ``i`` of ``U``, scaled by
        ``1/U_ii``, is the optimal-brain-surgeon compensation of removing input ``i`` once the
        inputs before it are fixed.
    dead
        Boolean vector of the dead inputs (``H_ii = 0``), whose weights are set to zero.
    """

    U: Any
    dead: Any


def _sparsegpt_factor(xp: Any, H: Any, damping: float) -> _SparseGptFactor:
    """The ``O(d_in³)`` part of SparseGPT: damp ``H``, invert it, factor the inverse.

    Separate from :func:`_sparsegpt_with_factor` so that a caller pruning many weights against
    one ``H`` (the sparse-plus-low-rank alternation, HASSLE-free section 4.3) pays it once.
    """
    H_damped, dead = damped_hessian(xp, H, damping)
    return _SparseGptFactor(cholesky(xp, spd_inverse(xp, H_damped)).T, dead)


def _sparsegpt_with_factor(xp: Any, W: Any, factor: _SparseGptFactor, density: float,
                          pattern: SparsityPattern, block_size: int) -> Any:
    """SparseGPT's pruning sweep over validated inputs with a precomputed factor.

    ``W`` in the compute dtype, ``density`` and ``pattern`` already checked (see
    :func:`sparsegpt_prune` for the method). Costs about ``d_in² d_out`` flops (the lazy block
    updates) and no factorization.
    """
    d_in, d_out = W.shape
    if pattern.kind == "n:m":
        block_size = max(pattern.m, block_size - block_size % pattern.m)
    U = factor.U
    W = xp.where(factor.dead[:, None], xp.zeros_like(W), W)

    total_budget = nnz_budget((d_in, d_out), density, pattern)
    column_budget = _keep_count(density, d_in) if pattern.kind == "per_output" else 0
    pruned_rows = []
    for start in range(0, d_in, block_size):
        stop = min(start + block_size, d_in)
        block = W[start:stop, :]
        U_block = U[start:stop, start:stop]
        pivots = xp.linalg.diagonal(U_block)
        if pattern.kind == "unstructured":
            count = (total_budget * stop) // d_in - (total_budget * start) // d_in
            mask = top_k_mask(xp, (block / pivots[:, None]) ** 2, count)
        elif pattern.kind == "per_output":
            count = (column_budget * stop) // d_in - (column_budget * start) // d_in
            mask = top_k_mask(xp, (block / pivots[:, None]) ** 2, count, axis=0)
        pruned, errors = _sparsegpt_block(xp, block, U_block, pivots, pattern,
                                          mask if pattern.kind != "n:m" else None)
        pruned_rows.append(pruned)
        if stop < d_in:
            W[stop:, :] = W[stop:, :] - U[start:stop, stop:].T @ errors
    return xp.concat(pruned_rows, axis=0)


def _sparsegpt_block(xp: Any, block: Any, U_block: Any, pivots: Any, pattern: SparsityPattern,
                     mask: Any | None) -> tuple[Any, Any]:
    """Prune one block input by input; return the pruned rows and the scaled errors."""
    block = xp.asarray(block, copy=True)
    size = block.shape[0]
    pruned = xp.zeros_like(block)
    errors = xp.zeros_like(block)
    group_mask = None
    for i in range(size):
        if mask is None and i % pattern.m == 0:
            group = block[i:i + pattern.m, :]
            group_mask = top_k_mask(xp, (group / pivots[i:i + pattern.m, None]) ** 2,
                                    pattern.n, axis=0)
        keep = mask[i, :] if mask is not None else group_mask[i % pattern.m, :]
        row = block[i, :]
        kept = xp.where(keep, row, xp.zeros_like(row))
        error = (row - kept) / pivots[i]
        pruned[i, :] = kept
        errors[i, :] = error
        if i + 1 < size:
            block[i + 1:, :] = block[i + 1:, :] - U_block[i, i + 1:][:, None] * error[None, :]
    return pruned, errors


# --------------------------------------------------------------------------- memory models


@_memory.counts(magnitude_prune)
@_memory.counts(wanda_prune)
def _score_pruning_memory(problem: _memory.Problem) -> _memory.SolveMemory:
    """Magnitude and Wanda: the front door's check of ``H`` (a scaled copy, its transposed
    difference and the absolute value of that: 3 Hh); W scaled, ``|W|``, the scores (3 M); then
    the scores, kthvalue's copy and indices; then the scores, the mask, ``zeros_like(W)`` and
    the result (``problem.keep``)."""
    M, Hh, mn = problem.M, problem.Hh, problem.mn
    peak = max(3 * Hh, 3 * M, M + _memory.top_k_bytes(mn, problem.itemsize), 3 * M + mn)
    return _memory.SolveMemory(peak, M)


@_memory.counts(sparsegpt_prune)
def _sparsegpt_memory(problem: _memory.Problem) -> _memory.SolveMemory:
    """SparseGPT: the front door's 3 Hh; ``_sparsegpt_factor``: H scaled, eye, eye·λ and
    H + λI (``add_to_diagonal``), then H + λI, its Cholesky factor, the inverse and the factor
    of the inverse (4 Hh); ``_sparsegpt_with_factor``: U, W scaled, ``where(dead, zeros, W)``
    and its zeros, the first block's product ``U[...].T @ errors`` and the difference
    (Hh + 5 M)."""
    M, Hh = problem.M, problem.Hh
    return _memory.SolveMemory(max(3 * Hh, 4 * Hh, Hh + 5 * M), M)
