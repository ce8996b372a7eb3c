"""Backends under test and conversions between them and NumPy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

BACKEND_NAMES = ["numpy", "array_api_strict", "torch-cpu", "torch-cuda", "cupy"]
DTYPE_NAMES = ["float32", "float64"]


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


def make_backend(name: str) -> tuple[bool, Any]:
    """``(True, Backend)`` or ``(False, reason it is unavailable)``."""
    if name == "numpy":
        return True, Backend(name, array_api_compat.array_namespace(np.empty(0)), "cpu", np)
    if name == "array_api_strict":
        try:
            import array_api_strict
        except ImportError:
            return False, "array_api_strict is not installed"
        return True, Backend(name, array_api_strict, array_api_strict.Device("CPU_DEVICE"),
                             array_api_strict)
    if name.startswith("torch"):
        try:
            import torch
        except ImportError:
            return False, "torch is not installed"
        if name == "torch-cuda" and not torch.cuda.is_available():
            return False, "no CUDA device (torch.cuda.is_available() is False)"
        device = torch.device("cuda" if name == "torch-cuda" else "cpu")
        return True, Backend(name, array_api_compat.array_namespace(torch.empty(0)), device, torch)
    if name == "cupy":
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() == 0:
                return False, "no CUDA device for cupy"
        except Exception as exc:  # ImportError, or CUDA runtime errors without a driver
            return False, f"cupy unavailable: {type(exc).__name__}: {exc}"
        return True, Backend(name, array_api_compat.array_namespace(cupy.empty(0)),
                             cupy.cuda.Device(), cupy)
    raise ValueError(name)
