"""Compression methods: one declaration each, one registry, and the solve of one layer problem.

A method is a :class:`Method`: what it calls (its ``solve``, given a :class:`MethodCall`), which
core functions' parameters a recipe may pass it, which budget it takes, what statistics it
needs, what result it returns and how much memory its solve holds. Everything else reads the
declaration: recipes validate their rules against it, the pipeline feeds it, the memory plan
sizes it, the command lists it. :data:`METHODS` is the registry, :func:`register_method` adds a
method to it, from inside matfactor or from a user's own module (see the guide, *Adding a
method*); packages can also declare theirs under the entry-point group ``matfactor.methods``
(each entry point a module or a callable that registers), loaded the first time the registry is
read.

The built-in methods (:mod:`matfactor.adapters._builtin_methods`), with the budget each takes as
a density (kept fraction of the dense parameters) or, for the low-rank family, a rank:

==================== =============================================== =====================
method               core call                                       budget
==================== =============================================== =====================
``magnitude``        :func:`matfactor.magnitude_prune`               density or n:m
``wanda``            :func:`matfactor.wanda_prune`                   density or n:m
``sparsegpt``        :func:`matfactor.sparsegpt_prune`               density or n:m
``admm``             :func:`matfactor.admm_prune`                    density or n:m
``dsf``              :func:`matfactor.double_sparse`                 density
``lowrank``          :func:`matfactor.truncated_svd` (data free)     rank or density
``weighted_lowrank`` :func:`matfactor.weighted_lowrank`              rank or density
``pifa``             weighted low rank, then                         rank or density
                     :func:`matfactor.pifa_from_factors`             (PIFA's count)
``mpifa``            :func:`matfactor.mpifa` (two-stream statistics) rank or density
``sparse_lowrank``   :func:`matfactor.sparse_plus_lowrank`           density (+ rank or
                                                                     ``rank_ratio``)
==================== =============================================== =====================

A density budget counts stored values: ``nnz`` for sparse matrices, ``r (d_in + d_out)`` for two
factors and ``r (d_in + d_out − r)`` for PIFA, as each paper does. For ``sparse_lowrank`` the
density is the total of both parts: with an ``n:m`` pattern the low-rank part gets what the
pattern leaves (``sparse_lowrank_rank``, HASSLE-free section 5); unstructured, a share
``rank_ratio`` (default 0.3, OATS's) of the budget goes to the low-rank part
(``sparse_lowrank_budget``, appendix A.3), unless ``rank`` is given, when the sparse part keeps
what the rank leaves of :func:`matfactor.nnz_budget`'s count.

Every result a method returns answers the same questions: ``shape``, ``dense()``,
``matmul(X)`` and ``n_params`` (the core's result types, and :class:`Pruned` for a pruned
weight); :mod:`matfactor.adapters.modules` maps each result type to the module that computes
with it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pickle
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable

import torch

import matfactor
from matfactor import ReconstructionStatistics, layer_error

__all__ = ["BUDGETS", "METHODS", "STATISTICS", "Budget", "LayerSolution", "Method", "MethodCall",
           "Pruned", "declaring_modules", "import_plugin", "register_method", "resolve_budget",
           "solve_layer"]

#: The kinds of budget a method takes: a density (or an n:m pattern where it takes patterns); a
#: rank (or a density converted by its ``rank_for_density``); the total density of a sparse part
#: and a low-rank part.
BUDGETS = ("density", "rank", "total")
#: What a method's solve reads of the calibration: ``"gram"``, ``H = XᵀX`` of the layer's
#: inputs; ``"streams"``, the two-stream statistics of the dense and the compressed model's
#: inputs (:class:`matfactor.ReconstructionStatistics`, MPIFA); ``"none"``, nothing (data free).
STATISTICS = ("gram", "streams", "none")
#: Arguments the pipeline sets from the budget; a recipe gives them as budget fields instead.
_BUDGET_NAMES = frozenset({"W", "H", "statistics", "density", "rank", "pattern", "U", "V", "rng"})
_ENTRY_POINT_GROUP = "matfactor.methods"


@dataclass(frozen=True)
class Budget:
    """The resolved budget of one layer: what the core call receives."""

    density: float | None
    rank: int | None
    pattern: str


@dataclass(frozen=True)
class MethodCall:
    """One call of a method's ``solve`` on one layer.

    Attributes
    ----------
    W
        ``(d_in, d_out)`` weight (float32 or float64 torch tensor) the method approximates.
    H
        ``(d_in, d_in)`` Gram matrix of the layer's calibration inputs (``None`` never happens
        in the pipeline; a data-free method ignores it).
    statistics
        The two-stream statistics of a ``statistics="streams"`` method, else ``None``.
    budget
        The layer's resolved :class:`Budget`.
    arguments
        The recipe's keyword arguments for the method (a private copy).
    seed
        Seed for methods that draw random numbers.
    """

    W: torch.Tensor
    H: torch.Tensor | None
    statistics: ReconstructionStatistics | None
    budget: Budget
    arguments: dict[str, Any]
    seed: int


@dataclass(frozen=True, eq=False)
class Pruned:
    """A pruned weight as a method's result: ``Ŵ = W``, exactly zero off its pattern.

    The public pruners (:func:`matfactor.magnitude_prune`, ...) return the array itself; the
    model side wraps it so that every result answers the same questions.
    """

    W: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_in, d_out)``."""
        return tuple(self.W.shape)

    def dense(self) -> torch.Tensor:
        """``Ŵ``, the pruned weight itself."""
        return self.W

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ Ŵ``."""
        return X @ self.W

    @property
    def n_params(self) -> int:
        """Stored values: the nonzeros."""
        return int(torch.count_nonzero(self.W))


@dataclass(frozen=True)
class Method:
    """The declaration of one compression method: everything the model side knows about it.

    Attributes
    ----------
    name
        What recipes and the command call it.
    solve
        ``solve(call: MethodCall) -> result``: the compressed form of ``call.W``, a result with
        ``shape``, ``dense()``, ``matmul(X)`` and ``n_params`` whose type has a module form
        (:func:`matfactor.adapters.modules.register_module`); torch tensors, on ``call.W``'s
        device.
    budget
        One of :data:`BUDGETS`.
    work_bytes
        ``work_bytes(shape, budget, arguments, itemsize) -> int``: the peak bytes the solve
        allocates beyond its inputs (``W`` and the statistics), the returned result included,
        for a ``(d_in, d_out)`` layer in a compute dtype of ``itemsize`` bytes. The memory plan
        (:mod:`matfactor.adapters.memory`) adds the inputs and the pipeline's own end of the
        solve.
    solvers
        The functions whose parameters a recipe may pass as ``arguments`` (the budget names
        ``W``, ``H``, ``density``, ``rank``, ``pattern``, ... excepted): their declared
        parameters (:func:`matfactor.contract`), or a signature's keyword parameters for a
        function without a declaration.
    options
        Arguments of the method's own, beyond its solvers'.
    pattern
        Whether it takes a sparsity pattern (``"per_output"``, ``"n:m"``).
    statistics
        One of :data:`STATISTICS`.
    rank_for_density
        For a ``"rank"`` budget: ``rank_for_density(shape, density) -> int``, the largest rank
        whose stored values fit in the density.
    takes_mix
        A ``"streams"`` method that corrects the error accumulation itself and takes the
        pipeline's ``mix`` as an argument (MPIFA); any other method gets, with ``mix > 0`` in
        sequential mode, the error-corrected target as its ``W``.
    summary
        One line for listings (the command's help).
    """

    name: str
    solve: Callable[[MethodCall], Any]
    budget: str
    work_bytes: Callable[[tuple[int, int], Budget, dict[str, Any], int], int]
    solvers: tuple[Callable[..., Any], ...] = ()
    options: tuple[str, ...] = ()
    pattern: bool = False
    statistics: str = "gram"
    rank_for_density: Callable[[tuple[int, int], float], int] | None = None
    takes_mix: bool = False
    summary: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Method: name must be an identifier such as 'my_method', got {self.name!r}")
        for attribute in ("solve", "work_bytes"):
            if not callable(getattr(self, attribute)):
                raise TypeError(f"Method {self.name!r}: {attribute} must be callable, got "
                                f"{type(getattr(self, attribute)).__name__}")
        if self.budget not in BUDGETS:
            raise ValueError(f"Method {self.name!r}: budget must be one of {', '.join(BUDGETS)}, got "
                             f"{self.budget!r}")
        if self.statistics not in STATISTICS:
            raise ValueError(f"Method {self.name!r}: statistics must be one of {', '.join(STATISTICS)}, "
                             f"got {self.statistics!r}")
        if (self.budget == "rank") != (self.rank_for_density is not None):
            raise ValueError(f"Method {self.name!r}: a rank_for_density is needed by, and only by, a "
                             "'rank' budget")
        if self.takes_mix and self.statistics != "streams":
            raise ValueError(f"Method {self.name!r}: takes_mix needs statistics='streams'")
        if not all(callable(solver) for solver in self.solvers):
            raise TypeError(f"Method {self.name!r}: solvers must be functions")
        if isinstance(self.options, str) or not all(isinstance(name, str) for name in self.options):
            raise TypeError(f"Method {self.name!r}: options must be a tuple of argument names")
        object.__setattr__(self, "solvers", tuple(self.solvers))
        object.__setattr__(self, "options", tuple(self.options))

    @property
    def needs_streams(self) -> bool:
        """Whether the solve reads the two-stream statistics (``statistics == "streams"``)."""
        return self.statistics == "streams"

    def accepted(self) -> frozenset[str]:
        """Keyword arguments a recipe may pass to this method."""
        names = set(self.options)
        for function in self.solvers:
            try:
                names.update(matfactor.contract(function).parameters)
            except TypeError:  # a solver from outside matfactor, without a declaration: its signature
                names.update(name for name, parameter in inspect.signature(function).parameters.items()
                             if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD))
        return frozenset(names - _BUDGET_NAMES)


class _Registry(Mapping[str, Method]):
    """The methods by name; entry points of ``matfactor.methods`` load on first read."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}
        self._loaded = False
        self.modules: dict[str, None] = {}   # modules outside matfactor that registered methods

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        from . import _builtin_methods  # noqa: F401  (registers the built-in methods)

        for entry in entry_points(group=_ENTRY_POINT_GROUP):
            loaded = entry.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded()

    def __getitem__(self, name: str) -> Method:
        self._load()
        return self._methods[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._methods)

    def __len__(self) -> int:
        self._load()
        return len(self._methods)

    def add(self, method: Method, replace: bool) -> None:
        known = self._methods.get(method.name)
        if known is not None and known != method and not replace:
            raise ValueError(f"a method {method.name!r} is already registered; pass replace=True to "
                             "replace it, or choose another name")
        self._methods[method.name] = method
        module = getattr(method.solve, "__module__", None)
        if module and module not in ("__main__", "__mp_main__") and module.partition(".")[0] != "matfactor":
            self.modules[module] = None


#: The registered methods by name (a read-only mapping; :func:`register_method` adds to it).
METHODS: Mapping[str, Method] = _Registry()


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS`, so that recipes, the pipeline and the command know it.

    Registering the same declaration again does nothing (a module imported twice, a worker
    process importing the module that registered it in the parent).

    Parameters
    ----------
    method
        The declaration.
    replace
        Replace a different method registered under the same name.

    Returns
    -------
    Method
        ``method``.

    Raises
    ------
    TypeError
        ``method`` is not a :class:`Method`.
    ValueError
        Another method has that name and ``replace`` is false.
    """
    if not isinstance(method, Method):
        raise TypeError(f"method must be a Method declaration, got {type(method).__name__}")
    METHODS.add(method, replace)  # type: ignore[attr-defined]
    return method


def declaring_modules() -> tuple[str, ...]:
    """The modules outside matfactor whose methods are registered in this process, in the order
    they registered: a worker process imports them (:func:`~matfactor.adapters.executors.process_pool`)
    so that it knows the same methods. (A method defined in the main script is registered again
    when a spawned worker re-imports that script.)"""
    return tuple(METHODS.modules)  # type: ignore[attr-defined]


def resolve_budget(method: Method, shape: tuple[int, int], *, density: float | None,
                   rank: int | None, pattern: str, arguments: dict[str, Any], name: str) -> Budget:
    """Turn a rule's density/rank into the arguments of the core call for a ``shape`` layer."""
    d_in, d_out = shape
    if method.budget == "density":
        return Budget(density, None, pattern)
    if method.budget == "rank":
        if rank is None:
            rank = method.rank_for_density(shape, density)
            if rank < 1:
                raise ValueError(f"{name}: density={density} leaves no rank for a {shape} layer "
                                 f"with {method.name}; increase density")
        return Budget(None, min(rank, d_in, d_out), pattern)
    # sparse plus low rank: the density is the total budget of both parts
    compression = 1.0 - density
    if ":" in pattern:
        if rank is None:
            rank = matfactor.sparse_lowrank_rank(shape, compression, pattern=pattern)
        sparse_density = None
    elif rank is None:
        split = matfactor.sparse_lowrank_budget(shape, compression, arguments.get("rank_ratio", 0.3))
        rank, sparse_density = split.rank, split.density
    else:
        # the core's count of the total budget, so that the split and the solve agree
        total = matfactor.nnz_budget(shape, density, "unstructured")
        left = total - rank * (d_in + d_out)
        if left < 1:
            raise ValueError(f"{name}: rank {rank} alone takes {rank * (d_in + d_out)} values of the "
                             f"{total} that density={density} allows a {shape} layer; lower the "
                             "rank or raise the density")
        sparse_density = (left + 0.5) / (d_in * d_out)
    if rank < 1:
        raise ValueError(f"{name}: density={density} with pattern {pattern!r} leaves no rank for the "
                         f"low-rank part of a {shape} layer; raise the density or pass a rank")
    return Budget(sparse_density, rank, pattern)


def reduce_by_value(instance: Any) -> tuple[Any, ...]:
    """``__reduce__`` of a dataclass shipped between processes: its fields pickled by value.

    multiprocessing's pickler, as torch sets it up, sends a tensor as a file descriptor that a
    thread of the sending process serves on request, from a socket in a ``/tmp/pymp-*``
    directory. A process ended abruptly (a pool worker at Ctrl-C or when its parent is killed)
    then leaves that directory behind, and the other side's serving thread prints an
    ``EOFError`` traceback. The tensors of a layer solve are copied between the processes
    either way.
    """
    fields = {item.name: getattr(instance, item.name) for item in dataclasses.fields(instance)}
    return _from_bytes, (type(instance), pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL))


def _from_bytes(cls: type, payload: bytes) -> Any:
    return cls(**pickle.loads(payload))


@dataclass
class LayerSolution:
    """The compressed form of one layer and what it cost."""

    result: Any                      # the method's result (Pruned or a matfactor result type)
    rel_error: float                 # tr(DᵀHD) / tr(WᵀHW) under the layer's calibration H
    params_after: int
    seconds: float
    budget: Budget = field(repr=False)

    __reduce__ = reduce_by_value

    def dense(self) -> Any:
        """The ``(d_in, d_out)`` matrix the compressed layer computes with."""
        return self.result.dense()


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not registered in this process (registered: "
                         f"{', '.join(sorted(METHODS))}); a method registered by a user's module "
                         "must be registered in every process that solves its layers: declare it "
                         f"under the entry-point group {_ENTRY_POINT_GROUP!r}")
    return METHODS[name]


def solve_layer(name: str, W: torch.Tensor, H: torch.Tensor | None,
                statistics: ReconstructionStatistics | None, method: str, *,
                density: float | None, rank: int | None, pattern: str,
                arguments: dict[str, Any], seed: int = 0) -> LayerSolution:
    """Compress one layer problem ``(W, H)`` with ``method`` under its budget.

    Parameters
    ----------
    name
        The layer's name, for error messages.
    W
        ``(d_in, d_out)`` weight in float32 or float64.
    H
        ``(d_in, d_in)`` Gram matrix of the calibration inputs.
    statistics
        Two-stream statistics (methods with ``statistics="streams"``), else ``None``.
    method, density, rank, pattern, arguments
        The recipe rule that applies to the layer (validated by the recipe).
    seed
        Seed of the methods that draw random numbers.

    Returns
    -------
    LayerSolution
    """
    spec = _method(method)
    budget = resolve_budget(spec, tuple(W.shape), density=density, rank=rank, pattern=pattern,
                            arguments=arguments, name=name)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            result = spec.solve(MethodCall(W, H, statistics, budget, dict(arguments), seed))
    except ValueError as exc:  # name the layer: the core names only its own arguments
        raise ValueError(f"{name} ({method}, W {tuple(W.shape)}): {exc}") from exc
    seconds = time.perf_counter() - start
    if isinstance(result, torch.Tensor):
        result = Pruned(result)
    if tuple(getattr(result, "shape", ())) != tuple(W.shape):
        raise ValueError(f"{name}: method {method!r} returned {type(result).__name__} of shape "
                         f"{getattr(result, 'shape', None)} for a weight of shape {tuple(W.shape)}")
    solution = LayerSolution(result, 0.0, int(result.n_params), seconds, budget)
    solution.rel_error = float(layer_error(W, solution.dense(), H))
    return solution


def import_plugin(spec: str) -> None:
    """Import a user's module that registers methods: a module name, or a ``.py`` file's path.

    A file is imported under its stem as module name, with its folder first on ``sys.path``, so
    that worker processes can import it again by name.
    """
    import sys
    from pathlib import Path

    path = Path(spec)
    if path.suffix == ".py":
        if not path.is_file():
            raise FileNotFoundError(f"plugin {spec!r} is not a file")
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        spec = path.stem
    importlib.import_module(spec)
