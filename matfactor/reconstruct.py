"""MPIFA: online error-accumulation-minimisation reconstruction, then PIFA.

Zhao et al., "Pivoting Factorization" (PIFA paper), section 4, appendix A and Algorithm 3
(appendix B.1).

Orientation. The paper writes ``Y = W X`` with ``W`` ``(d_out, d_in)``, samples as columns of
``X``, the Gram ``X Xᵀ`` and ``W ≈ U Vᵀ`` with its ``U`` on the output side. matfactor writes
``Y = X @ W`` with ``W`` ``(d_in, d_out)``, samples as rows, ``H = XᵀX`` and ``W ≈ U Vᵀ`` with
``U`` ``(d_in, r)`` on the input side and ``V`` ``(d_out, r)`` on the output side. Every
equation below is the paper's transposed: the paper's ``U`` is our ``V``, its ``Vᵀ`` our
``Uᵀ``, its ``Y Xᵀ`` our ``G = Xᵀ Y``.

The problem. Each layer sees two input streams over the calibration data: ``X_o`` from the
dense model and ``X_u`` from the already-compressed model. With the mix ratio ``λ`` (eq. 7),
the target is ``Y_t = λ X_o W + (1 − λ) X_u W``, the dense layer applied to the mixed input
``X_u + λ Δ`` where ``Δ = X_o − X_u`` is the error accumulated by the compressed layers
upstream. The reconstruction minimises (eq. 6 with eq. 7, regularised as in eq. 9)::

    f(U, V) = ‖Y_t − X_u U Vᵀ‖²_F + a ‖W − U Vᵀ‖²_F.

Everything it needs is a pair of ``(d_in, d_in)`` statistics, accumulated batch by batch in
constant memory (eq. 5's "online" form, Algorithm 3 steps 3–4)::

    H = X_uᵀ X_u,   K = X_uᵀ Δ,   G = X_uᵀ Y_t = (H + λ K) W.

We accumulate ``K`` rather than the paper's ``Y_t Xᵀ`` (our ``G``): it does not depend on ``W``
or ``λ``, so one accumulator serves every layer that reads the same input (q/k/v, gate/up
projections) and any mix ratio, and it keeps the small error term ``Δ`` apart from the large
``X_u`` term instead of mixing them in one sum.

The closed-form block updates, each the exact minimiser of ``f`` over one factor:

- eq. (5), the paper's ``U_r = Y_t Xᵀ V (Vᵀ X Xᵀ V)⁻¹``, is our output factor
  ``V = (G + aW)ᵀ U (Uᵀ (H + aI) U)⁻¹`` (:func:`update_V`);
- eqs. (8)–(9), the paper's ``V_rᵀ = (UᵀU)⁻¹ Uᵀ (Y_t Xᵀ + αW)(X Xᵀ + αI)⁻¹``, is our input factor
  ``U = (H + aI)⁻¹ (G + aW) V (VᵀV)⁻¹`` (:func:`update_U`).

Two choices differ from the paper, both documented where they act:

- the regulariser ``a = alpha · mean(diag H)`` is relative to the scale of the statistics (the
  paper's ``α = 0.001`` is absolute, which makes its effect depend on the number of calibration
  tokens);
- the regulariser is applied to both updates, not only to eq. (8): both are then exact block
  minimisers of the same ``f``, so alternating them never increases it, and eq. (5) stays
  solvable when ``Uᵀ H U`` is singular (fewer calibration tokens than ``r``). With
  ``alpha = 0`` they are exactly the paper's eqs. (5) and (8).

Initialisation (Algorithm 3 step 2) is SVD-LLM's truncation-aware whitening, i.e. the exact
minimiser of ``tr((W − M)ᵀ H (W − M))`` over rank-``r`` ``M``
(:func:`matfactor.svd.weighted_lowrank`). Note that ``f`` itself has a closed-form global
minimiser over rank-``r`` products: completing the square, ``f(M) = tr((M − T)ᵀ (H + aI)(M − T))
+ const`` with ``(H + aI) T = G + aW``, so the whitened SVD of ``T`` under ``H + aI`` solves it
exactly (``init="target"``, about the cost of one sweep). The paper's single alternating sweep
from the weight's whitened SVD (``init="weight"``, the default) approximates that minimiser
while staying closer to ``W``'s own factorization, which may generalise better beyond the
calibration data (the paper reports that fitting ``V`` overfits small calibration sets,
section 5.3); which is better on held-out data is an open question here.
"""

from __future__ import annotations

import copy
from typing import Any

import array_api_compat

from . import _memory
from . import _validation as check
from ._array import add_to_diagonal, cholesky, solve_triangular
from ._contract import Parameter, contract, declare
from .pifa import _RTOL, Pivoted, _pifa_from_factors, pifa_from_factors
from .svd import LowRank, _weighted_lowrank

__all__ = ["ReconstructionStatistics", "mpifa", "mpifa_lowrank", "update_U", "update_V"]

_INITS = ("weight", "target")
# The parameters of the objective (module docstring), shared by the statistics' methods and
# the solvers.
_MIX = Parameter("mix", "real", minimum=0.0, maximum=1.0,
                 doc="The mix ratio λ of eq. 7: 0 targets the compressed stream's own output, 1 "
                     "the dense model's.")
_ALPHA = Parameter("alpha", "real", minimum=0.0,
                   doc="Relative regularisation a = alpha·mean(diag H) (module docstring).")


@declare(Parameter("dtype", "dtype"), Parameter("track_error_gram", "flag"))
class ReconstructionStatistics:
    """Streaming second moments of a layer's two input streams (PIFA paper, section 4).

    Feed it, batch by batch, the inputs the layer receives in the dense model (``X_dense``,
    the paper's ``X_o``) and in the compressed model (``X_compressed``, ``X_u``). It keeps, in
    memory independent of the number of samples and on the batches' device::

        H           = X_uᵀ X_u          (d_in, d_in)  Algorithm 3 step 3 (the paper's X Xᵀ)
        error_cross = X_uᵀ (X_o − X_u)  (d_in, d_in)  with H, gives step 4 for any W and λ
        error_gram  = (X_o − X_u)ᵀ (X_o − X_u)        only if ``track_error_gram``: needed
                                                      only to report the objective's value

    Parameters
    ----------
    dtype
        ``"float32"`` or ``"float64"``: the accumulation dtype. Default: float64 if the first
        batch is float64, float32 otherwise (half-precision batches are accumulated in
        float32). Later batches are cast to it.
    track_error_gram
        Also accumulate ``error_gram`` (one more ``(d_in, d_in)`` matrix and one more product
        per batch), which :meth:`objective` needs whenever the two streams differ.

    Notes
    -----
    The accumulators live on the first batch's device; a batch from another library or device
    is an error naming it. They are kept scale-proof: each batch is scaled to unit magnitude by
    a power of two before its products are formed, and the sums are stored as ``S · 2**e``
    with one even exponent ``e`` for all three (exact in binary floating point), so that
    activations of any finite magnitude accumulate without overflow in float32. Reading the
    batch's magnitude costs one host read per batch, which also reports a non-finite batch.
    The properties :attr:`H`, :attr:`error_cross` and :attr:`error_gram` return the true sums
    in the accumulation dtype (Inf where they exceed its range); the solvers use the scaled
    sums.
    """

    def __init__(self, *, dtype: str | None = None, track_error_gram: bool = False) -> None:
        self._dtype_name, self.track_error_gram = contract(ReconstructionStatistics).validate(
            dtype=dtype, track_error_gram=track_error_gram).values()
        self.n_samples = 0
        self._H: Any = None             # the three sums divided by 2**_exponent
        self._error_cross: Any = None
        self._error_gram: Any = None
        self._exponent: int | None = None  # set by the first batch that is not all zeros

    @property
    def d_in(self) -> int | None:
        """Input dimension, fixed by the first batch (``None`` before it)."""
        return None if self._H is None else int(self._H.shape[0])

    @property
    def H(self) -> Any:
        """``X_uᵀ X_u``, the Gram matrix of the compressed stream."""
        return self._true(self._require("H", self._H))

    @property
    def error_cross(self) -> Any:
        """``X_uᵀ (X_o − X_u)``, zero while both streams are equal."""
        return self._true(self._require("error_cross", self._error_cross))

    @property
    def error_gram(self) -> Any:
        """``(X_o − X_u)ᵀ (X_o − X_u)``, or ``None`` if not tracked."""
        self._require("error_gram", self._H)
        return None if self._error_gram is None else self._true(self._error_gram)

    def to_device(self, device: Any) -> ReconstructionStatistics:
        """A copy of these statistics with the sums on ``device`` (a device of their library).

        For shipping the statistics of a layer to where it is solved, e.g. from a GPU to a
        worker process on the CPU (``array_api_compat.to_device``).
        """
        moved = copy.copy(self)
        for attribute in ("_H", "_error_cross", "_error_gram"):
            value = getattr(self, attribute)
            if value is not None:
                setattr(moved, attribute, array_api_compat.to_device(value, device))
        return moved

    def _true(self, stored: Any) -> Any:
        return check.times_power_of_two(array_api_compat.array_namespace(stored), stored,
                                        self._stored_exponent)

    @property
    def _stored_exponent(self) -> int:
        """``e`` of the stored sums ``S · 2**e`` (0 while every batch was all zeros)."""
        return 0 if self._exponent is None else self._exponent

    def _require(self, name: str, value: Any) -> Any:
        if value is None:
            raise ValueError(f"statistics.{name} is not available: no batch has been added "
                             "(call update(X_dense, X_compressed) first)")
        return value

    def update(self, X_dense: Any, X_compressed: Any | None = None) -> ReconstructionStatistics:
        """Add a batch of the layer's inputs in both streams.

        Parameters
        ----------
        X_dense
            ``(..., d_in)`` inputs in the dense model's stream (the paper's ``X_o``); leading
            dimensions (batch, sequence) are flattened into samples.
        X_compressed
            The same samples in the compressed model's stream (``X_u``), same shape. ``None``
            means the streams agree (e.g. the first compressed layer): then only ``H`` grows.

        Returns
        -------
        ReconstructionStatistics
            ``self``, for chaining.
        """
        xp, _ = check.namespace(statistics=self._H, X_dense=X_dense, X_compressed=X_compressed,
                                optional=("statistics", "X_compressed"))
        if self._H is not None:
            dtype = self._H.dtype
        elif self._dtype_name is not None:
            dtype = getattr(xp, self._dtype_name)
        else:
            dtype = check.common_dtype(xp, X_dense=X_dense, X_compressed=X_compressed)
        X_o = check.samples(xp, X_dense, "X_dense", dtype, self.d_in)
        X_u = X_o if X_compressed is None else check.samples(xp, X_compressed, "X_compressed",
                                                             dtype, self.d_in)
        if X_u.shape != X_o.shape:
            raise ValueError(f"X_compressed has {tuple(X_u.shape)} samples x inputs but X_dense has "
                             f"{tuple(X_o.shape)}: pass the same samples in both streams")
        # Scale the batch to unit magnitude (the maximum also finds NaN and Inf), then bring
        # the sums and the batch's products to one exponent, the larger of the two.
        magnitude = check.finite_max(xp, X_o, "X_dense")
        if X_compressed is not None:
            magnitude = max(magnitude, check.finite_max(xp, X_u, "X_compressed"))
        batch_exponent = 2 * check.binary_exponent(magnitude)
        X_o = check.times_power_of_two(xp, X_o, -batch_exponent // 2)
        X_u = X_o if X_compressed is None else check.times_power_of_two(xp, X_u,
                                                                        -batch_exponent // 2)
        if self._H is None:
            self._H = xp.zeros((X_o.shape[1],) * 2, dtype=dtype, device=array_api_compat.device(X_o))
            self._error_cross = xp.zeros_like(self._H)
            if self.track_error_gram:
                self._error_gram = xp.zeros_like(self._H)
        if magnitude == 0.0:  # adds nothing; its exponent must not set the sums' scale
            self.n_samples += int(X_o.shape[0])
            return self
        if self._exponent is None:
            self._exponent = batch_exponent
        exponent = max(self._exponent, batch_exponent)
        if exponent != self._exponent:
            self._H, self._error_cross, self._error_gram = (
                None if A is None else check.times_power_of_two(xp, A, self._exponent - exponent)
                for A in (self._H, self._error_cross, self._error_gram))
            self._exponent = exponent
        # Out of place: arrays handed out by the properties stay as they were.
        shift = batch_exponent - exponent
        self._H = self._H + check.times_power_of_two(xp, X_u.T @ X_u, shift)
        if X_compressed is not None:
            error = X_o - X_u
            self._error_cross = self._error_cross + check.times_power_of_two(xp, X_u.T @ error,
                                                                             shift)
            if self.track_error_gram:
                self._error_gram = self._error_gram + check.times_power_of_two(
                    xp, error.T @ error, shift)
        self.n_samples += int(X_o.shape[0])
        return self

    def _scaled(self, W: Any, name: str = "W") -> tuple[Any, Any, Any, int]:
        """``(xp, W, H, w_exponent)``: ``W`` validated against the statistics and scaled to unit
        magnitude, and the stored (scaled) ``H`` in the common compute dtype."""
        H = self._require("H", self._H)
        xp, _ = check.namespace(statistics=H, **{name: W})
        dtype = check.common_dtype(xp, statistics=H, **{name: W})
        W = check.matrix(xp, W, name, dtype)
        if W.shape[0] != H.shape[0]:
            raise ValueError(f"{name} has shape {tuple(W.shape)} but the statistics were "
                             f"accumulated for d_in = {H.shape[0]} inputs; {name} must be "
                             "(d_in, d_out)")
        H = _cast(H, dtype)
        if not bool(xp.all(xp.isfinite(H))):
            raise ValueError("statistics.H contains NaN or Inf: a calibration batch was not finite")
        W, w_exponent = check.normalised(xp, W, name)
        return xp, W, H, w_exponent

    def _target(self, xp: Any, W: Any, H: Any, mix: float) -> Any:
        """``(H + mix·error_cross) W`` in the scaled units of the stored sums."""
        HW = H @ W
        return HW if mix == 0.0 else HW + mix * (_cast(self._error_cross, H.dtype) @ W)

    @declare(Parameter("W", "array"), _MIX)
    def target(self, W: Any, mix: float = 0.25) -> Any:
        """``G = X_uᵀ Y_t = (H + λ·error_cross) W``, Algorithm 3 step 4 (the paper's ``Y_t Xᵀ``).

        ``λ = mix`` is the paper's mix ratio (eq. 7): 0 targets the compressed stream's own
        output ``X_u W`` (plain SVD-LLM reconstruction), 1 the dense model's output ``X_o W``
        (full error-accumulation correction, eq. 6).
        """
        mix = contract(ReconstructionStatistics.target).validate(mix=mix)["mix"]
        xp, W, H, w_exponent = self._scaled(W)
        return check.times_power_of_two(xp, self._target(xp, W, H, mix), w_exponent + self._stored_exponent)

    @declare(Parameter("W", "array"), _MIX, _ALPHA)
    def target_weight(self, W: Any, mix: float = 0.25, alpha: float = 1e-3) -> Any:
        """The weight ``T`` that any compression method should approximate under ``H``.

        Completing the square in the regularised objective (module docstring),
        ``‖Y_t − X_u Ŵ‖²_F + a‖W − Ŵ‖²_F = tr((Ŵ − T)ᵀ (H + aI) (Ŵ − T)) + const`` with
        ``(H + aI) T = G + aW``. So error-accumulation correction (section 4) is not specific
        to low rank: pruning ``T`` under ``H + aI`` (SparseGPT, ADMM, DSF, ...) minimises the
        mixed-target objective of eq. (7) over that method's structure. ``mix = 0`` gives
        ``T = W`` up to the regulariser: ``(H + aI)⁻¹(H + aI)W = W``.

        Parameters
        ----------
        W
            ``(d_in, d_out)`` dense weight of the layer.
        mix
            ``λ`` of eq. (7) in ``[0, 1]``.
        alpha
            ``a = alpha · mean(diag H)`` (eq. 9), which keeps ``H + aI`` invertible for dead
            inputs and few samples; must be ``> 0`` unless ``H`` is nonsingular.

        Returns
        -------
        T
            ``(d_in, d_out)`` in the compute dtype, on ``W``'s device.
        """
        mix, alpha = contract(ReconstructionStatistics.target_weight).validate(
            mix=mix, alpha=alpha).values()
        xp, W, H, w_exponent = self._scaled(W)
        if mix == 0.0:
            return check.times_power_of_two(xp, W, w_exponent)
        reg = _Regularised(xp, H, self._target(xp, W, H, mix), W, alpha)
        return check.times_power_of_two(xp, reg.solve_H(reg.G), w_exponent)

    @declare(Parameter("W", "array"), Parameter("W_hat", "array"), _MIX, _ALPHA)
    def objective(self, W: Any, W_hat: Any, mix: float = 0.25, alpha: float = 0.0) -> float:
        """The relative reconstruction objective of ``W_hat`` (eqs. 6–7, with eq. 9's term).

        ``(‖Y_t − X_u Ŵ‖²_F + a ‖W − Ŵ‖²_F) / ‖Y_t‖²_F`` with ``a = alpha · mean(diag H)``,
        computed from the statistics with ``D = Ŵ − W``, ``Δ = X_o − X_u`` as
        ``tr(DᵀHD) − 2λ tr(Dᵀ·error_cross·W) + λ² tr(Wᵀ·error_gram·W) + a‖D‖²``: the small
        error terms are never differences of large sums.

        Raises
        ------
        ValueError
            If the streams differed (some batch had ``X_compressed``), ``mix > 0`` and
            ``error_gram`` was not tracked.
        """
        mix, alpha = contract(ReconstructionStatistics.objective).validate(
            mix=mix, alpha=alpha).values()
        H_stored = self._require("H", self._H)
        xp, _ = check.namespace(statistics=H_stored, W=W, W_hat=W_hat)
        dtype = check.common_dtype(xp, statistics=H_stored, W=W, W_hat=W_hat)
        W = check.matrix(xp, W, "W", dtype, shape=(H_stored.shape[0], None))
        W_hat = check.matrix(xp, W_hat, "W_hat", dtype, shape=tuple(W.shape))
        # W and W_hat scaled by one power of two, the sums as stored: the ratio is unchanged.
        common = check.binary_exponent(max(check.finite_max(xp, W, "W"),
                                           check.finite_max(xp, W_hat, "W_hat")))
        W = check.times_power_of_two(xp, W, -common)
        W_hat = check.times_power_of_two(xp, W_hat, -common)
        H = _cast(H_stored, dtype)
        D = W_hat - W
        HW = H @ W
        reference = xp.sum(W * HW)
        # Every term is quadratic in the stored sums' scale 2**e (a = alpha·mean(diag H) too),
        # so the ratio is the same in stored units.
        value = xp.sum(D * (H @ D)) + _relative_alpha(xp, H, alpha) * xp.sum(D * D)
        if mix > 0.0:
            KW = _cast(self._error_cross, dtype) @ W
            value = value - 2 * mix * xp.sum(D * KW)
            reference = reference + 2 * mix * xp.sum(W * KW)
            if self._error_gram is not None:
                EW = _cast(self._error_gram, dtype) @ W
                value = value + mix * mix * xp.sum(W * EW)
                reference = reference + mix * mix * xp.sum(W * EW)
            elif bool(xp.any(self._error_cross != 0)):
                raise ValueError("statistics.objective needs error_gram when the two streams "
                                 "differ: create the statistics with track_error_gram=True")
        reference = float(reference)
        if reference <= 0.0:
            raise ValueError("the target Y_t is zero on the calibration data: the relative "
                             "objective is undefined")
        return float(value) / reference


def _cast(A: Any, dtype: Any) -> Any:
    if A.dtype == dtype:
        return A
    xp = array_api_compat.array_namespace(A)
    return xp.astype(A, dtype)


def _relative_alpha(xp: Any, H: Any, alpha: float) -> Any:
    """``a = alpha · mean(diag H)`` as a 0-d array (no host read)."""
    return alpha * xp.mean(xp.linalg.diagonal(H))


class _Regularised:
    """``H + aI`` (Cholesky-factored once) and ``G + aW``: the statistics of eq. (9)."""

    def __init__(self, xp: Any, H: Any, G: Any, W: Any | None, alpha: float) -> None:
        self.xp = xp
        a = _relative_alpha(xp, H, alpha)
        if alpha > 0:
            if W is None:
                raise ValueError("alpha > 0 regularises towards W (eq. 9): pass W")
            self.H = add_to_diagonal(xp, H, xp.ones(H.shape[0], dtype=H.dtype,
                                                    device=array_api_compat.device(H)) * a)
            self.G = G + a * W
        else:
            self.H, self.G = H, G
        self._L = None

    def solve_H(self, B: Any) -> Any:
        """``(H + aI)⁻¹ B`` by two triangular solves with the factor computed once."""
        if self._L is None:
            self._L = _factor(self.xp, self.H, "H + a·I (a = alpha·mean(diag H)) is singular: "
                              "inputs that are dead or outnumber the calibration samples need "
                              "alpha > 0")
        return _cholesky_solve(self.xp, self._L, B)


def _factor(xp: Any, A: Any, message: str) -> Any:
    """Cholesky factor of a symmetric positive definite ``A``, else ``ValueError(message)``."""
    try:
        return cholesky(xp, A)
    except ValueError as exc:
        raise ValueError(message) from exc


def _cholesky_solve(xp: Any, L: Any, B: Any) -> Any:
    return solve_triangular(xp, L.T, solve_triangular(xp, L, B, lower=True), lower=False)


def _update_V(xp: Any, U: Any, reg: _Regularised) -> Any:
    # Vᵀ = (Uᵀ(H + aI)U)⁻¹ Uᵀ(G + aW): an (r, r) system, the transpose of eq. (5).
    gram = U.T @ (reg.H @ U)
    L = _factor(xp, (gram + gram.T) / 2, "Uᵀ(H + aI)U is singular: U has dependent columns in "
                "the metric of H (with alpha = 0: fewer calibration samples than the rank?)")
    return _cholesky_solve(xp, L, U.T @ reg.G).T


def _update_U(xp: Any, V: Any, reg: _Regularised) -> Any:
    # U = (H + aI)⁻¹ (G + aW) V (VᵀV)⁻¹, eqs. (8)–(9) transposed; never an explicit inverse.
    left = reg.solve_H(reg.G @ V)
    L = _factor(xp, V.T @ V, "VᵀV is singular: V has dependent columns (the rank exceeds the "
                "rank of the weight or of the statistics: pass a lower rank)")
    return _cholesky_solve(xp, L, left.T).T


def _prepare_update(factor: Any, H: Any, G: Any, W: Any | None, factor_name: str, side: int,
                    ) -> tuple[Any, Any, Any, Any, Any, int]:
    """Validate the arguments of :func:`update_V` / :func:`update_U` and scale them.

    Returns ``(xp, factor, H, G, W, exponent)`` scaled to unit magnitude by powers of two:
    ``factor`` by ``2**f``, ``H`` by an even ``2**h``, ``G`` by ``2**g`` and ``W`` by
    ``2**(g − h)`` (``G + aW`` stays consistent: ``a`` scales with ``H``). The updated factor
    solves the scaled problem and is ``2**exponent`` times smaller than the true one, with
    ``exponent = g − h − f`` (``V = (G + aW)ᵀ U (Uᵀ(H + aI)U)⁻¹`` and its transpose).
    """
    xp, _ = check.namespace(**{factor_name: factor}, H=H, G=G, W=W, optional=("W",))
    dtype = check.common_dtype(xp, **{factor_name: factor}, H=H, G=G, W=W)
    factor = check.matrix(xp, factor, factor_name, dtype)
    H = check.matrix(xp, H, "H", dtype)
    G = check.matrix(xp, G, "G", dtype)
    check.gram(xp, H, G.shape[0], rows_of="G")
    if W is not None:
        W = check.matrix(xp, W, "W", dtype, shape=tuple(G.shape))
    expected = G.shape[side]
    if factor.shape[0] != expected:
        raise ValueError(f"{factor_name} has shape {tuple(factor.shape)} but G is "
                         f"{tuple(G.shape)}: {factor_name} must have {expected} rows")
    factor, f_exponent = check.normalised(xp, factor, factor_name)
    H, h_exponent = check.normalised(xp, H, "H", even=True)
    G, g_exponent = check.normalised(xp, G, "G")
    if W is not None:
        W = check.times_power_of_two(xp, W, h_exponent - g_exponent)
    return xp, factor, H, G, W, g_exponent - h_exponent - f_exponent


@declare(Parameter("U", "array"), Parameter("H", "array"), Parameter("G", "array"),
         Parameter("W", "array", optional=True), _ALPHA)
def update_V(U: Any, H: Any, G: Any, *, W: Any | None = None, alpha: float = 0.0) -> Any:
    """The optimal output factor for a fixed input factor: eq. (5) of the PIFA paper.

    Minimises ``tr(V Uᵀ H U Vᵀ) − 2 tr(Vᵀ Gᵀ U) + a‖W − U Vᵀ‖²_F`` (the objective
    ``‖Y_t − X U Vᵀ‖²_F + a‖W − UVᵀ‖²_F`` up to a constant) over ``V``::

        V = (G + aW)ᵀ U (Uᵀ (H + aI) U)⁻¹,        a = alpha · mean(diag H).

    The paper's eq. (5), ``U_r = W X Xᵀ V (Vᵀ X Xᵀ V)⁻¹`` (with ``Y_t`` for ``W X``), in
    matfactor's orientation: its ``U`` is this ``V``, its ``V`` this ``U``, its ``X Xᵀ`` this
    ``H`` and its ``Y_t Xᵀ`` this ``Gᵀ``. ``alpha = 0`` is the paper's update exactly; the
    optimality condition, which the result meets to rounding, is
    ``V Uᵀ(H + aI)U = (G + aW)ᵀ U``.

    Parameters
    ----------
    U
        ``(d_in, r)`` input factor, full column rank in the metric of ``H + aI``.
    H
        ``(d_in, d_in)`` Gram matrix ``X_uᵀ X_u``.
    G
        ``(d_in, d_out)`` cross term ``X_uᵀ Y_t`` (:meth:`ReconstructionStatistics.target`).
    W
        ``(d_in, d_out)`` original weight; needed when ``alpha > 0``.
    alpha
        Relative weight of the regulariser ``‖W − UVᵀ‖²`` (eq. 9).

    Returns
    -------
    V
        ``(d_out, r)`` in the compute dtype.
    """
    alpha = contract(update_V).validate(alpha=alpha)["alpha"]
    xp, U, H, G, W, exponent = _prepare_update(U, H, G, W, "U", 0)
    return check.times_power_of_two(xp, _update_V(xp, U, _Regularised(xp, H, G, W, alpha)),
                                    exponent)


@declare(Parameter("V", "array"), Parameter("H", "array"), Parameter("G", "array"),
         Parameter("W", "array", optional=True), _ALPHA)
def update_U(V: Any, H: Any, G: Any, *, W: Any | None = None, alpha: float = 0.0) -> Any:
    """The optimal input factor for a fixed output factor: eqs. (8)–(9) of the PIFA paper.

    Minimises ``‖Y_t − X U Vᵀ‖²_F + a‖W − U Vᵀ‖²_F`` over ``U``::

        U = (H + aI)⁻¹ (G + aW) V (VᵀV)⁻¹,        a = alpha · mean(diag H).

    The paper's eq. (9), ``V_rᵀ = (UᵀU)⁻¹ Uᵀ (Y_t Xᵀ + αW)(X Xᵀ + αI)⁻¹``, transposed into
    matfactor's orientation (its ``Vᵀ`` is this ``Uᵀ``); ``alpha = 0`` is eq. (8), which needs
    a nonsingular ``H``. Appendix A's two-step view holds: this is the least-squares layer
    ``T = (H + aI)⁻¹(G + aW)`` projected onto the column space of ``V``. The optimality
    condition, met to rounding: ``(H + aI) U VᵀV = (G + aW) V``. Solves by Cholesky, never an
    explicit inverse.

    Parameters
    ----------
    V
        ``(d_out, r)`` output factor of full column rank.
    H, G, W, alpha
        As in :func:`update_V`.

    Returns
    -------
    U
        ``(d_in, r)`` in the compute dtype.

    Raises
    ------
    ValueError
        If ``H + aI`` is singular (``alpha = 0`` with dead inputs or fewer samples than
        inputs: use ``alpha > 0``).
    """
    alpha = contract(update_U).validate(alpha=alpha)["alpha"]
    xp, V, H, G, W, exponent = _prepare_update(V, H, G, W, "V", 1)
    return check.times_power_of_two(xp, _update_U(xp, V, _Regularised(xp, H, G, W, alpha)),
                                    exponent)


# The parameters of both MPIFA solvers (Algorithm 3).
_MPIFA_PARAMETERS = (Parameter("W", "array"), Parameter("statistics", "object"),
                     Parameter("rank", "rank"), _MIX, _ALPHA, Parameter("iters", "integer", minimum=0),
                     Parameter("init", "choice", choices=_INITS))


@declare(*_MPIFA_PARAMETERS)
def mpifa_lowrank(W: Any, statistics: ReconstructionStatistics, rank: int, *, mix: float = 0.25,
                  alpha: float = 1e-3, iters: int = 1, init: str = "weight") -> LowRank:
    """Part 1 of Algorithm 3 (MPIFA): the reconstructed rank-``r`` factors ``U``, ``V``.

    1. Initialise (step 2): ``init="weight"``, SVD-LLM's truncation-aware whitening of ``W``
       under ``H = X_uᵀX_u``, i.e. :func:`matfactor.svd.weighted_lowrank`; ``init="target"``,
       the exact global minimiser of the regularised objective ``f`` (module docstring): the
       whitened SVD of ``T = (H + aI)⁻¹(G + aW)`` under ``H + aI``.
    2. ``iters`` alternating sweeps, each eq. (5) (:func:`update_V`) then eqs. (8)–(9)
       (:func:`update_U`), both regularised (see the module docstring); the paper does one.
       Each sweep never increases ``f``; from ``init="target"`` they leave the factors as they
       are (pass ``iters=0``).

    Parameters
    ----------
    W
        ``(d_in, d_out)`` dense weight of the layer.
    statistics
        :class:`ReconstructionStatistics` of the layer's inputs.
    rank
        Target rank ``r`` in ``[1, min(d_in, d_out)]``; see
        :func:`matfactor.pifa.pifa_rank_for_density`.
    mix
        The mix ratio ``λ`` of eq. (7) in ``[0, 1]``; the paper's best is 0.25 (section 5.3).
    alpha
        Regularisation towards ``W`` (eq. 9) relative to ``mean(diag H)``. The default ``1e-3``
        keeps ``H + aI`` well conditioned for dead inputs and few samples. ``0`` is the
        unregularised eqs. (5) and (8), which need a nonsingular ``H``.
    iters
        Alternating sweeps (``>= 0``).
    init
        ``"weight"`` (the paper's) or ``"target"`` (the exact minimiser).

    Returns
    -------
    LowRank
        ``U`` ``(d_in, r)``, ``V`` ``(d_out, r)``, in the compute dtype on ``W``'s device.
    """
    xp, U, V, w_exponent = _mpifa_lowrank(W, statistics, rank, mix, alpha, iters, init)
    return LowRank(check.times_power_of_two(xp, U, w_exponent), V)


def _mpifa_lowrank(W: Any, statistics: Any, rank: Any, mix: Any, alpha: Any, iters: Any,
                   init: Any) -> tuple[Any, Any, Any, int]:
    """Validate :func:`mpifa_lowrank`'s arguments and solve the scaled problem.

    Returns ``(xp, U, V, w_exponent)``: the factors of ``W / 2**w_exponent`` under the stored
    (scaled) statistics, which Algorithm 3 is exactly homogeneous under.
    """
    if not isinstance(statistics, ReconstructionStatistics):
        raise TypeError(f"statistics must be a ReconstructionStatistics, got "
                        f"{check.type_name(statistics)}")
    declared = contract(mpifa_lowrank)
    init, mix, alpha, iters = declared.validate(init=init, mix=mix, alpha=alpha, iters=iters).values()
    xp, W, H, w_exponent = statistics._scaled(W)
    rank = declared.validate({"shape": tuple(W.shape)}, rank=rank)["rank"]
    if not float(xp.sum(xp.linalg.diagonal(H))) > 0:
        raise ValueError("statistics.H is zero: the calibration inputs carry no signal")
    reg = _Regularised(xp, H, statistics._target(xp, W, H, mix), W, alpha)
    if init == "weight":
        U, V = _weighted_lowrank(xp, W, H, rank, 0.0)
    else:
        U, V = _weighted_lowrank(xp, reg.solve_H(reg.G), reg.H, rank, 0.0)
    for _ in range(iters):
        V = _update_V(xp, U, reg)
        U = _update_U(xp, V, reg)
    return xp, U, V, w_exponent


@declare(*_MPIFA_PARAMETERS, _RTOL, docs_from=(mpifa_lowrank, pifa_from_factors))
def mpifa(W: Any, statistics: ReconstructionStatistics, rank: int, *, mix: float = 0.25,
          alpha: float = 1e-3, iters: int = 1, init: str = "weight",
          rtol: float | None = None) -> Pivoted:
    """MPIFA (Algorithm 3): online error-accumulation-minimisation reconstruction, then PIFA.

    :func:`mpifa_lowrank` (Part 1), then :func:`matfactor.pifa.pifa_from_factors` (Part 2,
    ``O((d_in + d_out) r²)``, never forming ``U Vᵀ``). Parameters as in :func:`mpifa_lowrank`;
    ``rtol`` as in :func:`matfactor.pifa.pifa_from_factors`.

    Returns
    -------
    Pivoted
        The PIFA layer: ``r (d_in + d_out − r)`` values, the same output as the reconstructed
        ``U Vᵀ`` to rounding.

    Examples
    --------
    Per layer, with the inputs it sees in the dense and in the compressed model::

        stats = ReconstructionStatistics()
        for X_dense, X_compressed in calibration_batches:
            stats.update(X_dense, X_compressed)
        layer = mpifa(W, stats, pifa_rank_for_density(W.shape, 0.5))
    """
    rtol = contract(mpifa).validate(rtol=rtol)["rtol"]
    xp, U, V, w_exponent = _mpifa_lowrank(W, statistics, rank, mix, alpha, iters, init)
    pivoted = _pifa_from_factors(xp, U, V, rtol)
    return Pivoted(pivoted.pivots, pivoted.non_pivots,
                   check.times_power_of_two(xp, pivoted.W_p, w_exponent), pivoted.C)


# --------------------------------------------------------------------------- memory model


@_memory.counts(mpifa)
def _mpifa_memory(problem: _memory.Problem) -> _memory.SolveMemory:
    """MPIFA beyond its statistics (whose sums the caller counts as inputs)."""
    d_in, d_out, r, s = problem.d_in, problem.d_out, problem.rank, problem.itemsize
    M, Hh = problem.M, problem.Hh
    init_target = problem.options.get("init", "weight") == "target"
    # statistics._scaled: isfinite(H) (bytes), W scaled; _target: H W, error_cross W,
    # mix·(error_cross W) and the sum (W scaled + 4 M)
    peak = max(d_in * d_in + M, 5 * M)
    # _Regularised: eye, eye·a, H + aI (3 Hh) beside W scaled and G; then H + aI and
    # G + aW kept with W scaled (2 M + Hh)
    base = 2 * M + Hh
    peak = max(peak, 2 * M + 3 * Hh)
    # init="target": the Cholesky factor of H + aI, (H + aI)⁻¹(G + aW) and its solve
    start = base + (Hh + 2 * M if init_target else 0)
    # _weighted_lowrank on the stored H (no front door, no copies of W and H)
    peak = max(peak, start + _memory.weighted_lowrank_bytes(d_in, d_out, r, s, False))
    # the sweep: the Cholesky factor of H + aI kept in reg._L, thin solves
    peak = max(peak, base + Hh + 6 * (d_in + d_out) * r * s)
    peak = max(peak, base + Hh + _memory.pifa_from_factors_bytes(d_in, d_out, r, s))
    return _memory.SolveMemory(peak, _memory.pivoted_bytes(d_in, d_out, r, s),
                               _memory.svd_retained(d_in, d_out, s))
