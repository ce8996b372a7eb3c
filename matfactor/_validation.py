"""The front door: the one place where arguments of the public API are checked.

Every public function and result class of matfactor validates its arguments through this
module, and only through it, so that an argument accepts the same values everywhere and a bad
one gets the same clear error everywhere (the convention of ``DESIGN.md``). Past this point,
private engines take arguments that are already validated and never check them again. The
scalar checks below are applied from each function's declared parameters
(:mod:`matfactor._contract`); the array checks are called by the functions directly.

The rules, in short:

Arrays
    An array of NumPy, CuPy, PyTorch or another array-API library, real floating point
    (float16, bfloat16, float32, float64; computed in float32 or wider), finite, of the
    expected rank and shape, all inputs from one library and on one device. ``np.matrix`` is
    converted to its ``ndarray`` (the same numbers; matrix semantics would change ``*``).
    Sparse matrices and tensors (SciPy, PyTorch), NumPy masked arrays and PyTorch tensors
    on the ``meta`` device are refused: densify, fill or materialise them explicitly. A
    PyTorch tensor that requires grad is read through ``detach()``: solvers record no
    autograd graph, and their results never require grad.
Scalars
    A real argument accepts ``int``, ``float``, NumPy integer and floating scalars and any
    other :class:`numbers.Real` (``fractions.Fraction``), and returns a Python ``float``; an
    integer argument accepts ``int`` and NumPy integers (not ``3.0``); a flag accepts only
    ``bool`` and ``numpy.bool_``. ``bool`` is never a number, a string never a flag.
Errors
    ``TypeError`` for a value of the wrong kind, ``ValueError`` for a value out of range; the
    message names the argument, what was given and what is expected. A scalar of the wrong
    kind raises :class:`ArgumentTypeError`, which is both (scikit-learn's
    ``InvalidParameterError`` does the same): code written when these were all
    ``ValueError`` still catches them.

Scale
    :func:`binary_exponent` and :func:`times_power_of_two` are the front door's normalisation:
    solvers divide ``W`` and ``H`` by powers of two near their magnitudes before computing and
    multiply the result back, so that any finite input of the dtype works (no overflow in
    ``W²``, no underflow in ``H``). Scaling by a power of two is exact in binary floating
    point, and every solver is exactly homogeneous under it (``H`` by even powers: its square
    root is taken), so the numbers are the same as without normalisation wherever that did not
    overflow.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Collection
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "ArgumentTypeError",
    "type_name",
    "namespace",
    "compute_dtype",
    "common_dtype",
    "matrix",
    "vector",
    "boolean_mask",
    "samples",
    "layer_input",
    "finite_max",
    "gram",
    "symmetric",
    "real",
    "integer",
    "flag",
    "choice",
    "accumulation_dtype",
    "density",
    "damping",
    "rank",
    "shape",
    "rng",
    "binary_exponent",
    "times_power_of_two",
    "normalised",
    "layer_problem",
    "finite_result",
]


class ArgumentTypeError(TypeError, ValueError):
    """A scalar argument of the wrong kind (a string for a number, a float for a count, ...)."""


def type_name(x: Any) -> str:
    """The name of ``x``'s type for messages: ``float``, ``numpy.float32``, ``torch.Tensor``."""
    kind = type(x)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# --------------------------------------------------------------------------- arrays


def _refuse_container(name: str, x: Any) -> None:
    """Refuse the array-like containers that would be silently misread as dense arrays."""
    module = type(x).__module__
    if module.startswith("scipy.sparse") or module.startswith("cupyx.scipy.sparse"):
        raise TypeError(f"{name} is a sparse matrix ({type_name(x)}); pass a dense array "
                        f"({name}.toarray())")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a NumPy masked array; pass a plain array ({name}.filled(0) "
                        "or np.asarray)")
    layout = getattr(x, "layout", None)
    if layout is not None and module.startswith("torch"):
        import torch

        if layout != torch.strided:
            raise TypeError(f"{name} is a {layout} torch tensor; pass a dense tensor "
                            f"({name}.to_dense())")
        if x.device.type == "meta":
            raise ValueError(f"{name} is on torch's 'meta' device and has no values; pass a "
                             "materialised tensor")


def namespace(*, optional: Collection[str] = (), **arrays: Any) -> tuple[Any, Any]:
    """The common ``(namespace, device)`` of the named arrays.

    Parameters
    ----------
    optional
        Names whose value may be ``None`` (skipped); any other ``None`` is an error.
    **arrays
        The arrays, by the name of their argument.

    Raises
    ------
    TypeError
        An argument is missing (``None``), not an array, a container that must be converted
        explicitly (sparse, masked), or two arguments come from different array libraries.
    ValueError
        Two arguments live on different devices, or one has no values (torch's meta device).
    """
    first_name, first_xp, first_device = None, None, None
    for name, x in arrays.items():
        if x is None:
            if name in optional:
                continue
            raise ArgumentTypeError(f"{name} is required: pass an array (NumPy, CuPy, PyTorch or another "
                            "array-API library), got None")
        _refuse_container(name, x)
        try:
            xp = array_api_compat.array_namespace(x)
        except TypeError as exc:
            raise TypeError(f"{name} must be an array (NumPy, CuPy, PyTorch or another array-API "
                            f"library), got {type_name(x)}") from exc
        device = array_api_compat.device(x)
        if first_xp is None:
            first_name, first_xp, first_device = name, xp, device
            continue
        if xp is not first_xp:
            raise TypeError(f"{first_name} and {name} come from different array libraries "
                            f"({first_xp.__name__} and {xp.__name__}); pass both from one library")
        if device != first_device:
            raise ValueError(f"{first_name} is on device {first_device} but {name} is on device "
                             f"{device}; move both to one device")
    if first_xp is None:
        raise TypeError("no array was given")
    return first_xp, first_device


def _plain(x: Any, *, detach: bool = True) -> Any:
    """``x`` as a plain array of its library: ``np.matrix`` as ``ndarray``, torch detached
    (unless ``detach=False``: the forward pass of a compressed layer, which autograd may
    differentiate with respect to its inputs)."""
    if isinstance(x, np.matrix):
        return np.asarray(x)
    if detach and getattr(x, "requires_grad", False):
        return x.detach()
    return x


def compute_dtype(xp: Any, x: Any, name: str) -> Any:
    """The dtype a solver computes in for input ``x``: float32 for half precision, else its own.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point array (integer, boolean, complex, object).
    """
    dtype = x.dtype
    if dtype == xp.float64:
        return xp.float64
    if dtype == xp.float32:
        return xp.float32
    if dtype == getattr(xp, "float16", None) or dtype == getattr(xp, "bfloat16", None):
        return xp.float32
    raise TypeError(f"{name} must be a real floating-point array (float16, bfloat16, float32 or "
                    f"float64), got dtype {dtype}")


def common_dtype(xp: Any, **arrays: Any) -> Any:
    """The widest compute dtype among the named arrays (``None`` values skipped)."""
    dtypes = [compute_dtype(xp, x, name) for name, x in arrays.items() if x is not None]
    return xp.float64 if any(d == xp.float64 for d in dtypes) else xp.float32


def finite_max(xp: Any, x: Any, name: str) -> float:
    """``max |x|`` as a float (0 for an empty array), else a ``ValueError`` for NaN or Inf.

    The magnitude that the normalisation needs and the finiteness check at once (the maximum
    of a NaN or an Inf is not finite), from the maximum and the minimum: two reductions that
    allocate nothing (``abs`` would copy ``x``), and one host read.
    """
    if math.prod(x.shape) == 0:
        return 0.0
    magnitude = float(xp.max(xp.stack([xp.max(x), -xp.min(x)])))
    if not math.isfinite(magnitude):
        raise ValueError(f"{name} contains NaN or Inf")
    return magnitude


def matrix(xp: Any, x: Any, name: str, dtype: Any, *, shape: tuple[int | None, int | None]
           = (None, None)) -> Any:
    """``x`` validated as a finite, non-empty 2-D floating matrix, returned in ``dtype``.

    ``shape`` fixes either dimension (``None``: any). The result is a plain array (see the
    module docstring) that may share memory with ``x``: callers never write into it.
    """
    x = _plain(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    for axis, expected in enumerate(shape):
        if expected is not None and x.shape[axis] != expected:
            wanted = tuple("·" if e is None else e for e in shape)
            raise ValueError(f"{name} must have shape {wanted}, got {tuple(x.shape)}".replace("'·'", "·"))
    compute_dtype(xp, x, name)
    x = xp.astype(x, dtype, copy=False) if x.dtype != dtype else x
    finite_max(xp, x, name)
    return x


def vector(xp: Any, x: Any, name: str, dtype: Any, size: int) -> Any:
    """``x`` validated as a finite floating vector of ``size`` entries, returned in ``dtype``."""
    x = _plain(x)
    if x.ndim != 1 or x.shape[0] != size:
        raise ValueError(f"{name} must be a vector of {size} entries, got shape {tuple(x.shape)}")
    compute_dtype(xp, x, name)
    x = xp.astype(x, dtype, copy=False) if x.dtype != dtype else x
    finite_max(xp, x, name)
    return x


def boolean_mask(xp: Any, mask: Any, name: str, shape: tuple[int, ...] | None = None) -> Any:
    """``mask`` validated as a boolean array (of ``shape`` if given)."""
    mask = _plain(mask)
    if mask.dtype != xp.bool:
        raise TypeError(f"{name} must be a boolean array, got dtype {mask.dtype} (for the support "
                        f"of a weight, pass W != 0)")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(mask.shape)}")
    if mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(mask.shape)}")
    return mask


def samples(xp: Any, X: Any, name: str, dtype: Any, d_in: int | None) -> Any:
    """Layer inputs ``X`` of shape ``(..., d_in)`` as an ``(n_samples, d_in)`` matrix in ``dtype``.

    Values are not checked here: a streaming accumulator reads each batch's magnitude anyway
    (:func:`finite_max`), which finds NaN and Inf in the same pass.
    """
    X = _plain(X)
    if X.ndim < 2:
        raise ValueError(f"{name} must have shape (n_samples, d_in) or (..., d_in), got "
                         f"{tuple(X.shape)}")
    if d_in is not None and X.shape[-1] != d_in:
        raise ValueError(f"{name} has d_in = {X.shape[-1]} (shape {tuple(X.shape)}) but "
                         f"d_in = {d_in} is expected")
    if X.shape[-1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(X.shape)}")
    compute_dtype(xp, X, name)
    X = xp.reshape(X, (-1, X.shape[-1])) if X.ndim != 2 else X
    return xp.astype(X, dtype) if X.dtype != dtype else X


def layer_input(X: Any, weight: Any, d_in: int) -> tuple[Any, Any]:
    """The inputs ``X`` ``(..., d_in)`` of a compressed layer, whose stored ``weight`` part sets
    the namespace, device and dtype; return ``(xp, X)`` with ``X`` cast to it. NaN or Inf in
    ``X`` is an error, as for every input (one reduction and one host read per call).

    Unlike the solvers' inputs, ``X`` keeps its autograd graph: a layer's forward pass is
    differentiable (fine-tuning through a compressed layer)."""
    xp, _ = namespace(X=X, weight=weight)
    X = _plain(X, detach=False)
    if X.ndim < 1 or X.shape[-1] != d_in:
        raise ValueError(f"X must have shape (..., d_in) with d_in = {d_in}, got {tuple(X.shape)}")
    compute_dtype(xp, X, "X")
    if X.dtype != weight.dtype:
        X = xp.astype(X, weight.dtype)
    finite_max(xp, X, "X")
    return xp, X


def symmetric(xp: Any, A: Any, name: str, what: str = "symmetric") -> None:
    """Raise ``ValueError`` naming ``name`` unless the square ``A`` is symmetric to rounding.

    The tolerance is relative to the largest entry, the dtype and the size (a Gram matrix
    accumulated in floating point is symmetric only to rounding). The comparison runs on
    ``A`` scaled to a unit maximum, so that it cannot overflow.
    """
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(A.shape)}")
    largest = finite_max(xp, A, name)
    if largest == 0.0:
        return
    A_unit = times_power_of_two(xp, A, -binary_exponent(largest))
    asymmetry = float(xp.max(xp.abs(A_unit - A_unit.T)))
    eps = float(xp.finfo(A.dtype).eps)
    if asymmetry > 100 * eps * math.sqrt(A.shape[0]):
        raise ValueError(f"{name} must be symmetric ({what}); max |{name} - {name}ᵀ| / max |{name}| "
                         f"= {asymmetry / 2:.3g}")


def gram(xp: Any, H: Any, d_in: int, name: str = "H", *, require_live: bool = False,
         rows_of: str = "W") -> None:
    """Validate a Gram matrix ``H = XᵀX`` of shape ``(d_in, d_in)``.

    Checks shape, symmetry (to a tolerance relative to the largest entry and the dtype) and a
    non-negative diagonal. A singular ``H`` (dead inputs, fewer samples than inputs) is valid;
    with ``require_live``, an all-zero diagonal (every input dead: nothing to reconstruct) is
    not. ``rows_of`` names the argument whose rows fix ``d_in``, for the message.
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{name} must be a square (d_in, d_in) matrix, got shape {tuple(H.shape)}")
    if H.shape[0] != d_in:
        raise ValueError(f"{name} has shape {tuple(H.shape)} but {rows_of} has d_in = {d_in} rows; "
                         f"{name} must be ({d_in}, {d_in})")
    symmetric(xp, H, name, "a Gram matrix XᵀX")
    if float(xp.min(xp.linalg.diagonal(H))) < 0:
        raise ValueError(f"{name} must be positive semi-definite (a Gram matrix XᵀX), but its "
                         f"diagonal has negative entries")
    if require_live and not bool(xp.any(xp.linalg.diagonal(H) > 0)):
        raise ValueError(f"{name} has an all-zero diagonal: every input is dead, there is nothing "
                         "to reconstruct")


# --------------------------------------------------------------------------- scalars


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _interval(minimum: float | None, maximum: float | None, low_open: bool, high_open: bool) -> str:
    if minimum is None and maximum is None:
        return "a finite real number"
    if maximum is None:
        return f"a real number {'>' if low_open else '>='} {minimum:g}"
    if minimum is None:
        return f"a real number {'<' if high_open else '<='} {maximum:g}"
    return (f"a real number in {'(' if low_open else '['}{minimum:g}, {maximum:g}"
            f"{')' if high_open else ']'}")


def real(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
         low_open: bool = False, high_open: bool = False) -> float:
    """A finite real ``value`` within the given bounds, as a Python float.

    Raises
    ------
    ArgumentTypeError
        If ``value`` is not a real number (``bool``, strings, complex, ``None``, arrays).
    ValueError
        If it is NaN, infinite or out of bounds.
    """
    expected = _interval(minimum, maximum, low_open, high_open)
    if not _is_real(value):
        raise ArgumentTypeError(f"{name} must be {expected}, got {value!r} ({type_name(value)})")
    number = float(value)
    if not math.isfinite(number) \
            or (minimum is not None and (number < minimum or (low_open and number == minimum))) \
            or (maximum is not None and (number > maximum or (high_open and number == maximum))):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
            what: str = "") -> int:
    """An integer ``value`` (``int`` or a NumPy integer, not ``bool``, not ``3.0``) within bounds.

    ``what`` adds why the bounds are what they are to the message.
    """
    if minimum is not None and maximum is not None:
        expected = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        expected = f"an integer >= {minimum}"
    else:
        expected = "an integer"
    expected += f" {what}" if what else ""
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be {expected}, got {value!r} (bool)")
    try:
        number = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"{name} must be {expected}, got {value!r} ({type_name(value)})") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {expected}, got {number}")
    return int(number)


def flag(name: str, value: Any) -> bool:
    """``True`` or ``False`` (``numpy.bool_`` included); anything else is a ``TypeError``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ArgumentTypeError(f"{name} must be True or False, got {value!r} ({type_name(value)})")


def choice(name: str, value: Any, choices: Collection[str]) -> str:
    """One of the strings ``choices``."""
    listed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be one of {listed}, got {value!r} ({type_name(value)})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def accumulation_dtype(name: str, value: Any) -> str | None:
    """``None``, ``"float32"`` or ``"float64"``: the dtype statistics are accumulated in."""
    if value is not None and (not isinstance(value, str) or value not in ("float32", "float64")):
        error = ValueError if isinstance(value, str) else ArgumentTypeError
        raise error(f"{name} must be None, 'float32' or 'float64', got {value!r}")
    return value


def damping(value: Any, *, name: str = "damping", positive: bool = False) -> float:
    """A relative damping: finite and ``>= 0`` (``> 0`` with ``positive``)."""
    return real(name, value, minimum=0.0, low_open=positive)


def rank(value: Any, shape: tuple[int, int], *, what: str = "") -> int:
    """A rank in ``[1, min(d_in, d_out)]`` for a ``(d_in, d_out)`` weight."""
    limit = min(shape)
    return integer("rank", value, minimum=1, maximum=limit,
                   what=what or f"(at most min(d_in, d_out) for a {tuple(shape)} weight)")


def shape(value: Any, name: str = "shape") -> tuple[int, int]:
    """``value`` as a pair of positive integers ``(d_in, d_out)``."""
    expected = f"{name} must be a pair of positive integers (d_in, d_out)"
    try:
        pair = None if isinstance(value, (str, bytes)) else tuple(value)
    except TypeError:  # not iterable (a number, a 0-d array)
        pair = None
    if pair is None or len(pair) != 2:
        raise ValueError(f"{expected}, got {value!r}")
    dims = []
    for d in pair:
        if isinstance(d, (bool, np.bool_)):
            raise ValueError(f"{expected}, got {value!r}")
        try:
            dims.append(operator.index(d))
        except TypeError:
            raise ValueError(f"{expected}, got {value!r}") from None
    if dims[0] < 1 or dims[1] < 1:
        raise ValueError(f"{expected}, got {value!r}")
    return dims[0], dims[1]



def rng(value: Any) -> Any:
    """``None``, a non-negative int seed or a random generator (NumPy's, PyTorch's, CuPy's).

    Whether a generator suits the arrays' library and device is checked where numbers are
    drawn (:func:`matfactor._array.random_normal`).
    """
    if value is None or isinstance(value, np.random.Generator) \
            or type(value).__name__ == "Generator":
        return value
    expected = "None, an int seed >= 0 or the arrays' library's random generator"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"rng must be {expected}, got {value!r} ({type_name(value)})")
    if value < 0:
        raise ValueError(f"rng must be {expected}, got {value!r}")
    return value


def density(value: Any, parsed_pattern: Any) -> float:
    """``density`` checked against a parsed pattern, as a float.

    For ``"n:m"`` the density is implied: ``None`` or ``n/m`` are accepted, anything else is an
    error. For the other patterns it must be a real number in (0, 1].
    """
    if parsed_pattern.kind == "n:m":
        implied = parsed_pattern.n / parsed_pattern.m
        if value is None:
            return implied
        if _is_real(value) and math.isclose(float(value), implied, rel_tol=1e-9):
            return implied
        if not _is_real(value):
            raise ArgumentTypeError(f"density must be None or {implied:g} for pattern '{parsed_pattern}', "
                            f"got {value!r} ({type_name(value)})")
        raise ValueError(f"density={value!r} contradicts pattern '{parsed_pattern}', which keeps "
                         f"{parsed_pattern.n}/{parsed_pattern.m} = {implied:g}; leave density as None")
    if value is None:
        raise ArgumentTypeError(f"density is required for pattern '{parsed_pattern}': a real number "
                                "in (0, 1]")
    return real("density", value, minimum=0.0, maximum=1.0, low_open=True)


# --------------------------------------------------------------------------- scale


def binary_exponent(magnitude: float) -> int:
    """The exponent ``e`` with ``magnitude = m · 2**e``, ``m`` in ``[0.5, 1)``; 0 for zero."""
    if magnitude == 0.0:
        return 0
    return math.frexp(magnitude)[1]


def times_power_of_two(xp: Any, x: Any, exponent: int) -> Any:
    """``x · 2**exponent``, exact (a new array; ``x`` itself for ``exponent = 0``).

    The factor is applied in steps that its dtype can represent, so that a subnormal input can
    be scaled up and a huge one down.
    """
    if exponent == 0:
        return x
    step = 100  # 2**±100 is a normal float32 number
    while exponent != 0:
        part = max(-step, min(step, exponent))
        x = x * (2.0 ** part)
        exponent -= part
    return x


def normalised(xp: Any, x: Any, name: str, *, even: bool = False) -> tuple[Any, int]:
    """``(x · 2**-e, e)`` with ``2**e`` near ``max |x|``: ``x`` scaled to unit magnitude, exactly.

    ``even`` picks an even ``e`` (the largest even one at or below the magnitude's exponent),
    for Gram matrices, whose square roots the solvers take: ``√(2**e)`` is then exact too.
    The maximum of the result is in ``[0.5, 1)``, or ``[0.5, 2)`` with ``even``.
    """
    exponent = binary_exponent(finite_max(xp, x, name))
    if even:
        exponent -= exponent % 2
    return times_power_of_two(xp, x, -exponent), exponent


def layer_problem(W: Any, H: Any | None, *, needs_H: bool, require_live: bool,
                  scale: bool = True) -> tuple[Any, Any, Any, Any | None, int]:
    """The front door of a layer solver: ``W`` and the Gram matrix ``H`` validated and scaled.

    Returns ``(xp, device, W, H, w_exponent)``: ``W`` and ``H`` in their common compute dtype,
    divided by powers of two near their magnitudes (``H`` by an even one). The solvers are
    exactly homogeneous under that scaling, so a result multiplied back by ``2**w_exponent``
    (where it scales with ``W``) has the numbers an unscaled computation would give, and no
    intermediate overflows or underflows for any finite input. ``H`` may be ``None`` unless
    ``needs_H``; ``require_live`` refuses an ``H`` whose inputs are all dead. With
    ``scale=False`` both are returned unscaled (``w_exponent = 0``), for a caller that scales
    only what it computes with (the pruners: see ``matfactor.pruning``).
    """
    xp, device = namespace(W=W, H=H, optional=() if needs_H else ("H",))
    dtype = common_dtype(xp, W=W, H=H)
    W = matrix(xp, W, "W", dtype)
    if H is not None:
        H = matrix(xp, H, "H", dtype)
        gram(xp, H, W.shape[0], require_live=require_live)
    if not scale:
        return xp, device, W, H, 0
    if H is not None:
        H, _ = normalised(xp, H, "H", even=True)
    W, w_exponent = normalised(xp, W, "W")
    return xp, device, W, H, w_exponent


def finite_result(xp: Any, x: Any, advice: str) -> Any:
    """``x`` if it is finite, else a ``ValueError`` with ``advice``: a last guard for iterative
    solvers whose parameters can make a valid problem numerically singular (a tiny ``rho`` on
    a singular ``H``), so that no NaN is ever returned silently."""
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"the iteration diverged to NaN or Inf: {advice}")
    return x
