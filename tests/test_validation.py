"""Bad and unusual inputs to every public function and class of matfactor.

The contract (DESIGN.md, "Conventions", bad input), as these tests encode it:

1. Bad input raises ``TypeError`` (wrong type) or ``ValueError`` (wrong value), subclasses
   allowed, with the argument's name (as spelled in the signature) in the message. Any other
   exception is an "unclear exception"; a returned result holding NaN/Inf is a "silent wrong
   result"; a returned result for bad input is "accepted bad input".
2. Scalars are the same everywhere: a real argument accepts int, float, NumPy integer and
   floating scalars and ``fractions.Fraction`` with the result of the equal float, and rejects
   bool, ``np.bool_``, str, None (where required), complex, NaN, ±inf and out-of-range values;
   an integer argument accepts int and NumPy integers and rejects bool, float (even 3.0), str,
   None (where required) and out-of-range values; a flag accepts True/False and
   ``np.True_``/``np.False_`` and rejects "no", "yes", 0, 1 and None.
3. Arrays: None, lists, SciPy sparse matrices, torch sparse and "meta" tensors, integer, bool,
   complex and object arrays, 0-d/1-d/3-d and empty arrays, NaN/Inf entries, arrays of two
   libraries, shape mismatches, non-symmetric or negative-diagonal Gram matrices are errors;
   ``np.matrix`` and masked arrays are either a ``TypeError`` or treated as ``np.asarray``.
4. Inputs are never modified: every call below snapshots its arguments and compares after.
5. Result classes and patterns validate when constructed; warm starts are validated.

Every case runs through :func:`run_case`; ids read ``function-argument-case``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import re
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

import matfactor
from matfactor import (
    AdmmState,
    ConvergenceWarning,
    DoubleSparse,
    LowRank,
    Pivoted,
    ReconstructionStatistics,
    SparseLowRankBudget,
    SparsePlusLowRank,
    SparsityPattern,
    SylvesterSolver,
    admm_prune,
    admm_solve,
    double_sparse,
    dsf_budget_split,
    hassle_free_learning_rate,
    layer_error,
    lowrank_gd,
    lowrank_rank_for_density,
    magnitude_prune,
    magnitude_scores,
    mask_from_scores,
    mask_satisfies,
    mpifa,
    mpifa_lowrank,
    nnz_budget,
    parse_pattern,
    pifa_from_dense,
    pifa_from_factors,
    pifa_rank_for_density,
    randomized_svd,
    sparse_lowrank_budget,
    sparse_lowrank_rank,
    sparse_plus_lowrank,
    sparsegpt_prune,
    truncated_svd,
    update_U,
    update_V,
    wanda_prune,
    wanda_scores,
    weighted_lowrank,
)
from matfactor.testing import realistic_layer

torch = pytest.importorskip("torch")
sparse = pytest.importorskip("scipy.sparse")


# --------------------------------------------------------------------------- problem data
# Plain NumPy float64, computed without matfactor so that collection never depends on it.

D_IN, D_OUT, RANK = 16, 12, 3
_LAYER = realistic_layer(D_IN, D_OUT, seed=0)
W0, H0, X0 = _LAYER.W, _LAYER.H, _LAYER.X
_rng = np.random.default_rng(1)

_order = np.argsort(-np.abs(W0), axis=None, kind="stable")
MASK0 = np.zeros(W0.size, dtype=bool)
MASK0[_order[: W0.size // 2]] = True
MASK0 = MASK0.reshape(W0.shape)                       # density 0.5, unstructured
W_HAT0 = np.where(MASK0, W0, 0.0)                     # a pruned W
_u, _s, _vt = np.linalg.svd(W0, full_matrices=False)
U0 = _u[:, :RANK] * _s[:RANK]                         # (d_in, r)
V0 = _vt[:RANK].T                                     # (d_out, r)
PIVOTS0 = np.array([0, 5, 9], dtype=np.int64)         # pivot output channels
NON_PIVOTS0 = np.setdiff1d(np.arange(D_OUT), PIVOTS0).astype(np.int64)
W_P0 = W0[:, PIVOTS0]                                 # (d_in, r)
C_PIV0 = np.linalg.lstsq(W_P0, W0[:, NON_PIVOTS0], rcond=None)[0]   # (r, d_out - r)
K0 = min(D_IN, D_OUT)
A0 = np.where(_rng.random((D_IN, K0)) < 0.4, _rng.standard_normal((D_IN, K0)), 0.0)  # (d_in, k)
B0 = np.where(_rng.random((K0, D_OUT)) < 0.3, _rng.standard_normal((K0, D_OUT)), 0.0) + np.eye(K0)
N0 = W0.T @ W0                                        # (d_out, d_out) PSD, for Sylvester
N0 = (N0 + N0.T) / 2
RHS0 = _rng.standard_normal((D_IN, D_OUT))            # Sylvester right-hand side
XB0 = X0[:5]                                          # (5, d_in) inputs of a layer
X_COMP0 = X0 + 0.05 * _rng.standard_normal(X0.shape) * np.abs(X0).mean()
G0 = H0 @ W0                                          # cross term for update_U / update_V
SQUARE_MASK0 = np.eye(K0, dtype=bool) | (_rng.random((K0, K0)) < 0.15)


def _indefinite(S: np.ndarray) -> np.ndarray:
    """A symmetric matrix like ``S`` with one clearly negative eigenvalue."""
    e, Q = np.linalg.eigh(S)
    e = e.copy()
    e[0] = -0.5 * e[-1]
    M = (Q * e) @ Q.T
    return (M + M.T) / 2


def _nonsymmetric(S: np.ndarray) -> np.ndarray:
    return S + 0.1 * np.abs(S).max() * np.triu(np.ones_like(S), 1)


def _negative_diagonal(S: np.ndarray) -> np.ndarray:
    S = S.copy()
    S[1, 1] = -abs(S[1, 1]) - 1.0
    return S


# --------------------------------------------------------------------------- conversions


def _lib_array(x: Any, lib: str, dtype: str) -> Any:
    """A fresh copy of NumPy ``x`` in ``lib``; floating arrays cast to ``dtype``."""
    x = np.array(x, copy=True)
    if x.dtype.kind == "f":
        x = x.astype(dtype)
    return torch.from_numpy(x) if lib == "torch" else x


def _to_numpy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        if x.is_meta:
            return None
        if x.layout != torch.strided:
            x = x.to_dense()
        return x.detach().cpu().numpy().copy()
    if sparse.issparse(x):
        return x.toarray()
    if isinstance(x, np.ma.MaskedArray):
        return (np.array(x.data, copy=True), np.ma.getmaskarray(x).copy())
    if isinstance(x, np.ndarray):
        return np.array(x, copy=True)
    return x


def _matrix(x: Any) -> np.matrix:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(x)


def _torchify(x: np.ndarray) -> Any:
    return torch.from_numpy(np.array(x, copy=True))


def _with_fields(obj: Any, **overrides: Any) -> Any:
    """``obj`` with fields replaced *without* the class's validation (a corrupted object).

    Used to hand a bad warm start to a solver whatever the class's own constructor checks, so
    that the test exercises the solver's validation.
    """
    obj = dataclasses.replace(obj)
    for name, value in overrides.items():
        object.__setattr__(obj, name, value)
    return obj


# --------------------------------------------------------------------------- snapshots


def _snapshot(x: Any, depth: int = 0) -> Any:
    """A comparable deep copy of an input (arrays copied, objects by their fields)."""
    if depth > 6:
        return ("deep",)
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes, Fraction, np.generic)):
        nan = isinstance(x, (float, complex, np.inexact)) and bool(np.isnan(x))
        return ("scalar", type(x), "nan" if nan else x)
    if isinstance(x, torch.Tensor):
        if x.is_meta:
            return ("meta", tuple(x.shape), x.dtype)
        return ("torch", str(x.layout), x.dtype, _to_numpy(x))
    if sparse.issparse(x):
        return ("sparse", type(x), x.format, x.toarray().copy())
    if isinstance(x, np.ma.MaskedArray):
        return ("masked", np.array(x.data, copy=True), np.ma.getmaskarray(x).copy())
    if isinstance(x, np.ndarray):
        return ("ndarray", type(x), np.array(x, copy=True))
    if isinstance(x, (list, tuple)):
        return (type(x), [_snapshot(v, depth + 1) for v in x])
    if isinstance(x, dict):
        return ("dict", {k: _snapshot(v, depth + 1) for k, v in x.items()})
    if isinstance(x, (types.ModuleType, type)) or callable(x) and not hasattr(x, "__dict__"):
        return ("opaque", id(x))
    if dataclasses.is_dataclass(x):
        return (type(x), {f.name: _snapshot(getattr(x, f.name, None), depth + 1)
                          for f in dataclasses.fields(x)})
    if isinstance(x, types.FunctionType):
        return ("function", id(x))
    if hasattr(x, "__dict__"):
        return (type(x), {k: _snapshot(v, depth + 1) for k, v in vars(x).items()
                          if not isinstance(v, types.ModuleType)})
    return ("other", id(x))


def _same_snapshot(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype.kind == "O":
            return a.tolist() == b.tolist()
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(
            _same_snapshot(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_snapshot(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - any object may sit in an argument
        return a is b


# --------------------------------------------------------------------------- results


def _nonfinite(x: Any, depth: int = 0) -> str | None:
    """Where a result holds NaN/Inf (``None`` if nowhere)."""
    if depth > 5 or x is None or isinstance(x, (bool, str, types.ModuleType, type)):
        return None
    if isinstance(x, (float, np.floating)):
        return None if math.isfinite(x) else "a non-finite float"
    if isinstance(x, torch.Tensor):
        if x.is_meta or not (x.is_floating_point() or x.is_complex()):
            return None
        x = _to_numpy(x)
    if sparse.issparse(x):
        x = x.toarray()
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "fc" and not np.all(np.isfinite(np.asarray(x))):
            return f"NaN/Inf in a {x.shape} array"
        return None
    if isinstance(x, (list, tuple)):
        for v in x:
            where = _nonfinite(v, depth + 1)
            if where:
                return where
        return None
    if dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            where = _nonfinite(getattr(x, f.name, None), depth + 1)
            if where:
                return f"{f.name}: {where}"
        return None
    if hasattr(x, "__dict__") and not callable(x):
        for k, v in vars(x).items():
            where = _nonfinite(v, depth + 1)
            if where:
                return f"{k}: {where}"
    return None


def _difference(a: Any, b: Any, path: str = "result", depth: int = 0) -> str | None:
    """How result ``a`` differs from reference ``b`` (``None`` if the same to rounding)."""
    if depth > 5:
        return None
    if isinstance(a, (torch.Tensor, np.ndarray)) or isinstance(b, (torch.Tensor, np.ndarray)):
        if not isinstance(a, (torch.Tensor, np.ndarray)) or not isinstance(b, (torch.Tensor, np.ndarray)):
            return f"{path}: {type(a).__name__} against {type(b).__name__}"
        a, b = (np.asarray(_to_numpy(v)) if isinstance(v, torch.Tensor) else np.asarray(v)
                for v in (a, b))
        if a.dtype != b.dtype:
            return f"{path}: dtype {a.dtype} against {b.dtype}"
        if a.shape != b.shape:
            return f"{path}: shape {a.shape} against {b.shape}"
        if a.dtype.kind in "fc":
            rtol = 1e-5 if a.dtype in (np.float32, np.complex64) else 1e-9
            scale = float(np.max(np.abs(b))) if b.size else 0.0
            if not np.allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True):
                return f"{path}: values differ (max |diff| {np.nanmax(np.abs(a - b)):.3g})"
            return None
        return None if np.array_equal(a, b) else f"{path}: values differ"
    if isinstance(a, (bool, np.bool_)) or isinstance(b, (bool, np.bool_)):
        return None if bool(a) == bool(b) else f"{path}: {a!r} against {b!r}"
    if isinstance(a, (int, float, np.number, Fraction)) and isinstance(b, (int, float, np.number,
                                                                           Fraction)):
        return None if math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0) \
            or (math.isnan(float(a)) and math.isnan(float(b))) else f"{path}: {a!r} against {b!r}"
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} against {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            diff = _difference(x, y, f"{path}[{i}]", depth + 1)
            if diff:
                return diff
        return None
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} against {type(b).__name__}"
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            diff = _difference(getattr(a, f.name, None), getattr(b, f.name, None),
                               f"{path}.{f.name}", depth + 1)
            if diff:
                return diff
        return None
    if hasattr(a, "__dict__") and not callable(a):
        for k in vars(a):
            if isinstance(vars(a)[k], types.ModuleType):
                continue
            diff = _difference(vars(a)[k], vars(b).get(k), f"{path}.{k}", depth + 1)
            if diff:
                return diff
        return None
    try:
        return None if a == b else f"{path}: {a!r} against {b!r}"
    except Exception:  # noqa: BLE001 - any object may come back
        return None


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Real:
    """A real-valued scalar argument: a valid float (and int) value, and bad values."""

    value: float
    int_value: int | None = None
    bad: tuple = ()
    optional: bool = False


@dataclass(frozen=True)
class Int:
    value: int
    bad: tuple = (-1,)
    optional: bool = False


@dataclass(frozen=True)
class Flag:
    optional: bool = False


@dataclass(frozen=True)
class Choice:
    """A string option: unknown strings are a ValueError, other types an error."""

    bad_values: tuple = ("bogus",)
    bad_types: tuple = (3,)
    accepted: tuple = ()   # (label, value) pairs giving the same result as the baseline


@dataclass(frozen=True)
class Shape:
    pass


@dataclass(frozen=True)
class Arr:
    """An array argument.

    kind: "matrix" (a float 2-D array), "gram" (symmetric PSD (d, d), checked against W),
    "spd" (symmetric PSD of any size), "bool" (a boolean mask), "index" (1-D integers),
    "batch" (layer inputs (..., d_in)), "samples" (calibration batch (n, d_in) or (..., d_in)).
    """

    kind: str = "matrix"
    required: bool = True
    wrong_shapes: tuple = ()      # (label, shape) pairs invalid next to the other arguments
    partners: tuple = ()          # names a shape-mismatch message may give instead
    example: Callable[[], np.ndarray] | None = None   # a valid value when the baseline is None
    skip: tuple = ()              # case labels that are not part of this argument's contract


@dataclass
class Entry:
    name: str
    call: Callable[[dict], Any]
    make: Callable[[str, str], dict]     # (lib, dtype) -> baseline arguments
    scalars: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    mutates: tuple = ()                  # arguments that are modified by design (self of update)
    extra_bad: dict = field(default_factory=dict)   # argument -> values bad next to the others

    def args(self, lib: str = "numpy", dtype: str = "float64") -> dict:
        return self.make(lib, dtype)

    def all_scalars(self) -> dict:
        """The scalar specs: derived from the function's contract, then the hand-written
        ``scalars``, which replace a derived spec where the declaration cannot know enough."""
        specs = {**_declared_scalars(self), **self.scalars}
        for name, values in self.extra_bad.items():
            spec = specs[name]
            specs[name] = (dataclasses.replace(spec, bad_values=spec.bad_values + values)
                           if isinstance(spec, Choice) else
                           dataclasses.replace(spec, bad=spec.bad + values))
        return specs


# --------------------------------------------------------------------------- declared scalars
# The scalar part of the corpus follows from each function's contract (matfactor.contract): the
# valid value is the baseline's, and its int equivalent and the bad values follow from the
# declared kind, bounds and choices. An entry's hand-written ``scalars`` are only what a
# declaration cannot know: a value valid on its own that the rest of the baseline refuses, a
# bad value that is bad only next to another argument, a kind with its own corpus.

# Bad patterns for a (16, 12) weight: unparseable, n > m, n = 0, and m = 5 not dividing d_in.
_PATTERN = Choice(bad_values=("bogus", "3:2", "0:4", "2:4:8", "", "3:5"),
                  bad_types=(24, None, b"2:4"),
                  accepted=(("SparsityPattern", SparsityPattern("unstructured")),))


def _declared_function(entry: Entry) -> Any:
    """The public function, class or method an entry calls, or ``None`` without a contract."""
    owner, _, method = entry.name.partition(".")
    function = getattr(matfactor, owner)
    function = getattr(function, method) if method else function
    try:
        return matfactor.contract(function)
    except TypeError:
        return None


def _real_bounds(parameter: Any) -> tuple:
    """``(minimum, maximum, low_open, high_open)`` of a real-valued kind."""
    if parameter.kind == "damping":
        return 0.0, None, parameter.low_open, False
    if parameter.kind == "density":
        return 0.0, 1.0, True, False
    return parameter.minimum, parameter.maximum, parameter.low_open, parameter.high_open


def _within(x: float, low: Any, high: Any, low_open: bool, high_open: bool) -> bool:
    return (low is None or x > low or (x == low and not low_open)) \
        and (high is None or x < high or (x == high and not high_open))


def _real_spec(parameter: Any, value: float) -> Real:
    low, high, low_open, high_open = _real_bounds(parameter)
    # The first int at or above the value, else below it (0 is often a degenerate value).
    valid_ints = [i for i in (math.ceil(value), math.floor(value))
                  if _within(i, low, high, low_open, high_open)]
    bad: list = []
    if low is not None:
        if low_open:
            bad += [int(low), float(low)] if float(low).is_integer() else [low]
        bad.append(low - 0.1)
    if high is not None:
        if high_open:
            bad.append(high)
        bad.append(high + 0.5)
    return Real(value, valid_ints[0] if valid_ints else None, bad=tuple(bad),
                optional=parameter.optional)


def _int_spec(parameter: Any, value: int, baseline: dict) -> Int:
    if parameter.kind == "rank":
        low, high = 1, min(baseline["W"].shape)
    else:
        low, high = (baseline[b] if isinstance(b, str) else b
                     for b in (parameter.minimum, parameter.maximum))
    bad = [] if low is None else [low - 1] + ([-1] if low - 1 > -1 else [])
    bad += [] if high is None else [high + 1]
    return Int(value, bad=tuple(bad), optional=parameter.optional)


def _choice_spec(parameter: Any) -> Choice:
    shouted = parameter.choices[0].upper()
    return Choice(bad_values=("bogus", "") + ((shouted,) if shouted not in parameter.choices else ()),
                  bad_types=(3, 2.5) + (() if parameter.optional else (None,)))


def _declared_scalars(entry: Entry) -> dict:
    """The specs of the declared scalar parameters that the entry's baseline passes."""
    declared = _declared_function(entry)
    if declared is None:
        return {}
    baseline = entry.args("numpy", "float64")
    specs: dict = {}
    for name, parameter in declared.parameters.items():
        if name not in baseline:
            continue
        value, kind = baseline[name], parameter.kind
        if kind in ("real", "damping", "density"):
            specs[name] = _real_spec(parameter, value)
        elif kind in ("integer", "rank"):
            specs[name] = _int_spec(parameter, value, baseline)
        elif kind == "flag":
            specs[name] = Flag(optional=parameter.optional)
        elif kind in ("choice", "pruner") or (kind == "object" and parameter.choices):
            specs[name] = _choice_spec(parameter)
        elif kind == "pattern":
            specs[name] = _PATTERN
        elif kind == "shape":
            specs[name] = Shape()
        elif kind == "rng":
            accepted = (("np.int64", np.int64(value)),) if isinstance(value, int) else ()
            specs[name] = Choice(bad_values=(-1,), bad_types=("seed", 1.5, True), accepted=accepted)
    return specs


_GRAM = Arr("gram", wrong_shapes=(("wrong-size", (D_IN - 1, D_IN - 1)),), partners=("W",))
_GRAM_OPT = dataclasses.replace(_GRAM, required=False)


def _statistics(lib: str, dtype: str) -> ReconstructionStatistics:
    stats = ReconstructionStatistics(track_error_gram=True)
    return stats.update(_lib_array(X0, lib, dtype), _lib_array(X_COMP0, lib, dtype))


def _maker(build: Callable[[Callable[[Any], Any], str, str], dict]) -> Callable[[str, str], dict]:
    def make(lib: str, dtype: str) -> dict:
        return build(lambda x: _lib_array(x, lib, dtype), lib, dtype)
    return make


def _pruner_entry(name: str, fn: Callable, needs_H: bool, **options: Any) -> Entry:
    """A pruner's entry; ``options`` are its own arguments' baseline values."""
    return Entry(
        name,
        lambda a: fn(a["W"], a["H"], density=a["density"], pattern=a["pattern"],
                     **{k: a[k] for k in options}),
        _maker(lambda A, lib, dt: {"W": A(W0), "H": A(H0), "density": 0.5,
                                   "pattern": "unstructured", **options}),
        arrays={"W": Arr(), "H": _GRAM if needs_H else _GRAM_OPT},
    )


def _mpifa_entry(name: str, fn: Callable, extra: dict) -> Entry:
    def call(a: dict) -> Any:
        return fn(a["W"], a["statistics"], a["rank"], mix=a["mix"], alpha=a["alpha"],
                  iters=a["iters"], init=a["init"], **{k: a[k] for k in extra})

    return Entry(
        name, call,
        _maker(lambda A, lib, dt: {"W": A(W0), "statistics": _statistics(lib, dt), "rank": RANK,
                                   "mix": 0.25, "alpha": 1e-3, "iters": 1, "init": "weight",
                                   **extra}),
        arrays={"W": Arr(wrong_shapes=(("wrong-d_in", (D_IN - 1, D_OUT)),),
                         partners=("statistics",))},
    )


def _update_entry(name: str, fn: Callable, factor: str, rows: int) -> Entry:
    """update_U(V, H, G, W=, alpha=) or update_V(U, H, G, W=, alpha=)."""
    def call(a: dict) -> Any:
        return fn(a[factor], a["H"], a["G"], W=a["W"], alpha=a["alpha"])

    return Entry(
        name, call,
        _maker(lambda A, lib, dt: {factor: A(V0 if factor == "V" else U0), "H": A(H0),
                                   "G": A(G0), "W": A(W0), "alpha": 1e-3}),
        arrays={factor: Arr(wrong_shapes=(("wrong-rows", (rows - 1, RANK)),), partners=("G",)),
                "H": Arr("gram", wrong_shapes=(("wrong-size", (D_IN - 1, D_IN - 1)),),
                         partners=("G",)),
                "G": Arr(wrong_shapes=(("wrong-rows", (D_IN - 1, D_OUT)),),
                         partners=("H", "W", factor)),
                "W": Arr(required=False, wrong_shapes=(("wrong-shape", (D_IN, D_OUT - 1)),),
                         partners=("G",))},
    )


def _entries() -> list[Entry]:
    E: list[Entry] = []

    # ---- pruning and masks
    E.append(_pruner_entry("magnitude_prune", magnitude_prune, False))
    E.append(_pruner_entry("wanda_prune", wanda_prune, True))
    E.append(_pruner_entry("sparsegpt_prune", sparsegpt_prune, True, damping=0.01, block_size=4))
    E.append(Entry(
        "admm_prune",
        lambda a: admm_prune(a["W"], a["H"], density=a["density"], pattern=a["pattern"],
                             iters=a["iters"], gradual_iters=a["gradual_iters"],
                             damping=a["damping"], rho=a["rho"], warm_start=a["warm_start"],
                             return_state=a["return_state"]),
        _maker(lambda A, lib, dt: {"W": A(W0), "H": A(H0), "density": 0.5,
                                   "pattern": "unstructured", "iters": 3, "gradual_iters": 2,
                                   "damping": 0.1, "rho": 1.0, "warm_start": None,
                                   "return_state": False}),
        arrays={"W": Arr(), "H": _GRAM},
    ))
    E.append(Entry(
        "admm_solve",
        lambda a: admm_solve(a["W"], a["H"], a["mask"], damping=a["damping"], rho=a["rho"],
                             tol=a["tol"], max_iters=a["max_iters"], check_every=a["check_every"],
                             adaptive_rho=a["adaptive_rho"], warm_start=a["warm_start"],
                             return_state=a["return_state"]),
        _maker(lambda A, lib, dt: {"W": A(W0), "H": A(H0), "mask": A(MASK0), "damping": 0.01,
                                   "rho": 1.0, "tol": 1e-6, "max_iters": 20, "check_every": 5,
                                   "adaptive_rho": True, "warm_start": None,
                                   "return_state": False}),
        arrays={"W": Arr(), "H": _GRAM,
                "mask": Arr("bool", wrong_shapes=(("wrong-shape", (D_IN, D_OUT - 1)),),
                            partners=("W",))},
    ))
    E.append(Entry(
        "mask_from_scores",
        lambda a: mask_from_scores(a["scores"], a["density"], a["pattern"]),
        _maker(lambda A, lib, dt: {"scores": A(np.abs(W0)), "density": 0.5,
                                   "pattern": "unstructured"}),
        arrays={"scores": Arr()},
    ))
    E.append(Entry(
        "magnitude_scores",
        lambda a: magnitude_scores(a["W"]),
        _maker(lambda A, lib, dt: {"W": A(W0)}),
        arrays={"W": Arr()},
    ))
    E.append(Entry(
        "wanda_scores",
        lambda a: wanda_scores(a["W"], a["H"]),
        _maker(lambda A, lib, dt: {"W": A(W0), "H": A(H0)}),
        arrays={"W": Arr(), "H": _GRAM},
    ))
    E.append(Entry(
        "mask_satisfies",
        lambda a: mask_satisfies(a["mask"], a["density"], a["pattern"], exact=a["exact"]),
        _maker(lambda A, lib, dt: {"mask": A(MASK0), "density": 0.5, "pattern": "unstructured",
                                   "exact": True}),
        arrays={"mask": Arr("bool")},
    ))
    E.append(Entry(
        "nnz_budget",
        lambda a: nnz_budget(a["shape"], a["density"], a["pattern"]),
        lambda lib, dt: {"shape": (D_IN, D_OUT), "density": 0.5, "pattern": "unstructured"},
    ))
    E.append(Entry(
        "parse_pattern",
        lambda a: parse_pattern(a["pattern"]),
        lambda lib, dt: {"pattern": "2:4"},
        # The parser itself: its own corpus (no weight, so "3:5" is valid here).
        scalars={"pattern": Choice(bad_values=("bogus", "3:2", "0:4", "2:0", "2:4:8", "", "-1:4",
                                               "2.0:4", "n:m"),
                                   bad_types=(24, None, b"2:4", 2.4),
                                   accepted=(("SparsityPattern", SparsityPattern("n:m", 2, 4)),
                                             ("spaces", " 2:4 ")))},
    ))
    E.append(Entry(
        "SparsityPattern",
        lambda a: SparsityPattern(a["kind"], a["n"], a["m"]),
        lambda lib, dt: {"kind": "n:m", "n": 2, "m": 4},
        extra_bad={"m": (1,)},   # below n = 2
    ))

    # ---- ADMM state (a result class and a warm start)
    E.append(Entry(
        "AdmmState",
        lambda a: AdmmState(a["Z"], a["U"], a["mask"], a["iterations"], a["converged"]),
        _maker(lambda A, lib, dt: {"Z": A(W_HAT0), "U": A(np.zeros_like(W0)), "mask": A(MASK0),
                                   "iterations": 3, "converged": None}),
        arrays={"Z": Arr(skip=("entry-nan", "entry-inf", "entry--inf")),
                "U": Arr(wrong_shapes=(("wrong-shape", (D_IN, D_OUT - 1)),), partners=("Z",),
                         skip=("entry-nan", "entry-inf", "entry--inf")),
                "mask": Arr("bool", wrong_shapes=(("wrong-shape", (D_IN, D_OUT - 1)),),
                            partners=("Z",))},
    ))

    # ---- low rank
    E.append(Entry(
        "truncated_svd", lambda a: truncated_svd(a["W"], a["rank"]),
        _maker(lambda A, lib, dt: {"W": A(W0), "rank": RANK}),
        arrays={"W": Arr()},
    ))
    E.append(Entry(
        "randomized_svd",
        lambda a: randomized_svd(a["W"], a["rank"], oversampling=a["oversampling"],
                                 power_iters=a["power_iters"], rng=a["rng"]),
        _maker(lambda A, lib, dt: {"W": A(W0), "rank": RANK, "oversampling": 2,
                                   "power_iters": 1, "rng": 0}),
        arrays={"W": Arr()},
    ))
    E.append(Entry(
        "weighted_lowrank",
        lambda a: weighted_lowrank(a["W"], a["H"], a["rank"], damping=a["damping"]),
        _maker(lambda A, lib, dt: {"W": A(W0), "H": A(H0), "rank": RANK, "damping": 0.01}),
        arrays={"W": Arr(), "H": _GRAM},
    ))
    E.append(Entry(
        "lowrank_gd",
        lambda a: lowrank_gd(a["W"], a["H"], a["rank"], iters=a["iters"], lr=a["lr"],
                             init=a["init"], scaled=a["scaled"], damping=a["damping"],
                             rng=a["rng"], return_history=a["return_history"],
                             check_every=a["check_every"]),
        _maker(lambda A, lib, dt: {"W": A(W0), "H": A(H0), "rank": RANK, "iters": 2, "lr": 0.01,
                                   "init": None, "scaled": True, "damping": 0.01, "rng": None,
                                   "return_history": True, "check_every": 1}),
        arrays={"W": Arr(), "H": _GRAM},
    ))
    E.append(Entry(
        "lowrank_rank_for_density",
        lambda a: lowrank_rank_for_density(a["shape"], a["density"]),
        lambda lib, dt: {"shape": (D_IN, D_OUT), "density": 0.5},
    ))
    E.append(Entry(
        "hassle_free_learning_rate",
        lambda a: hassle_free_learning_rate(a["iteration"], a["base_lr"]),
        lambda lib, dt: {"iteration": 3, "base_lr": 0.01},
    ))
    E.append(Entry(
        "LowRank", lambda a: LowRank(a["U"], a["V"]),
        _maker(lambda A, lib, dt: {"U": A(U0), "V": A(V0)}),
        arrays={"U": Arr(), "V": Arr(wrong_shapes=(("wrong-rank", (D_OUT, RANK + 1)),),
                                     partners=("U",))},
    ))

    # ---- result-class methods
    def methods(cls_name: str, build: Callable[[Callable], Any]) -> list[Entry]:
        self_maker = _maker(lambda A, lib, dt: {"self": build(A)})
        return [
            Entry(f"{cls_name}.dense", lambda a: a["self"].dense(), self_maker),
            Entry(f"{cls_name}.matmul", lambda a: a["self"].matmul(a["X"]),
                  _maker(lambda A, lib, dt: {"self": build(A), "X": A(XB0)}),
                  arrays={"X": Arr("batch")}),
            Entry(f"{cls_name}.rel_error", lambda a: a["self"].rel_error(a["W"], a["H"]),
                  _maker(lambda A, lib, dt: {"self": build(A), "W": A(W0), "H": A(H0)}),
                  arrays={"W": Arr(wrong_shapes=(("wrong-shape", (D_IN, D_OUT - 1)),),
                                   partners=("W_hat", "H")),
                          "H": _GRAM_OPT}),
        ]

    E.extend(methods("LowRank", lambda A: LowRank(A(U0), A(V0))))
    E.extend(methods("Pivoted", lambda A: Pivoted(A(PIVOTS0), A(NON_PIVOTS0), A(W_P0), A(C_PIV0))))
    E.extend(methods("DoubleSparse", lambda A: DoubleSparse(A(A0), A(B0))))
    E.extend(methods("SparsePlusLowRank", lambda A: SparsePlusLowRank(A(W_HAT0), A(U0), A(V0))))
    E.append(Entry(
        "SparsePlusLowRank.pifa", lambda a: a["self"].pifa(rtol=a["rtol"]),
        _maker(lambda A, lib, dt: {"self": SparsePlusLowRank(A(W_HAT0), A(U0), A(V0)),
                                   "rtol": 1e-3}),
    ))

    # ---- result classes
    E.append(Entry(
        "Pivoted", lambda a: Pivoted(a["pivots"], a["non_pivots"], a["W_p"], a["C"]),
        _maker(lambda A, lib, dt: {"pivots": A(PIVOTS0), "non_pivots": A(NON_PIVOTS0),
                                   "W_p": A(W_P0), "C": A(C_PIV0)}),
        arrays={"pivots": Arr("index", wrong_shapes=(("too-many", (RANK + 1,)),),
                              partners=("W_p", "C", "non_pivots")),
                "non_pivots": Arr("index", wrong_shapes=(("too-many", (D_OUT - RANK + 1,)),),
                                  partners=("C", "pivots")),
                "W_p": Arr(wrong_shapes=(("wrong-rank", (D_IN, RANK + 1)),),
                           partners=("pivots", "C")),
                "C": Arr(wrong_shapes=(("wrong-rank", (RANK + 1, D_OUT - RANK)),
                                       ("wrong-width", (RANK, D_OUT - RANK - 1))),
                         partners=("pivots", "non_pivots", "W_p"))},
    ))
    E.append(Entry(
        "DoubleSparse", lambda a: DoubleSparse(a["A"], a["B"]),
        _maker(lambda A, lib, dt: {"A": A(A0), "B": A(B0)}),
        arrays={"A": Arr(), "B": Arr(wrong_shapes=(("wrong-inner", (K0 - 1, D_OUT)),),
                                     partners=("A",))},
    ))
    E.append(Entry(
        "SparsePlusLowRank", lambda a: SparsePlusLowRank(a["S"], a["U"], a["V"]),
        _maker(lambda A, lib, dt: {"S": A(W_HAT0), "U": A(U0), "V": A(V0)}),
        arrays={"S": Arr(wrong_shapes=(("transposed", (D_OUT, D_IN)),), partners=("U", "V")),
                "U": Arr(wrong_shapes=(("wrong-rank", (D_IN, RANK + 1)),), partners=("S", "V")),
                "V": Arr(wrong_shapes=(("wrong-rows", (D_OUT - 1, RANK)),), partners=("S", "U"))},
    ))

    # ---- PIFA and MPIFA
    E.append(Entry(
        "pifa_from_dense", lambda a: pifa_from_dense(a["W"], a["rank"], rtol=a["rtol"]),
        _maker(lambda A, lib, dt: {"W": A(W0), "rank": RANK, "rtol": 1e-3}),
        arrays={"W": Arr()},
    ))
    E.append(Entry(
        "pifa_from_factors", lambda a: pifa_from_factors(a["U"], a["V"], rtol=a["rtol"]),
        _maker(lambda A, lib, dt: {"U": A(U0), "V": A(V0), "rtol": 1e-3}),
        arrays={"U": Arr(), "V": Arr(wrong_shapes=(("wrong-rank", (D_OUT, RANK + 1)),),
                                     partners=("U",))},
    ))
    E.append(Entry(
        "pifa_rank_for_density",
        lambda a: pifa_rank_for_density(a["shape"], a["density"], multiple_of=a["multiple_of"]),
        lambda lib, dt: {"shape": (D_IN, D_OUT), "density": 0.5, "multiple_of": 2},
    ))
    E.append(_mpifa_entry("mpifa", mpifa, {"rtol": 1e-3}))
    E.append(_mpifa_entry("mpifa_lowrank", mpifa_lowrank, {}))
    E.append(_update_entry("update_U", update_U, "V", D_OUT))
    E.append(_update_entry("update_V", update_V, "U", D_IN))
    E.append(Entry(
        "ReconstructionStatistics",
        lambda a: ReconstructionStatistics(dtype=a["dtype"], track_error_gram=a["track_error_gram"]),
        lambda lib, dt: {"dtype": "float64", "track_error_gram": False},
        # The accumulation dtype has its own corpus: dtypes that are not accumulation dtypes.
        scalars={"dtype": Choice(bad_values=("float16", "bogus", "int32"),
                                 bad_types=(np.float32, 32))},
    ))
    E.append(Entry(
        "ReconstructionStatistics.update",
        lambda a: a["self"].update(a["X_dense"], a["X_compressed"]),
        _maker(lambda A, lib, dt: {"self": ReconstructionStatistics(track_error_gram=True),
                                   "X_dense": A(X0), "X_compressed": A(X_COMP0)}),
        arrays={"X_dense": Arr("samples"),
                "X_compressed": Arr("samples", required=False,
                                    wrong_shapes=(("fewer-samples", (X0.shape[0] - 1, D_IN)),
                                                  ("wrong-d_in", (X0.shape[0], D_IN - 1))),
                                    partners=("X_dense",))},
        mutates=("self",),
    ))
    E.append(Entry(
        "ReconstructionStatistics.target",
        lambda a: a["self"].target(a["W"], a["mix"]),
        _maker(lambda A, lib, dt: {"self": _statistics(lib, dt), "W": A(W0), "mix": 0.25}),
        arrays={"W": Arr(wrong_shapes=(("wrong-d_in", (D_IN - 1, D_OUT)),),
                         partners=("statistics",))},
    ))
    E.append(Entry(
        "ReconstructionStatistics.target_weight",
        lambda a: a["self"].target_weight(a["W"], a["mix"], a["alpha"]),
        _maker(lambda A, lib, dt: {"self": _statistics(lib, dt), "W": A(W0), "mix": 0.25,
                                   "alpha": 1e-3}),
        arrays={"W": Arr(wrong_shapes=(("wrong-d_in", (D_IN - 1, D_OUT)),),
                         partners=("statistics",))},
    ))
    E.append(Entry(
        "ReconstructionStatistics.objective",
        lambda a: a["self"].objective(a["W"], a["W_hat"], a["mix"], a["alpha"]),
        _maker(lambda A, lib, dt: {"self": _statistics(lib, dt), "W": A(W0), "W_hat": A(W_HAT0),
                                   "mix": 0.25, "alpha": 1e-3}),
        arrays={"W": Arr(wrong_shapes=(("wrong-d_in", (D_IN - 1, D_OUT)),),
                         partners=("statistics", "W_hat")),
                "W_hat": Arr(wrong_shapes=(("wrong-shape", (D_IN, D_OUT - 1)),),
                             partners=("W",))},
    ))

    # ---- double sparse
    E.append(Entry(
        "double_sparse",
        lambda a: double_sparse(a["W"], a["density"], a["H"], split=a["split"],
                                outer_iters=a["outer_iters"], inner_iters=a["inner_iters"],
                                mask_iters=a["mask_iters"], damping=a["damping"],
                                finalize=a["finalize"],
                                finalize_input_factor=a["finalize_input_factor"],
                                finalize_iters=a["finalize_iters"],
                                square_mask=a["square_mask"]),
        _maker(lambda A, lib, dt: {"W": A(W0), "density": 0.5, "H": A(H0), "split": 0.3,
                                   "outer_iters": 2, "inner_iters": 2, "mask_iters": 1,
                                   "damping": 0.01, "finalize": True,
                                   "finalize_input_factor": True, "finalize_iters": 2,
                                   "square_mask": None}),
        arrays={"W": Arr(), "H": _GRAM_OPT,
                "square_mask": Arr("bool", required=False,
                                   wrong_shapes=(("wrong-shape", (D_IN, D_IN)),),
                                   example=lambda: SQUARE_MASK0)},
    ))
    E.append(Entry(
        "dsf_budget_split",
        lambda a: dsf_budget_split(a["shape"], a["density"], a["split"], a["layerwise"]),
        lambda lib, dt: {"shape": (D_IN, D_OUT), "density": 0.5, "split": 0.3, "layerwise": False},
    ))

    # ---- sparse plus low rank
    E.append(Entry(
        "sparse_plus_lowrank",
        lambda a: sparse_plus_lowrank(a["W"], a["H"], a["rank"], density=a["density"],
                                      pattern=a["pattern"], pruner=a["pruner"],
                                      lowrank=a["lowrank"], hessian=a["hessian"],
                                      iters=a["iters"], lowrank_iters=a["lowrank_iters"],
                                      lr=a["lr"], scaled=a["scaled"], init=a["init"],
                                      pruner_options=a["pruner_options"], rng=a["rng"]),
        _maker(lambda A, lib, dt: {"W": A(W0), "H": A(H0), "rank": 2, "density": 0.5,
                                   "pattern": "unstructured", "pruner": None, "lowrank": None,
                                   "hessian": "full", "iters": 2, "lowrank_iters": 2, "lr": 0.1,
                                   "scaled": True, "init": None, "pruner_options": None,
                                   "rng": None}),
        arrays={"W": Arr(), "H": _GRAM},
    ))
    E.append(Entry(
        "sparse_lowrank_rank",
        lambda a: sparse_lowrank_rank(a["shape"], a["compression"], pattern=a["pattern"],
                                      density=a["density"]),
        lambda lib, dt: {"shape": (D_IN, D_OUT), "compression": 0.25, "pattern": "unstructured",
                         "density": 0.25},
        # density = 1 (the int equivalent) leaves nothing of this compression's budget.
        scalars={"density": Real(0.25, None, bad=(0, 1.5, -0.1))},
    ))
    E.append(Entry(
        "sparse_lowrank_budget",
        lambda a: sparse_lowrank_budget(a["shape"], a["compression"], a["rank_ratio"]),
        lambda lib, dt: {"shape": (D_IN, D_OUT), "compression": 0.5, "rank_ratio": 0.3},
    ))
    E.append(Entry(
        "layer_error", lambda a: layer_error(a["W"], a["W_hat"], a["H"]),
        _maker(lambda A, lib, dt: {"W": A(W0), "W_hat": A(W_HAT0), "H": A(H0)}),
        arrays={"W": Arr(), "W_hat": Arr(wrong_shapes=(("wrong-shape", (D_IN, D_OUT - 1)),),
                                         partners=("W",)),
                "H": _GRAM_OPT},
    ))

    # ---- contracts (bad functions in tests/test_contracts.py)
    E.append(Entry("contract", lambda a: matfactor.contract(a["function"]),
                   lambda lib, dt: {"function": sparsegpt_prune}))

    # ---- Sylvester
    E.append(Entry(
        "SylvesterSolver", lambda a: SylvesterSolver(a["M"], a["N"]),
        _maker(lambda A, lib, dt: {"M": A(H0), "N": A(N0)}),
        arrays={"M": Arr("spd"), "N": Arr("spd")},
    ))
    E.append(Entry(
        "SylvesterSolver.solve", lambda a: a["self"].solve(a["C"], a["rho"]),
        _maker(lambda A, lib, dt: {"self": SylvesterSolver(A(H0), A(N0)), "C": A(RHS0),
                                   "rho": 1.0}),
        extra_bad={"rho": (0,)},   # M = H0 is singular (dead inputs)
        arrays={"C": Arr(wrong_shapes=(("transposed", (D_OUT, D_IN)),
                                       ("wrong-width", (D_IN, D_OUT - 1))))},
    ))
    return E


ENTRIES = {e.name: e for e in _entries()}


def test_every_public_name_is_covered():
    """The corpus reaches everything in ``matfactor.__all__`` (the rest in dedicated tests)."""
    covered = {name.split(".")[0] for name in ENTRIES}
    covered |= {"ConvergenceWarning", "Pruner", "SparseLowRankBudget"}  # see SPECIAL cases
    assert set(matfactor.__all__) <= covered, sorted(set(matfactor.__all__) - covered)


# Parameter names that are arrays (or a device): a public callable taking nothing else has no
# scalar to declare.
_ARRAY_PARAMETERS = {"W", "H", "W_hat", "X", "X_dense", "X_compressed", "U", "V", "S", "A", "B",
                     "M", "N", "C", "pivots", "non_pivots", "W_p", "scores", "mask", "device"}
# Public callables without a contract, and why.
_UNDECLARED = {
    "ConvergenceWarning": "a warning class",
    "Pruner": "a protocol: its __call__ declares the shared pruner parameters",
    "SparseLowRankBudget": "a plain result tuple that validates nothing",
    "contract": "the accessor itself; its one argument is checked by it",
}


def _public_callables() -> list:
    """``(name, callable)`` for every public function and class and each public method."""
    found = []
    for name in matfactor.__all__:
        obj = getattr(matfactor, name)
        found.append((name, obj))
        if isinstance(obj, type):
            found += [(f"{name}.{k}", v) for k, v in vars(obj).items()
                      if not k.startswith("_") and isinstance(v, types.FunctionType)]
    return found


@pytest.mark.parametrize("name, function", _public_callables(), ids=[n for n, _ in _public_callables()])
def test_every_public_function_with_scalars_declares_them(name: str, function: Any) -> None:
    """Each public callable with scalar parameters has a contract, whose parameters are exactly
    its signature's (``self`` apart), in order, with the signature's defaults."""
    if name in _UNDECLARED:
        return
    signature = inspect.signature(function)
    names = [k for k in signature.parameters if k != "self"]
    if not hasattr(function, "__contract__"):
        assert set(names) <= _ARRAY_PARAMETERS, f"{name} takes {names} but declares no contract"
        return
    declared = matfactor.contract(function)
    assert list(declared.parameters) == names
    for key, parameter in declared.parameters.items():
        default = signature.parameters[key].default
        if default is inspect.Parameter.empty:
            assert parameter.required, key
        else:
            assert not parameter.required and parameter.default == default, key


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Raises:
    """The call must raise one of ``types`` naming, for each group, one of its names."""

    types: tuple
    require: tuple   # tuple of groups (tuples of names); each group must be named


@dataclass(frozen=True)
class Same:
    """The call must succeed and equal the reference call (``None``: the baseline)."""

    reference: Callable[[dict], dict] | None = None
    reference_dtype: str | None = None


@dataclass(frozen=True)
class SameOrRaises:
    """Either a TypeError naming the argument, or the result of the reference call with the
    argument as a plain ndarray (``reference`` modifies the baseline; ``None``: the baseline)."""

    types: tuple
    require: tuple
    reference: Callable[[dict], dict] | None = None
    reference_dtype: str | None = None


@dataclass(frozen=True)
class Ok:
    """The call must succeed with a finite result passing ``check(result, args)``."""

    check: Callable[[Any, dict], str | None] | None = None


@dataclass(frozen=True)
class OkOrRaises:
    types: tuple
    require: tuple
    check: Callable[[Any, dict], str | None] | None = None


@dataclass(frozen=True)
class Case:
    id: str
    entry: str
    modify: Callable[[dict], dict] | None = None   # from baseline args to the case's args
    expect: Any = Ok()
    lib: str = "numpy"
    dtype: str = "float64"
    call: Callable[[dict], Any] | None = None      # overrides the entry's call


_TE = (TypeError,)
_VE = (ValueError,)
_EITHER = (TypeError, ValueError)


def _named(message: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


@dataclass
class Outcome:
    result: Any
    error: BaseException | None
    modified: list


def _invoke(call: Callable[[dict], Any], args: dict, mutates: tuple = ()) -> Outcome:
    before = {k: _snapshot(v) for k, v in args.items() if k not in mutates}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)   # np.matrix
        try:
            result, error = call(args), None
        except Exception as exc:  # noqa: BLE001 - classified below
            result, error = None, exc
    modified = [k for k, snap in before.items() if not _same_snapshot(snap, _snapshot(args[k]))]
    return Outcome(result, error, modified)


_REFERENCES: dict = {}


def _key(value: Any) -> Any:
    """A cache key for an argument: arrays by content, anything else by repr (objects whose
    repr holds their id are then never shared)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        array = np.ascontiguousarray(_to_numpy(value))
        return ("array", type(value).__name__, array.shape, str(array.dtype),
                hashlib.sha1(array.tobytes()).hexdigest())
    return repr(value)


def _reference(entry: Entry, key: Any, args: dict) -> Any:
    if key not in _REFERENCES:
        outcome = _invoke(entry.call, args, entry.mutates)
        if outcome.error is not None:
            pytest.fail(f"the reference call failed: {type(outcome.error).__name__}: "
                        f"{outcome.error}")
        _REFERENCES[key] = outcome.result
    return _REFERENCES[key]


def _short(message: str, limit: int = 200) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= limit else message[:limit] + "..."


def _check_error(outcome: Outcome, types_: tuple, require: tuple) -> str | None:
    error = outcome.error
    if not isinstance(error, types_):
        return (f"unclear exception {type(error).__name__} (expected "
                f"{'/'.join(t.__name__ for t in types_)}): {_short(error)}")
    message = str(error)
    missing = [group for group in require if not any(_named(message, n) for n in group)]
    if missing:
        wanted = " and ".join("/".join(g) for g in missing)
        return f"{type(error).__name__} does not name {wanted}: {_short(message)}"
    return None


def run_case(case: Case) -> None:
    entry = ENTRIES[case.entry]
    args = entry.args(case.lib, case.dtype)
    if case.modify is not None:
        args = case.modify(args)
    call = case.call or entry.call
    outcome = _invoke(call, args, entry.mutates)
    problems = []
    expect = case.expect
    if outcome.error is None:
        where = _nonfinite(outcome.result)
        if isinstance(expect, (Raises,)):
            problems.append("silent wrong result: " + where if where else
                            f"accepted bad input (returned {type(outcome.result).__name__})")
        elif where:
            problems.append(f"silent wrong result: {where}")
        elif isinstance(expect, (Same, SameOrRaises)):
            if expect.reference is not None:
                ref_args = expect.reference(entry.args(case.lib, expect.reference_dtype
                                                       or case.dtype))
                key = (entry.name, case.lib, expect.reference_dtype or case.dtype,
                       tuple(sorted((k, _key(v)) for k, v in ref_args.items())))
            else:
                ref_args = entry.args(case.lib, case.dtype)
                key = (entry.name, case.lib, case.dtype, "baseline")
            reference = _reference(entry, key, ref_args)
            diff = _difference(outcome.result, reference)
            if diff:
                problems.append(f"different result from the equivalent input: {diff}")
        elif isinstance(expect, (Ok, OkOrRaises)) and expect.check is not None:
            message = expect.check(outcome.result, args)
            if message:
                problems.append(message)
    else:
        if isinstance(expect, (Raises, SameOrRaises, OkOrRaises)):
            message = _check_error(outcome, expect.types, expect.require)
            if message:
                problems.append(message)
        else:
            problems.append(f"rejected valid input: {type(outcome.error).__name__}: "
                            f"{_short(outcome.error)}")
    if outcome.modified:
        problems.append(f"input modified: {', '.join(outcome.modified)}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


def _set(**changes: Any) -> Callable[[dict], dict]:
    """Replace arguments; a ``lambda`` value is evaluated on the baseline arguments (so that each
    run builds its own fresh object), any other value (a named function too) is used as is."""
    def modify(args: dict) -> dict:
        return {**args, **{k: (v(args) if getattr(v, "__name__", "") == "<lambda>" else v)
                           for k, v in changes.items()}}
    return modify


def _set_value(name: str, value: Any) -> Callable[[dict], dict]:
    """Replace one argument by ``value`` as it is (no call even if callable)."""
    def modify(args: dict) -> dict:
        return {**args, name: value}
    return modify


# --------------------------------------------------------------------------- valid baselines


def _baseline_cases() -> list:
    params = []
    for name in ENTRIES:
        for dtype in ("float64", "float32"):
            params.append(pytest.param(Case(f"{name}-baseline-{dtype}", name, dtype=dtype,
                                            expect=Ok()), id=f"{name}-baseline-{dtype}"))
    return params


@pytest.mark.parametrize("case", _baseline_cases())
def test_valid_baseline(case: Case) -> None:
    """Each entry's valid call succeeds, is finite and leaves its inputs unchanged."""
    run_case(case)


# --------------------------------------------------------------------------- scalars


def _fraction(value: float) -> Fraction:
    return Fraction(repr(value))


def _scalar_cases() -> list:
    cases: list[Case] = []
    for entry in ENTRIES.values():
        for arg, spec in entry.all_scalars().items():
            prefix = f"{entry.name}-{arg}"

            def add(label: str, value: Any, expect: Any, dtype: str = "float64",
                    arg: str = arg, prefix: str = prefix, entry: Entry = entry) -> None:
                cases.append(Case(f"{prefix}-{label}", entry.name, _set_value(arg, value),
                                  expect, dtype=dtype))

            if isinstance(spec, Real):
                v = spec.value
                def same_as(ref: Any, arg: str = arg) -> Same:
                    return Same(_set_value(arg, ref))
                add("float", v, Ok())
                add("np.float64", np.float64(v), same_as(float(np.float64(v))))
                add("np.float32", np.float32(v), same_as(float(np.float32(v))))
                add("Fraction", _fraction(v), same_as(float(_fraction(v))))
                add("np.float64-with-float32-inputs", np.float64(v),
                    Same(_set_value(arg, float(v))), dtype="float32")
                if spec.int_value is not None:
                    i = spec.int_value
                    add("int", i, same_as(float(i)))
                    add("np.int64", np.int64(i), same_as(float(i)))
                    add("np.int32", np.int32(i), same_as(float(i)))
                for label, bad in (("bool", True), ("np.bool_", np.bool_(True)),
                                   ("str-number", str(v)), ("str-no", "no"),
                                   ("complex", complex(v, 0.0))):
                    add(label, bad, Raises(_EITHER, ((arg,),)))
                if not spec.optional:
                    add("None", None, Raises(_EITHER, ((arg,),)))
                else:
                    add("None", None, Ok())
                for label, bad in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
                    add(label, bad, Raises(_VE, ((arg,),)))
                for bad in spec.bad:
                    add(f"out-of-range-{bad!r}", bad, Raises(_VE, ((arg,),)))
            elif isinstance(spec, Int):
                v = spec.value
                def same_as(ref: Any, arg: str = arg) -> Same:
                    return Same(_set_value(arg, ref))
                add("int", v, Ok())
                add("np.int64", np.int64(v), same_as(v))
                add("np.int32", np.int32(v), same_as(v))
                for label, bad in (("bool", True), ("np.bool_", np.bool_(True)),
                                   ("float", float(v)), ("float-fractional", v + 0.5),
                                   ("str", str(v))):
                    add(label, bad, Raises(_EITHER, ((arg,),)))
                if not spec.optional:
                    add("None", None, Raises(_EITHER, ((arg,),)))
                else:
                    add("None", None, Ok())
                for bad in spec.bad:
                    add(f"out-of-range-{bad!r}", bad, Raises(_VE, ((arg,),)))
            elif isinstance(spec, Flag):
                add("True", True, Ok())
                add("False", False, Ok())
                add("np.True_", np.True_, Same(_set_value(arg, True)))
                add("np.False_", np.False_, Same(_set_value(arg, False)))
                for label, bad in (("str-no", "no"), ("str-yes", "yes"), ("int-0", 0),
                                   ("int-1", 1)):
                    add(label, bad, Raises(_EITHER, ((arg,),)))
                if not spec.optional:
                    add("None", None, Raises(_EITHER, ((arg,),)))
            elif isinstance(spec, Choice):
                for bad in spec.bad_values:
                    add(f"value-{bad!r}", bad, Raises(_VE, ((arg,),)))
                for bad in spec.bad_types:
                    label = bad.__name__ if isinstance(bad, type) else repr(bad)
                    add(f"type-{label}", bad, Raises(_EITHER, ((arg,),)))
                for label, value in spec.accepted:
                    add(f"accepted-{label}", value, Same())
            elif isinstance(spec, Shape):
                add("np.int64", (np.int64(D_IN), np.int64(D_OUT)), Same())
                add("torch.Size", torch.Size([D_IN, D_OUT]), Same())
                add("ndarray.shape", W0.shape, Same())
                for label, bad in (("negative", (-D_IN, D_OUT)), ("zero", (0, D_OUT)),
                                   ("one-dim", (D_IN,)), ("three-dims", (D_IN, D_OUT, 1)),
                                   ("float-dims", (float(D_IN), D_OUT)),
                                   ("fractional-dims", (16.5, D_OUT))):
                    add(label, bad, Raises(_VE, ((arg,),)))
                for label, bad in (("None", None), ("str", "16x12"), ("bool-dim", (True, D_OUT)),
                                   ("int", D_IN), ("str-dims", ("16", "12"))):
                    add(label, bad, Raises(_EITHER, ((arg,),)))
    return [pytest.param(c, id=c.id) for c in cases]


@pytest.mark.parametrize("case", _scalar_cases())
def test_scalar_consistency(case: Case) -> None:
    """Every scalar argument accepts and rejects the same types, everywhere.

    Accepted types (NumPy scalars, Fraction, ints for reals) give the result of the equal
    Python float/int; rejected ones (bool, str, None, complex, NaN, inf, out of range) raise a
    TypeError/ValueError naming the argument.
    """
    run_case(case)


# --------------------------------------------------------------------------- arrays


def _example(entry: Entry, arg: str, spec: Arr) -> np.ndarray:
    value = entry.args("numpy", "float64")[arg]
    if value is None:
        value = spec.example()
    return np.asarray(value)


def _one_masked(x: np.ndarray) -> np.ma.MaskedArray:
    mask = np.zeros(x.shape, dtype=bool)
    mask.flat[0] = True
    return np.ma.masked_array(np.array(x, copy=True), mask=mask)


def _other_array_args(entry: Entry, arg: str) -> tuple:
    base = entry.args("numpy", "float64")
    names = [k for k, v in base.items() if k != arg and k != "self" and (
        isinstance(v, (np.ndarray, ReconstructionStatistics)))]
    return tuple(names)


def _array_cases() -> list:
    cases: list[Case] = []
    for entry in ENTRIES.values():
        for arg, spec in entry.arrays.items():
            x = _example(entry, arg, spec)
            prefix = f"{entry.name}-{arg}"
            others = _other_array_args(entry, arg)
            has_self = "self" in entry.args("numpy", "float64")

            def add(label: str, value: Any, expect: Any, lib: str = "numpy",
                    arg: str = arg, prefix: str = prefix, entry: Entry = entry,
                    spec: Arr = spec) -> None:
                if label in spec.skip:
                    return
                cases.append(Case(f"{prefix}-{label}", entry.name, _set_value(arg, value),
                                  expect, lib=lib))

            name_it = ((arg,),)
            floating = spec.kind in ("matrix", "gram", "spd", "batch", "samples")
            two_d = spec.kind in ("matrix", "gram", "spd", "bool", "batch", "samples")
            if spec.required:
                add("None", None, Raises(_TE, name_it))
            add("list", x.tolist(), Raises(_TE, name_it))
            if two_d:
                add("np.matrix", _matrix(x), SameOrRaises(_TE, name_it, _set_value(arg, x)))
                add("scipy.csr_matrix", sparse.csr_matrix(x), Raises(_TE, name_it))
                add("scipy.csr_array", sparse.csr_array(x), Raises(_TE, name_it))
            add("masked_array", _one_masked(x), SameOrRaises(_TE, name_it, _set_value(arg, x)))
            # The other arguments in torch too, so that only the layout or device is wrong.
            add("torch.sparse", _torchify(x).to_sparse(), Raises(_EITHER, name_it), lib="torch")
            add("torch.meta", _torchify(x).to("meta"), Raises(_EITHER, name_it), lib="torch")
            if others or has_self:
                # A method's conflict is with its own object, which has no argument name.
                require = ((arg,), others) if others and not has_self else name_it
                add("torch-among-numpy", _torchify(x), Raises(_TE, require))
            if floating:
                wrong_dtypes = (("int64", np.round(10 * x).astype(np.int64)),
                                ("bool", x != 0), ("complex128", x.astype(np.complex128)),
                                ("object", x.astype(object)))
            elif spec.kind == "bool":
                wrong_dtypes = (("float64", x.astype(np.float64)), ("int64", x.astype(np.int64)),
                                ("complex128", x.astype(np.complex128)),
                                ("object", x.astype(object)))
            else:  # index
                wrong_dtypes = (("float64", x.astype(np.float64)), ("bool", x != 0),
                                ("complex128", x.astype(np.complex128)),
                                ("object", x.astype(object)))
            for label, bad in wrong_dtypes:
                add(f"dtype-{label}", bad, Raises(_TE, name_it))
            zero_d = np.asarray(x.flat[0])
            if spec.kind in ("matrix", "gram", "spd", "bool"):
                dims = (("0-d", zero_d), ("1-d", x.ravel()), ("3-d", x[None]),
                        ("empty", x[:0] if spec.kind not in ("gram", "spd") else x[:0, :0]))
            elif spec.kind == "index":
                dims = (("0-d", zero_d), ("2-d", x[None]))
                add("shape-empty", x[:0], Raises(_VE, ((arg,) + spec.partners,)))
            elif spec.kind == "samples":
                dims = (("0-d", zero_d), ("1-d", x[0]))
            else:  # batch: (..., d_in) inputs of a layer
                dims = (("0-d", zero_d), ("wrong-d_in", x[:, :-1]))
            for label, bad in dims:
                add(f"shape-{label}", bad, Raises(_VE, name_it))
            if floating:
                for label, value in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
                    bad = np.array(x, dtype=np.float64, copy=True)
                    bad.flat[bad.size // 2 + 1] = value
                    if spec.kind in ("gram", "spd"):   # keep it symmetric
                        i, j = divmod(bad.size // 2 + 1, bad.shape[1])
                        bad[j, i] = value
                    add(f"entry-{label}", bad, Raises(_VE, name_it))
            for label, shape in spec.wrong_shapes:
                if spec.kind in ("bool",):
                    bad = np.ones(shape, dtype=bool)
                elif spec.kind == "index":
                    bad = np.arange(shape[0], dtype=np.int64)
                elif all(n <= m for n, m in zip(shape, x.shape)):
                    bad = np.array(x[tuple(slice(0, n) for n in shape)], copy=True)
                else:
                    bad = np.resize(x, shape).astype(np.float64)
                add(f"shape-{label}", bad, Raises(_VE, ((arg,) + spec.partners,)))
            if spec.kind in ("gram", "spd"):
                add("non-square", x[:, :-1], Raises(_VE, name_it))
                add("non-symmetric", _nonsymmetric(x), Raises(_VE, name_it))
                add("negative-diagonal", _negative_diagonal(x), Raises(_VE, name_it))
            if spec.kind == "spd":
                add("indefinite", _indefinite(x), Raises(_VE, name_it))
    return [pytest.param(c, id=c.id) for c in cases]


@pytest.mark.parametrize("case", _array_cases())
def test_array_inputs(case: Case) -> None:
    """Bad arrays raise TypeError/ValueError naming the argument; np.matrix and masked arrays
    are rejected with a TypeError or treated exactly as ``np.asarray``."""
    run_case(case)


# --------------------------------------------------------------------------- dedicated cases


def _admm_state(Z: np.ndarray = W_HAT0, mask: np.ndarray = MASK0) -> AdmmState:
    return AdmmState(np.array(Z, copy=True), np.zeros_like(W0), np.array(mask, copy=True), 3)


def _nan_at(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float64, copy=True)
    x.flat[3] = np.nan
    return x


def _within_budget(result: Any, args: dict) -> str | None:
    W = np.asarray(result.Z if isinstance(result, AdmmState) else result)
    if not mask_satisfies(W != 0, 0.5, "unstructured", exact=False):
        return (f"the support exceeds nnz_budget: {int(np.count_nonzero(W))} nonzeros against "
                f"{nnz_budget(W.shape, 0.5, 'unstructured')}")
    return None


def _spl_check(result: Any, args: dict) -> str | None:
    if not isinstance(result, SparsePlusLowRank):
        return f"returned {type(result).__name__}"
    return _within_budget(result.S, args)


def _pruner_returning(value: Callable[[Any], Any]) -> Callable:
    def pruner(W, H, *, density=None, pattern="unstructured"):
        return value(W)
    return pruner


def _special_cases() -> list:
    C: list[Case] = []

    def add(id_: str, entry: str, modify: Callable | None, expect: Any, **kw: Any) -> None:
        C.append(Case(id_, entry, modify, expect, **kw))

    # ---- SparsityPattern: validated when constructed
    for label, kind, n, m, names in (
            ("bogus", "bogus", None, None, ("kind",)),
            ("n-above-m", "n:m", 3, 2, ("n", "m")),
            ("missing-n-m", "n:m", None, None, ("n", "m")),
            ("n-zero", "n:m", 0, 4, ("n",)),
            ("unstructured-with-n-m", "unstructured", 2, 4, ("n", "m", "kind")),
            ("per_output-with-m", "per_output", None, 4, ("m", "kind")),
            ("float-n", "n:m", 2.0, 4, ("n",)),
            ("bool-n", "n:m", True, 4, ("n",)),
            ("float-m", "n:m", 2, 4.0, ("m",)),
            ("missing-m", "n:m", 2, None, ("m",))):
        add(f"SparsityPattern-{label}", "SparsityPattern",
            _set(kind=kind, n=n, m=m), Raises(_EITHER, (names,)))
    add("SparsityPattern-unstructured-valid", "SparsityPattern",
        _set(kind="unstructured", n=None, m=None), Ok())
    add("SparsityPattern-np.int64-same-budget", "SparsityPattern",
        _set(n=np.int64(2), m=np.int64(4)),
        Ok(lambda r, a: None if r == nnz_budget((D_IN, D_OUT), None, "2:4") else f"budget {r}"),
        call=lambda a: nnz_budget((D_IN, D_OUT), None, SparsityPattern(a["kind"], a["n"], a["m"])))

    # ---- nnz_budget and friends: shapes and patterns that cannot apply
    add("nnz_budget-shape-negative-unstructured", "nnz_budget", _set(shape=(-16, 12)),
        Raises(_VE, (("shape",),)))
    add("nnz_budget-pattern-m-does-not-divide-d_in", "nnz_budget",
        _set(shape=(18, 12), density=None, pattern="2:4"), Raises(_VE, (("pattern",),)))
    add("nnz_budget-density-contradicts-n:m", "nnz_budget", _set(density=0.3, pattern="2:4"),
        Raises(_VE, (("density",),)))
    add("nnz_budget-density-None-unstructured", "nnz_budget", _set(density=None),
        Raises(_EITHER, (("density",),)))
    add("nnz_budget-n:m-density-np.float32", "nnz_budget",
        _set(density=np.float32(0.5), pattern="2:4"), Same(_set(density=None, pattern="2:4")))
    add("nnz_budget-n:m-density-Fraction", "nnz_budget",
        _set(density=Fraction(1, 2), pattern="2:4"), Same(_set(density=None, pattern="2:4")))
    add("dsf_budget_split-split-bogus", "dsf_budget_split", _set(split="bogus"),
        Raises(_VE, (("split",),)))
    add("dsf_budget_split-split-None", "dsf_budget_split", _set(split=None),
        Raises(_EITHER, (("split",),)))
    add("dsf_budget_split-split-auto", "dsf_budget_split", _set(split="auto"), Ok())
    add("dsf_budget_split-split-paper", "dsf_budget_split", _set(split="paper"), Ok())
    add("mask_satisfies-pattern-m-does-not-divide-d_in", "mask_satisfies",
        _set(density=None, pattern="3:5"), Raises(_VE, (("pattern",),)))
    add("mask_from_scores-density-keeps-nothing", "mask_from_scores", _set(density=1e-4),
        Raises(_VE, (("density",),)))
    add("magnitude_prune-density-keeps-nothing", "magnitude_prune", _set(density=1e-4),
        Raises(_VE, (("density",),)))
    add("magnitude_prune-H-None-valid", "magnitude_prune", _set(H=None), Ok())
    add("sparse_lowrank_rank-compression-too-high-for-pattern", "sparse_lowrank_rank",
        _set(pattern="2:4", density=None, compression=0.9), Raises(_VE, (("compression",
                                                                        "pattern"),)))

    # ---- result classes: validated when constructed
    def piv(**kw: Any) -> Callable[[dict], dict]:
        return _set(**{k: np.asarray(v, dtype=np.int64) if k.endswith("pivots") else v
                       for k, v in kw.items()})
    add("Pivoted-pivots-duplicate", "Pivoted",
        piv(pivots=[0, 0, 2], non_pivots=[3, 4, 5, 6, 7, 8, 9, 10, 11]),
        Raises(_VE, (("pivots", "non_pivots"),)))
    add("Pivoted-pivots-out-of-range", "Pivoted",
        piv(pivots=[0, 1, 20], non_pivots=[2, 3, 4, 5, 6, 7, 8, 9, 10]),
        Raises(_VE, (("pivots",),)))
    add("Pivoted-pivots-negative", "Pivoted",
        piv(pivots=[-1, 1, 2], non_pivots=[0, 3, 4, 5, 6, 7, 8, 9, 10]),
        Raises(_VE, (("pivots",),)))
    add("Pivoted-pivots-overlap-non_pivots", "Pivoted",
        piv(pivots=[0, 1, 2], non_pivots=[2, 3, 4, 5, 6, 7, 8, 9, 10]),
        Raises(_VE, (("pivots", "non_pivots"),)))
    add("Pivoted-not-a-partition", "Pivoted",
        piv(pivots=[0, 1, 2], non_pivots=[3, 4, 5, 6, 7, 8, 9, 10, 13]),
        Raises(_VE, (("pivots", "non_pivots"),)))
    add("Pivoted-pivots-float", "Pivoted", _set(pivots=PIVOTS0.astype(np.float64)),
        Raises(_TE, (("pivots",),)))
    add("Pivoted-W_p-and-C-two-libraries", "Pivoted",
        _set(W_p=lambda a: _torchify(a["W_p"])), Raises(_TE, (("W_p",), ("C", "pivots"))))
    add("LowRank-U-numpy-V-torch", "LowRank", _set(V=lambda a: _torchify(a["V"])),
        Raises(_TE, (("U",), ("V",))))
    add("LowRank-inner-dims", "LowRank", _set(V=np.ones((D_OUT, RANK + 1))),
        Raises(_VE, (("U", "V"),)))
    add("DoubleSparse-A-numpy-B-torch", "DoubleSparse", _set(B=lambda a: _torchify(a["B"])),
        Raises(_TE, (("A",), ("B",))))
    add("DoubleSparse-inner-dims", "DoubleSparse", _set(B=np.ones((K0 + 1, D_OUT))),
        Raises(_VE, (("A", "B"),)))
    add("SparsePlusLowRank-S-transposed", "SparsePlusLowRank", _set(S=W_HAT0.T.copy()),
        Raises(_VE, (("S", "U", "V"),)))
    add("SparsePlusLowRank-U-torch", "SparsePlusLowRank", _set(U=lambda a: _torchify(a["U"])),
        Raises(_TE, (("U",), ("S", "V"))))
    add("AdmmState-Z-U-two-libraries", "AdmmState", _set(U=lambda a: _torchify(a["U"])),
        Raises(_TE, (("U",), ("Z",))))
    add("SparseLowRankBudget-consistent", "sparse_lowrank_budget", None,
        Ok(lambda r, a: None if isinstance(r, SparseLowRankBudget)
           and nnz_budget(a["shape"], r.density, "unstructured") == r.nnz
           and isinstance(r.rank, int) and isinstance(r.nnz, int)
           else f"inconsistent budget {r!r}"))

    # ---- warm starts of ADMM
    add("admm_prune-warm_start-valid", "admm_prune",
        _set(warm_start=_admm_state()), Ok(_within_budget))
    add("admm_prune-warm_start-from-return_state", "admm_prune", None, Ok(_within_budget),
        call=lambda a: admm_prune(a["W"], a["H"], density=0.5, iters=2, gradual_iters=0,
                                  warm_start=admm_prune(a["W"], a["H"], density=0.5, iters=2,
                                                        gradual_iters=1, return_state=True)))
    for gradual in (0, 2):
        add(f"admm_prune-warm_start-Z-nan-gradual{gradual}", "admm_prune",
            _set(gradual_iters=gradual,
                 warm_start=lambda a: _with_fields(_admm_state(), Z=_nan_at(W_HAT0))),
            Raises(_VE, (("warm_start",),)))
        add(f"admm_prune-warm_start-U-nan-gradual{gradual}", "admm_prune",
            _set(gradual_iters=gradual,
                 warm_start=lambda a: _with_fields(_admm_state(), U=_nan_at(np.zeros_like(W0)))),
            Raises(_VE, (("warm_start",),)))
        add(f"admm_prune-warm_start-mask-wrong-shape-gradual{gradual}", "admm_prune",
            _set(gradual_iters=gradual,
                 warm_start=lambda a: _with_fields(_admm_state(),
                                                   mask=np.ones((D_IN, D_OUT - 1), bool))),
            Raises(_VE, (("warm_start", "mask"),)))
        add(f"admm_prune-warm_start-full-mask-gradual{gradual}", "admm_prune",
            _set(gradual_iters=gradual,
                 warm_start=lambda a: _admm_state(W0, np.ones_like(MASK0))),
            OkOrRaises(_VE, (("warm_start", "mask", "density"),), _within_budget))
    add("admm_prune-warm_start-mask-float", "admm_prune",
        _set(gradual_iters=0, warm_start=lambda a: _with_fields(_admm_state(),
                                                                mask=MASK0.astype(float))),
        Raises(_EITHER, (("warm_start", "mask"),)))
    add("admm_prune-warm_start-Z-wrong-shape", "admm_prune",
        _set(warm_start=lambda a: _with_fields(_admm_state(), Z=np.zeros((D_IN, D_OUT - 1)))),
        Raises(_VE, (("warm_start",),)))
    add("admm_prune-warm_start-not-a-state", "admm_prune",
        _set(warm_start=lambda a: LowRank(U0.copy(), V0.copy())),
        Raises(_TE, (("warm_start",),)))
    add("admm_prune-warm_start-dict", "admm_prune",
        _set(warm_start=lambda a: {"Z": W_HAT0, "U": np.zeros_like(W0), "mask": MASK0}),
        Raises(_TE, (("warm_start",),)))
    add("admm_prune-warm_start-torch", "admm_prune",
        _set(warm_start=lambda a: AdmmState(_torchify(W_HAT0), _torchify(np.zeros_like(W0)),
                                            _torchify(MASK0), 3)),
        Raises(_TE, (("warm_start",),)))
    add("admm_solve-warm_start-Z-nan", "admm_solve",
        _set(warm_start=lambda a: _with_fields(_admm_state(), Z=_nan_at(W_HAT0))),
        Raises(_VE, (("warm_start",),)))
    add("admm_solve-warm_start-U-nan", "admm_solve",
        _set(warm_start=lambda a: _with_fields(_admm_state(), U=_nan_at(np.zeros_like(W0)))),
        Raises(_VE, (("warm_start",),)))
    add("admm_solve-warm_start-mask-wrong-shape", "admm_solve",
        _set(warm_start=lambda a: _with_fields(_admm_state(),
                                               mask=np.ones((D_IN, D_OUT - 1), bool))),
        Raises(_VE, (("warm_start", "mask"),)))
    add("admm_solve-warm_start-torch", "admm_solve",
        _set(warm_start=lambda a: AdmmState(_torchify(W_HAT0), _torchify(np.zeros_like(W0)),
                                            _torchify(MASK0), 3)),
        Raises(_TE, (("warm_start",),)))
    add("admm_solve-warm_start-valid", "admm_solve", _set(warm_start=_admm_state()), Ok())
    add("admm_solve-mask-all-false", "admm_solve", _set(mask=np.zeros_like(MASK0)),
        OkOrRaises(_VE, (("mask",),)))
    add("ConvergenceWarning-admm_solve-max_iters-1", "admm_solve",
        _set(max_iters=1, tol=1e-14), Ok(),
        call=lambda a: _expect_warning(ConvergenceWarning, lambda: ENTRIES["admm_solve"].call(a)))

    # ---- warm starts of the low-rank and sparse-plus-low-rank solvers
    def lowrank(U: np.ndarray = U0, V: np.ndarray = V0) -> LowRank:
        return LowRank(np.array(U, copy=True), np.array(V, copy=True))
    add("lowrank_gd-init-LowRank-valid", "lowrank_gd", _set(init=lambda a: lowrank()), Ok())
    add("lowrank_gd-init-LowRank-nan", "lowrank_gd",
        _set(init=lambda a: _with_fields(lowrank(), U=_nan_at(U0))), Raises(_VE, (("init",),)))
    add("lowrank_gd-init-LowRank-wrong-rank", "lowrank_gd",
        _set(init=lambda a: lowrank(U0[:, :2], V0[:, :2])), Raises(_VE, (("init",),)))
    add("lowrank_gd-init-LowRank-wrong-shape", "lowrank_gd",
        _set(init=lambda a: lowrank(U0[:-1], V0)), Raises(_VE, (("init",),)))
    add("lowrank_gd-init-LowRank-torch", "lowrank_gd",
        _set(init=lambda a: LowRank(_torchify(U0), _torchify(V0))), Raises(_TE, (("init",),)))
    add("lowrank_gd-init-random-rng-np.int64", "lowrank_gd",
        _set(init="random", rng=np.int64(5)), Same(_set(init="random", rng=5)))
    add("lowrank_gd-init-random-rng-str", "lowrank_gd", _set(init="random", rng="seed"),
        Raises(_EITHER, (("rng",),)))
    add("lowrank_gd-iters-0", "lowrank_gd", _set(iters=0), Ok())
    spl = "sparse_plus_lowrank"
    def spl_lowrank() -> LowRank:
        return LowRank(U0[:, :2].copy(), V0[:, :2].copy())
    add(f"{spl}-init-LowRank-valid", spl, _set(init=lambda a: spl_lowrank()), Ok(_spl_check))
    add(f"{spl}-init-LowRank-nan", spl,
        _set(init=lambda a: _with_fields(spl_lowrank(), V=_nan_at(V0[:, :2]))),
        Raises(_VE, (("init",),)))
    add(f"{spl}-init-LowRank-wrong-rank", spl, _set(init=lambda a: lowrank()),
        Raises(_VE, (("init",),)))
    add(f"{spl}-init-LowRank-torch", spl,
        _set(init=lambda a: LowRank(_torchify(U0[:, :2]), _torchify(V0[:, :2]))),
        Raises(_TE, (("init",),)))
    add(f"{spl}-init-SparsePlusLowRank-S-nan", spl,
        _set(init=lambda a: _with_fields(SparsePlusLowRank(W_HAT0.copy(), U0[:, :2].copy(),
                                                           V0[:, :2].copy()),
                                         S=_nan_at(W_HAT0))),
        Raises(_VE, (("init",),)))
    add(f"{spl}-init-SparsePlusLowRank-S-wrong-shape", spl,
        _set(init=lambda a: _with_fields(SparsePlusLowRank(W_HAT0.copy(), U0[:, :2].copy(),
                                                           V0[:, :2].copy()),
                                         S=np.zeros((D_IN, D_OUT - 1)))),
        Raises(_VE, (("init",),)))
    add(f"{spl}-init-random-rng-str", spl, _set(init="random", rng="seed"),
        Raises(_EITHER, (("rng",),)))

    # ---- sparse_plus_lowrank options
    add(f"{spl}-H-None-full-hessian", spl, _set(H=None), Raises(_EITHER, (("H",),)))
    add(f"{spl}-H-None-identity", spl, _set(H=None, hessian="identity"), Ok(_spl_check))
    for hessian in ("diagonal", "identity"):
        add(f"{spl}-hessian-{hessian}", spl, _set(hessian=hessian), Ok(_spl_check))
    for pruner in ("magnitude", "wanda", "sparsegpt", "admm"):
        add(f"{spl}-pruner-{pruner}", spl, _set(pruner=pruner), Ok(_spl_check))
    add(f"{spl}-lowrank-exact", spl, _set(lowrank="exact"), Ok(_spl_check))
    add(f"{spl}-pattern-2:4", spl, _set(pattern="2:4", density=None), Ok())
    add(f"{spl}-density-contradicts-2:4", spl, _set(pattern="2:4", density=0.3),
        Raises(_VE, (("density",),)))
    add(f"{spl}-pruner_options-unknown-key", spl, _set(pruner_options={"bogus": 1}),
        Raises(_EITHER, (("bogus",),)))
    add(f"{spl}-pruner_options-key-of-another-pruner", spl,
        _set(pruner="magnitude", pruner_options={"damping": 0.1}),
        Raises(_EITHER, (("damping",),)))
    add(f"{spl}-pruner_options-not-a-dict", spl, _set(pruner_options="damping"),
        Raises(_TE, (("pruner_options",),)))
    add(f"{spl}-pruner_options-damping-negative", spl, _set(pruner_options={"damping": -1.0}),
        Raises(_VE, (("damping",),)))
    add(f"{spl}-pruner_options-damping-nan", spl, _set(pruner_options={"damping": math.nan}),
        Raises(_VE, (("damping",),)))
    add(f"{spl}-pruner_options-damping-np.float32", spl,
        _set(pruner_options={"damping": np.float32(0.01)}),
        Same(_set(pruner_options={"damping": float(np.float32(0.01))})))
    add(f"{spl}-pruner_options-damping-Fraction", spl,
        _set(pruner_options={"damping": Fraction(1, 100)}),
        Same(_set(pruner_options={"damping": 0.01})))
    add(f"{spl}-pruner_options-block_size-float", spl, _set(pruner_options={"block_size": 4.0}),
        Raises(_EITHER, (("block_size",),)))
    add(f"{spl}-pruner_options-block_size-np.int64", spl,
        _set(pruner_options={"block_size": np.int64(4)}), Same(_set(pruner_options={
            "block_size": 4})))
    add(f"{spl}-admm-options-iters-bool", spl,
        _set(pruner="admm", pruner_options={"iters": True}), Raises(_EITHER, (("iters",),)))
    add(f"{spl}-admm-options-rho-np.float32", spl,
        _set(pruner="admm", pruner_options={"rho": np.float32(0.5)}),
        Same(_set(pruner="admm", pruner_options={"rho": 0.5})))
    # Pruner: any callable with the shared signature; its result is checked.
    add(f"{spl}-Pruner-callable-magnitude", spl, _set(pruner=magnitude_prune), Ok(_spl_check))
    add(f"{spl}-Pruner-returns-nan", spl,
        _set(pruner=_pruner_returning(lambda W: np.full(np.shape(W), np.nan))),
        Raises(_VE, (("pruner",),)))
    add(f"{spl}-Pruner-returns-wrong-shape", spl,
        _set(pruner=_pruner_returning(lambda W: np.zeros((D_IN, D_OUT - 1)))),
        Raises(_VE, (("pruner",),)))
    add(f"{spl}-Pruner-returns-list", spl,
        _set(pruner=_pruner_returning(lambda W: np.zeros((D_IN, D_OUT)).tolist())),
        Raises(_TE, (("pruner",),)))
    add(f"{spl}-Pruner-returns-dense", spl,
        _set(pruner=_pruner_returning(lambda W: np.array(W, copy=True))),
        Raises(_VE, (("pruner",),)))
    add(f"{spl}-Pruner-returns-None", spl, _set(pruner=_pruner_returning(lambda W: None)),
        Raises(_TE, (("pruner",),)))

    # ---- double_sparse
    ds = "double_sparse"
    add(f"{ds}-projection-H-None", ds, _set(H=None), Ok())
    add(f"{ds}-projection-np.matrix-W", ds,
        _set(H=None, W=lambda a: _matrix(a["W"])), SameOrRaises(_TE, (("W",),), _set(H=None)))
    add(f"{ds}-np.matrix-W-and-H", ds,
        _set(W=lambda a: _matrix(a["W"]), H=lambda a: _matrix(a["H"])),
        SameOrRaises(_TE, (("W", "H"),)))
    add(f"{ds}-square_mask-valid", ds, _set(square_mask=SQUARE_MASK0.copy()), Ok())
    add(f"{ds}-square_mask-all-false", ds, _set(square_mask=np.zeros_like(SQUARE_MASK0)),
        Raises(_VE, (("square_mask",),)))
    add(f"{ds}-split-bogus", ds, _set(split="bogus"), Raises(_VE, (("split",),)))
    add(f"{ds}-split-None", ds, _set(split=None), Raises(_EITHER, (("split",),)))
    add(f"{ds}-split-auto", ds, _set(split="auto"), Ok())
    add(f"{ds}-density-keeps-nothing", ds, _set(density=1e-4), Raises(_VE, (("density",),)))
    add(f"{ds}-mask_iters-above-inner_iters", ds, _set(mask_iters=3, inner_iters=2),
        Raises(_VE, (("mask_iters",),)))

    # ---- Sylvester
    add("SylvesterSolver-M-indefinite", "SylvesterSolver", _set(M=_indefinite(H0)),
        Raises(_VE, (("M",),)))
    add("SylvesterSolver-N-indefinite", "SylvesterSolver", _set(N=_indefinite(N0)),
        Raises(_VE, (("N",),)))
    add("SylvesterSolver-M-numpy-N-torch", "SylvesterSolver",
        _set(N=lambda a: _torchify(a["N"])), Raises(_TE, (("M",), ("N",))))
    add("SylvesterSolver.solve-rho-zero-singular-M", "SylvesterSolver.solve", _set(rho=0.0),
        Raises(_VE, (("rho",),)))
    add("SylvesterSolver.solve-C-complex", "SylvesterSolver.solve",
        _set(C=RHS0.astype(np.complex128)), Raises(_TE, (("C",),)))

    # ---- MPIFA statistics
    for fn in ("mpifa", "mpifa_lowrank"):
        add(f"{fn}-statistics-None", fn, _set(statistics=None), Raises(_TE, (("statistics",),)))
        add(f"{fn}-statistics-array", fn, _set(statistics=H0.copy()),
            Raises(_TE, (("statistics",),)))
        add(f"{fn}-statistics-empty", fn, _set(statistics=lambda a: ReconstructionStatistics()),
            Raises(_VE, (("statistics",),)))
        add(f"{fn}-statistics-other-d_in", fn,
            _set(statistics=lambda a: ReconstructionStatistics().update(X0[:, :8].copy())),
            Raises(_VE, (("statistics", "W"),)))
        add(f"{fn}-statistics-torch-W-numpy", fn,
            _set(statistics=lambda a: _statistics("torch", "float64")),
            Raises(_TE, (("statistics",), ("W",))))
        add(f"{fn}-init-target", fn, _set(init="target", iters=0), Ok())
    st = "ReconstructionStatistics"
    add(f"{st}.update-X_compressed-None", f"{st}.update", _set(X_compressed=None), Ok())
    add(f"{st}.update-3-d-batch", f"{st}.update",
        _set(X_dense=X0.reshape(4, -1, D_IN).copy(), X_compressed=X_COMP0.reshape(4, -1, D_IN).copy()),
        Ok())
    add(f"{st}.update-X_dense-changes-d_in", f"{st}.update",
        _set(self=lambda a: ReconstructionStatistics().update(X0[:, :8].copy())),
        Raises(_VE, (("X_dense", "d_in"),)))
    add(f"{st}.update-mixed-dtypes-batches", f"{st}.update",
        _set(self=lambda a: ReconstructionStatistics().update(X0.astype(np.float32))), Ok())
    add(f"{st}.update-torch-after-numpy", f"{st}.update",
        _set(self=lambda a: ReconstructionStatistics().update(X0.copy()),
             X_dense=lambda a: _torchify(X0), X_compressed=None),
        Raises(_TE, (("X_dense",),)))
    add(f"{st}.target-before-update", f"{st}.target",
        _set(self=lambda a: ReconstructionStatistics()), Raises(_VE, (("statistics", "update"),)))
    add(f"{st}.objective-streams-differ-untracked", f"{st}.objective",
        _set(self=lambda a: ReconstructionStatistics().update(X0.copy(), X_COMP0.copy())),
        Raises(_VE, (("track_error_gram", "error_gram"),)))

    # ---- layer_error and the result-class methods
    add("layer_error-W-zero", "layer_error", _set(W=np.zeros_like(W0)), Raises(_VE, (("W",),)))
    add("layer_error-H-None", "layer_error", _set(H=None), Ok())
    add("LowRank.matmul-1-d-X", "LowRank.matmul", _set(X=XB0[0].copy()), Ok())
    add("LowRank.matmul-3-d-X", "LowRank.matmul", _set(X=XB0[None].copy()), Ok())
    add("Pivoted.matmul-3-d-X", "Pivoted.matmul", _set(X=XB0[None].copy()), Ok())
    return [pytest.param(c, id=c.id) for c in C]


def _expect_warning(category: type, fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", category)
        result = fn()
    if not any(issubclass(w.category, category) for w in caught):
        raise AssertionError(f"no {category.__name__} was issued")
    return result


@pytest.mark.parametrize("case", _special_cases())
def test_specific_inputs(case: Case) -> None:
    """Constructors, patterns, shapes, warm starts, options dicts, pruners and Sylvester."""
    run_case(case)
