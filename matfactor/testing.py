"""Realistic layer problems for tests, benchmarks and examples.

Random i.i.d. Gaussian activations make every solver look good: their Gram matrix is close to a
multiple of the identity. Real transformer activations are nothing like that. The problems built
here have what makes layer-wise compression hard:

- correlated input features (a low-dimensional latent signal mixed into all inputs, plus noise),
  so ``H = XᵀX`` is far from diagonal;
- input norms spread over orders of magnitude, with a few outlier features far above the rest
  (as in the "massive activations" of large language models), so ``H`` is ill-conditioned;
- a few dead inputs (always zero), so ``H`` is singular;
- weights with heavy tails and a decaying spectrum rather than white noise.

Everything is generated with NumPy in float64 from a seed; :class:`Backend` converts to the
array library under test (NumPy, array_api_strict, PyTorch on CPU or CUDA, CuPy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from ._array import synchronize

__all__ = ["BACKEND_NAMES", "Backend", "BackendUnavailable", "LayerProblem", "load_backend",
           "realistic_layer"]

#: Backends the test suite and the benchmarks run on, where available.
BACKEND_NAMES = ["numpy", "array_api_strict", "torch-cpu", "torch-cuda", "cupy"]


@dataclass(frozen=True)
class LayerProblem:
    """A layer-wise compression problem.

    Attributes
    ----------
    W
        ``(d_in, d_out)`` weight of ``Y = X @ W``.
    H
        ``(d_in, d_in)`` Gram matrix ``XᵀX`` of the calibration inputs.
    X
        ``(n_samples, d_in)`` calibration inputs.
    dead
        Indices of the dead (always-zero) inputs.
    """

    W: np.ndarray
    H: np.ndarray
    X: np.ndarray
    dead: np.ndarray


def realistic_layer(d_in: int, d_out: int, *, n_samples: int | None = None,
                    n_dead: int | None = None, norm_spread: float = 30.0,
                    n_outliers: int | None = None, outlier_factor: float = 3.0,
                    seed: int = 0) -> LayerProblem:
    """Build a realistic ``(d_in, d_out)`` layer problem (see the module docstring).

    Parameters
    ----------
    d_in, d_out
        Weight shape.
    n_samples
        Number of calibration rows of ``X``; default ``2 * d_in`` (so ``H`` has full rank but for
        the dead inputs). Fewer than ``d_in`` gives a rank-deficient ``H``.
    n_dead
        Number of dead inputs; default ``max(1, d_in // 64)``.
    norm_spread
        Ratio between the largest and smallest live input norm (before outliers).
    n_outliers
        Number of outlier features; default ``max(1, d_in // 128)``.
    outlier_factor
        Norm of the outlier features relative to the largest regular norm (default 3).
    seed
        Seed of the generator.
    """
    if d_in < 2 or d_out < 1:
        raise ValueError(f"need d_in >= 2 and d_out >= 1, got ({d_in}, {d_out})")
    rng = np.random.default_rng(seed)
    n_samples = 2 * d_in if n_samples is None else n_samples
    n_dead = max(1, d_in // 64) if n_dead is None else n_dead
    n_outliers = max(1, d_in // 128) if n_outliers is None else n_outliers
    if n_dead + n_outliers >= d_in:
        raise ValueError("n_dead + n_outliers must leave some regular inputs")

    latent_dim = max(2, d_in // 8)
    mixing = rng.standard_normal((latent_dim, d_in)) / np.sqrt(latent_dim)
    latent = rng.standard_normal((n_samples, latent_dim))
    # Tokens differ in overall activation scale too (heavy-tailed row norms).
    token_scale = np.exp(0.5 * rng.standard_normal((n_samples, 1)))
    X = (latent @ mixing + rng.standard_normal((n_samples, d_in))) * token_scale

    log_spread = np.log(norm_spread)
    feature_scale = np.exp(rng.uniform(-log_spread / 2, log_spread / 2, d_in))
    order = rng.permutation(d_in)
    outliers, dead = order[:n_outliers], np.sort(order[n_outliers:n_outliers + n_dead])
    feature_scale[outliers] = outlier_factor * np.sqrt(norm_spread)
    feature_scale[dead] = 0.0
    X *= feature_scale

    # Weights: a decaying-spectrum component plus heavy-tailed (Student-t) noise, with per-input
    # and per-output scales.
    rank = max(1, min(d_in, d_out) // 4)
    spectrum = np.exp(-np.arange(rank) / max(1.0, rank / 8))
    structured = (rng.standard_normal((d_in, rank)) * spectrum) @ rng.standard_normal((rank, d_out))
    noise = rng.standard_t(df=4, size=(d_in, d_out))
    W = (structured / np.sqrt(rank) + noise) / np.sqrt(d_in)
    W *= np.exp(0.3 * rng.standard_normal((d_in, 1))) * np.exp(0.3 * rng.standard_normal((1, d_out)))

    H = X.T @ X
    H = (H + H.T) / 2
    return LayerProblem(W=W, H=H, X=X, dead=dead)


@dataclass(frozen=True)
class Backend:
    """One array library on one device, as the tests use it."""

    name: str
    xp: Any
    device: Any
    _native: Any

    def dtype(self, name: str) -> Any:
        return getattr(self.xp, name)

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        """A NumPy array (or anything NumPy takes) as this backend's array on its device."""
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype if dtype != "bfloat16" else "float32")
        if self.name.startswith("torch"):
            tensor = self._native.asarray(a, device=self.device)
            return tensor.to(self._native.bfloat16) if dtype == "bfloat16" else tensor
        if self.name == "array_api_strict":
            return self._native.asarray(a, device=self.device)
        return self._native.asarray(a)

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.name.startswith("torch"):
            return x.detach().cpu().numpy() if x.dtype != self._native.bfloat16 \
                else x.detach().float().cpu().numpy()
        if self.name == "cupy":
            return x.get()
        if self.name == "array_api_strict":
            return np.from_dlpack(x)
        return np.asarray(x)

    def same_device(self, x: Any) -> bool:
        return array_api_compat.device(x) == self.device

    def synchronize(self) -> None:
        """Wait for queued device work (call before reading a clock)."""
        synchronize(self.xp, self.device)


class BackendUnavailable(RuntimeError):
    """The requested backend is not installed or has no device here; the message says why."""


def load_backend(name: str) -> Backend:
    """The backend called ``name`` (one of :data:`BACKEND_NAMES`).

    The array library is imported only here, on request: the solvers themselves never import
    torch or cupy.

    Raises
    ------
    BackendUnavailable
        If its library is missing or it needs a GPU that is not present.
    """
    if name == "numpy":
        return Backend(name, array_api_compat.array_namespace(np.empty(0)), "cpu", np)
    if name == "array_api_strict":
        try:
            import array_api_strict
        except ImportError as exc:
            raise BackendUnavailable("array_api_strict is not installed") from exc
        return Backend(name, array_api_strict, array_api_strict.Device("CPU_DEVICE"),
                             array_api_strict)
    if name.startswith("torch"):
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailable("torch is not installed") from exc
        if name == "torch-cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device (torch.cuda.is_available() is False)")
        device = torch.device("cuda" if name == "torch-cuda" else "cpu")
        return Backend(name, array_api_compat.array_namespace(torch.empty(0)), device, torch)
    if name == "cupy":
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() == 0:
                raise BackendUnavailable("no CUDA device for cupy")
        except Exception as exc:  # ImportError, or CUDA runtime errors without a driver
            raise BackendUnavailable(f"cupy unavailable: {type(exc).__name__}: {exc}") from exc
        return Backend(name, array_api_compat.array_namespace(cupy.empty(0)),
                             cupy.cuda.Device(), cupy)
    raise ValueError(f"unknown backend {name!r}; choose from {BACKEND_NAMES}")
