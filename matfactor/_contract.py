"""Parameter contracts: each public function declares its parameters once, as data.

A :class:`Contract` is the ordered list of a function's :class:`Parameter` declarations (name,
kind, bounds or choices, whether ``None`` is accepted, default, meaning), attached to the
function by :func:`declare` next to its definition (scikit-learn's ``_parameter_constraints``
and ``validate_params`` play the same part). The function's scalar arguments are validated
from it, through the front door's checks (:mod:`matfactor._validation`), so that the messages
and exception types are those of the front door; everything else that needs to know a
function's parameters (the model side's recipes and command, the pruner options of
:func:`~matfactor.sparse_plus_lowrank`, the bad-input test corpus) reads the same declaration
through :func:`contract`.

Defaults and meanings are not written twice: :func:`declare` takes each default from the
function's signature and each meaning from the ``Parameters`` (or, for a class,
``Attributes``) section of its numpydoc docstring, and refuses a declaration whose names are
not exactly the signature's.

Arrays are declared too (kind ``"array"``), so that a contract names every parameter, but
they are checked by the front door's array checks in the function's body, where their
namespace, dtype and shapes are known; so are the arguments of kind ``"object"`` (warm
starts, statistics, option dictionaries), which the function checks itself.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, TypeVar

from . import _validation as check

__all__ = ["REQUIRED", "KINDS", "Parameter", "Contract", "declare", "contract"]


class _Required:
    """The default of a parameter that has none (a required argument)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# What each kind accepts, for the documentation of the declarations (and the test corpus).
KINDS = {
    "real": "a finite real number within the declared bounds",
    "integer": "an integer within the declared bounds",
    "flag": "True or False",
    "choice": "one of the declared strings",
    "density": "a kept fraction in (0, 1], implied (None or n/m) by an 'n:m' pattern",
    "damping": "a relative damping >= 0 (> 0 with low_open)",
    "rank": "a rank in [1, min(d_in, d_out)] of the weight",
    "shape": "a pair of positive integers (d_in, d_out)",
    "pattern": "a sparsity pattern: 'unstructured', 'per_output', 'n:m' or a SparsityPattern",
    "rng": "None, an int seed >= 0 or a random generator",
    "dtype": "None, 'float32' or 'float64': the dtype of accumulated statistics",
    "pruner": "one of the declared built-in pruners' names, or a callable pruner",
    "array": "an array, checked by the function's array checks",
    "object": "an object the function checks itself",
}


@dataclass(frozen=True)
class Parameter:
    """One declared parameter of a public function.

    Attributes
    ----------
    name
        The parameter's name in the signature.
    kind
        What it accepts: one of :data:`KINDS` (``"real"``, ``"integer"``, ``"flag"``,
        ``"choice"``, ``"density"``, ``"rank"``, ...).
    default
        The signature's default; :data:`REQUIRED` for a required argument.
    minimum, maximum
        Bounds of a ``"real"`` or ``"integer"`` (``None``: unbounded). A string names another
        parameter (or a context entry) whose validated value is the bound: ``gradual_iters``
        is at most ``iters``.
    low_open, high_open
        Whether a real's bounds are excluded (``damping``: whether it must be positive).
    choices
        The accepted strings of a ``"choice"`` or the built-in names of a ``"pruner"``; for a
        ``"real"``, strings it accepts besides numbers (``split``: ``"auto"``, ``"paper"``).
    optional
        Whether ``None`` is accepted (and returned as ``None``: the function then picks a
        value itself, or the feature is off).
    what
        Why the integer bounds are what they are, added to the message; ``{name}`` fields are
        filled with the validated values, and it is dropped when a named bound is absent.
    label
        The argument's name in messages, when it is not ``name`` (a result class's field).
    doc
        The parameter's meaning, from the function's docstring.
    """

    name: str
    kind: str
    default: Any = REQUIRED
    minimum: float | str | None = None
    maximum: float | str | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    what: str = ""
    label: str = ""
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"parameter {self.name!r}: unknown kind {self.kind!r}; "
                             f"one of {', '.join(KINDS)}")

    @property
    def required(self) -> bool:
        """Whether the argument has no default."""
        return self.default is REQUIRED

    @property
    def validated(self) -> bool:
        """Whether :meth:`Contract.validate` checks it (scalars), rather than the function's
        body (arrays and objects)."""
        return self.kind not in ("array", "object")

    def validate(self, value: Any, resolve: Callable[[str], Any]) -> Any:
        """``value`` checked as this parameter, returned in its canonical type.

        ``resolve(name)`` gives the validated value of another parameter or context entry
        (a bound, the pattern of a density, the shape of a rank), ``None`` when unknown.
        """
        label = self.label or self.name
        if value is None and self.optional:
            return None
        if self.choices and isinstance(value, str) and self.kind not in ("choice", "pruner"):
            return check.choice(label, value, self.choices)
        kind = self.kind
        if kind == "real":
            return check.real(label, value, minimum=self._bound(self.minimum, resolve),
                              maximum=self._bound(self.maximum, resolve),
                              low_open=self.low_open, high_open=self.high_open)
        if kind == "integer":
            minimum, maximum = self._bound(self.minimum, resolve), self._bound(self.maximum, resolve)
            named = [b for b in (self.minimum, self.maximum) if isinstance(b, str)]
            what = "" if any(resolve(b) is None for b in named) else self.what
            if what and "{" in what:
                what = what.format_map({b: resolve(b) for b in named})
            return check.integer(label, value, minimum=minimum, maximum=maximum, what=what)
        if kind == "flag":
            return check.flag(label, value)
        if kind == "choice":
            return check.choice(label, value, self.choices)
        if kind == "damping":
            return check.damping(value, name=label, positive=self.low_open)
        if kind == "rank":
            shape = resolve("shape")
            if shape is None:  # no weight to bound it: a count of at least one
                return check.integer(label, value, minimum=1)
            return check.rank(value, tuple(shape))
        if kind == "shape":
            return check.shape(value, label)
        if kind == "rng":
            return check.rng(value)
        if kind == "dtype":
            return check.accumulation_dtype(label, value)
        if kind == "pruner":
            return value if callable(value) else check.choice(label, value, self.choices)
        # Patterns and densities come from the sparsity module, which declares its own
        # contracts through this one: imported when first needed.
        from .sparsity import parse_pattern

        if kind == "pattern":
            return parse_pattern(value)
        if kind == "density":
            pattern = resolve("pattern")
            return check.density(value, parse_pattern("unstructured" if pattern is None else pattern))
        return value  # "array", "object": the function's body checks them

    @staticmethod
    def _bound(bound: float | str | None, resolve: Callable[[str], Any]) -> Any:
        return resolve(bound) if isinstance(bound, str) else bound


class Contract:
    """The declared parameters of one public function, in signature order.

    Attributes
    ----------
    function
        The qualified name of the function (``"admm_prune"``, ``"SylvesterSolver.solve"``).
    parameters
        An ordered read-only mapping from each parameter's name to its :class:`Parameter`.
    """

    def __init__(self, function: str, parameters: Mapping[str, Parameter]) -> None:
        self.function = function
        self.parameters: Mapping[str, Parameter] = MappingProxyType(dict(parameters))

    def __repr__(self) -> str:
        return f"Contract({self.function!r}, [{', '.join(self.parameters)}])"

    def defaults(self) -> dict[str, Any]:
        """The defaults of the parameters that have one, by name."""
        return {name: p.default for name, p in self.parameters.items() if not p.required}

    def validate(self, context: Mapping[str, Any] | None = None, /, **values: Any) -> dict[str, Any]:
        """The given arguments checked against their declarations, in the order given.

        Parameters
        ----------
        context
            What the checks need beyond the arguments themselves: ``"shape"``, the
            ``(d_in, d_out)`` of the weight that bounds a ``rank``; ``"pattern"``, the pattern
            that implies a ``density`` (else the ``pattern`` argument given here, else the
            declared default); the value of another parameter that bounds one (else the value
            given here, else its default).
        **values
            Arguments by name. Arrays and objects are returned as given: the function's body
            checks them.

        Returns
        -------
        dict
            The validated values by name, in the order given (Python floats for reals,
            ints for integers, bools for flags, a ``SparsityPattern`` for a pattern).

        Raises
        ------
        TypeError
            A name that is not a parameter of the function, or a value of the wrong kind
            (:class:`~matfactor._validation.ArgumentTypeError`, also a ``ValueError``).
        ValueError
            A value out of range.
        """
        unknown = [name for name in values if name not in self.parameters]
        if unknown:
            raise TypeError(f"{self.function}() has no parameters {unknown} (its parameters: "
                            f"{', '.join(self.parameters)})")
        context = {} if context is None else context
        validated: dict[str, Any] = {}

        def resolve(name: str) -> Any:
            if name in validated:
                return validated[name]
            if name in context:
                return context[name]
            declared = self.parameters.get(name)
            if declared is None or declared.required or declared.default is None:
                return None
            return declared.validate(declared.default, resolve)

        for name, value in values.items():
            validated[name] = self.parameters[name].validate(value, resolve)
        return validated


_SECTION = re.compile(r"^(\s*)(Parameters|Attributes)\n\s*-+\n", re.MULTILINE)


def _documented(obj: Any) -> dict[str, str]:
    """The meanings of the parameters in ``obj``'s numpydoc ``Parameters`` section (for a
    class, ``Attributes``): one entry per name, grouped names (``density, pattern``) sharing
    their text."""
    docstring = inspect.cleandoc(obj.__doc__ or "")
    match = _SECTION.search(docstring)
    if match is None:
        return {}
    meanings: dict[str, str] = {}
    names: list[str] = []
    lines = docstring[match.end():].splitlines()
    for line, following in zip(lines, [*lines[1:], ""]):
        if not line.strip():
            continue
        if not line.startswith(" "):
            underlined = following.strip() and set(following.strip()) == {"-"}
            if underlined or not re.fullmatch(r"[*\w]+(, [*\w]+)*", line.strip()):
                break  # the next section
            names = [name.lstrip("*") for name in line.split(", ")]
            for name in names:
                meanings[name] = ""
            continue
        for name in names:
            meanings[name] = f"{meanings[name]} {line.strip()}".strip()
    return meanings


_Declared = TypeVar("_Declared", bound=Callable[..., Any])


def declare(*parameters: Parameter, docs_from: tuple[Callable[..., Any], ...] = (),
            ) -> Callable[[_Declared], _Declared]:
    """Attach a :class:`Contract` of ``parameters`` to the decorated function or class.

    The declarations must name exactly the signature's parameters (``self`` apart); each
    takes its default from the signature and, unless it states one, its meaning from the
    docstring, else from the docstrings of ``docs_from`` (a function documented "parameters
    as in ..."). A mismatch is a ``TypeError`` when the module is imported.
    """
    def attach(function: _Declared) -> _Declared:
        signature = inspect.signature(function)
        in_signature = [name for name in signature.parameters if name != "self"]
        declared = [p.name for p in parameters]
        if declared != in_signature:
            raise TypeError(f"the contract of {function.__qualname__} declares {declared}, its "
                            f"signature has {in_signature}")
        meanings = {}
        for documented in (*reversed(docs_from), function):
            meanings.update({name: doc for name, doc in _documented(documented).items() if doc})
        complete = {}
        for p in parameters:
            default = signature.parameters[p.name].default
            complete[p.name] = replace(
                p, default=REQUIRED if default is inspect.Parameter.empty else default,
                doc=p.doc or meanings.get(p.name, ""))
        function.__contract__ = Contract(function.__qualname__, complete)
        return function

    return attach


def contract(function: Callable[..., Any]) -> Contract:
    """The declared parameters of a public function or class of matfactor.

    Parameters
    ----------
    function
        A public solver, pruner, budget helper or result class (``matfactor.admm_prune``,
        ``matfactor.SparsityPattern``), or a method of one (``SylvesterSolver.solve``, bound
        or not).

    Returns
    -------
    Contract
        ``contract(f).parameters`` maps each parameter's name, in signature order, to its
        :class:`Parameter` (``.name``, ``.kind``, ``.default``, :data:`REQUIRED` for a
        required one, ``.doc``, bounds and choices); ``contract(f).validate(**values)``
        returns the values validated as ``f`` validates them.

    Raises
    ------
    TypeError
        If ``function`` declares no contract (a function without scalar parameters, or not
        one of matfactor's).

    Examples
    --------
    >>> import matfactor
    >>> c = matfactor.contract(matfactor.sparsegpt_prune)
    >>> list(c.parameters)
    ['W', 'H', 'density', 'pattern', 'damping', 'block_size']
    >>> c.parameters["block_size"].default
    128
    >>> c.validate(damping=0.05, block_size=64)
    {'damping': 0.05, 'block_size': 64}
    """
    declared = getattr(function, "__contract__", None)
    if not isinstance(declared, Contract):
        raise TypeError(f"function must be a public function or class of matfactor that declares "
                        f"its parameters, got {function!r} ({check.type_name(function)})")
    return declared
