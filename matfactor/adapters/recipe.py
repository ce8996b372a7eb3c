"""Recipes: which layers are compressed, by which method, with which budget and arguments.

A recipe is a list of rules and an ignore list. A layer is compressed by the first rule whose
``targets`` match its name, unless a pattern of ``ignore`` matches it first. Names are the
model's module names (``encoder.layer.3.attention.self.query``); patterns are shell-style
(:mod:`fnmatch`: ``*`` matches any text, dots included) or, written ``re:...``, regular
expressions matched against the whole name.

From Python::

    Recipe.single("dsf", density=0.5)
    Recipe([Rule("sparsegpt", targets=["*.attention.*"], pattern="2:4"),
            Rule("dsf", density=0.5)], ignore=["*.output.dense"])

From a file (YAML or JSON, the same fields)::

    method: dsf            # one rule at the top level ...
    density: 0.5
    arguments: {outer_iters: 20}
    ignore: ["encoder.layer.0.*"]
    refine: {steps: 32, lr: 0.01}     # optional: block refinement after the layer solves

    rules:                 # ... or several, first match wins
      - {targets: ["*.attention.*"], method: sparsegpt, pattern: "2:4"}
      - {method: dsf, density: 0.5}

By default (no ``targets``), a rule applies to every compressible layer inside the model's
repeated blocks: the embeddings and the final head sit outside them and are left alone. A
target pattern can reach layers outside the blocks in one-shot mode.

``refine`` (:class:`~matfactor.adapters.refinement.Refinement`) optimises each block's stored
values after its layers are solved, to match the dense model's outputs of the block.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matfactor import _validation as check
from matfactor import parse_pattern

from .methods import METHODS, Method
from .refinement import Refinement

__all__ = ["Recipe", "Rule"]

_RULE_FIELDS = ("method", "targets", "density", "rank", "pattern", "arguments")
_TOP_FIELDS = ("rules", "ignore", "refine") + _RULE_FIELDS


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_patterns(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) \
            or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{what} must be a list of non-empty name patterns, got {value!r}")
    for item in value:
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as exc:
                raise ValueError(f"{what}: {item!r} is not a valid regular expression: {exc}") from exc
    return tuple(value)


@dataclass(frozen=True)
class Rule:
    """One rule: a method, its budget and arguments, and the layers it applies to.

    Parameters
    ----------
    method
        One of :data:`matfactor.adapters.methods.METHODS`.
    targets
        Name patterns of the layers it applies to; ``None``: every layer inside the blocks.
    density
        Kept fraction of each layer's dense parameters, in (0, 1].
    rank
        Rank of the low-rank part (low-rank family, sparse plus low rank), instead of or beside
        a density.
    pattern
        Sparsity pattern of the sparse methods: ``"unstructured"``, ``"per_output"`` or ``"n:m"``
        (then no density is needed).
    arguments
        Keyword arguments of the method's core function (e.g. ``outer_iters`` for ``dsf``),
        checked against its signature.
    """

    method: str
    targets: tuple[str, ...] | None = None
    density: float | None = None
    rank: int | None = None
    pattern: str = "unstructured"
    arguments: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The core's front door: the same accepted values and messages as every solver.
        check.choice("method", self.method, sorted(METHODS))
        spec = METHODS[self.method]
        if self.targets is not None:
            object.__setattr__(self, "targets", _check_patterns(self.targets, "targets"))
        if self.density is not None:
            object.__setattr__(self, "density", check.real("density", self.density, minimum=0.0,
                                                           maximum=1.0, low_open=True))
        if self.rank is not None:
            object.__setattr__(self, "rank", check.integer("rank", self.rank, minimum=1))
        if not isinstance(self.pattern, str):
            raise check.ArgumentTypeError(f"pattern must be a string such as 'unstructured', "
                                          f"'per_output' or '2:4', got {self.pattern!r}")
        pattern = str(parse_pattern(self.pattern))
        object.__setattr__(self, "pattern", pattern)
        if not isinstance(self.arguments, dict) or not all(isinstance(k, str) for k in self.arguments):
            raise ValueError(f"arguments must be a mapping of argument names, got {self.arguments!r}")
        unknown = sorted(set(self.arguments) - spec.accepted())
        if unknown:
            raise ValueError(f"method {self.method!r} takes no argument(s) {unknown}; its arguments are "
                             f"{sorted(spec.accepted())} (the budget goes in density/rank/pattern)")
        self._check_budget(spec, pattern)

    def _check_budget(self, spec: Method, pattern: str) -> None:
        structured = ":" in pattern
        if pattern != "unstructured" and not spec.pattern:
            raise ValueError(f"method {self.method!r} takes no sparsity pattern, got pattern={pattern!r}")
        if spec.budget == "density":
            if self.rank is not None:
                raise ValueError(f"method {self.method!r} takes a density, not a rank")
            if self.density is None and not structured:
                raise ValueError(f"method {self.method!r} needs a density"
                                 + (" (or an n:m pattern)" if spec.pattern else ""))
            if self.density is not None and structured:
                raise ValueError(f"pattern {pattern!r} fixes the density; give no density with it")
        elif spec.budget == "rank":
            if (self.density is None) == (self.rank is None):
                raise ValueError(f"method {self.method!r} needs exactly one of density and rank")
        elif self.density is None:
            raise ValueError(f"method {self.method!r} needs a density: the total budget of its "
                             "sparse and low-rank parts")

    def applies_to(self, name: str) -> bool:
        """Whether the rule's targets match layer ``name`` (``None``: any layer in a block)."""
        return self.targets is None or any(_matches(pattern, name) for pattern in self.targets)

    def to_dict(self) -> dict[str, Any]:
        """The rule as plain data (the form of a recipe file, and of the checkpoint manifest)."""
        return {"method": self.method, "targets": None if self.targets is None else list(self.targets),
                "density": self.density, "rank": self.rank, "pattern": self.pattern,
                "arguments": dict(self.arguments)}


@dataclass(frozen=True)
class Recipe:
    """Rules (first match wins) and an ignore list.

    Parameters
    ----------
    rules
        The rules, in order of precedence.
    ignore
        Name patterns of layers never compressed, whatever the rules say.
    refine
        Block refinement after the layer solves (:class:`~matfactor.adapters.refinement.
        Refinement`), or ``None`` (default); a refinement of zero steps is ``None``.
    """

    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()
    refine: Refinement | None = None

    def __post_init__(self) -> None:
        rules = tuple(self.rules) if isinstance(self.rules, (list, tuple)) else None
        if not rules or not all(isinstance(rule, Rule) for rule in rules):
            raise ValueError(f"rules must be a non-empty list of Rule, got {self.rules!r}")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "ignore", _check_patterns(list(self.ignore), "ignore"))
        if self.refine is not None and not isinstance(self.refine, Refinement):
            raise TypeError(f"refine must be None or a Refinement, got {type(self.refine).__name__}")
        if self.refine is not None and self.refine.steps == 0:
            object.__setattr__(self, "refine", None)

    @classmethod
    def single(cls, method: str, *, density: float | None = None, rank: int | None = None,
               pattern: str = "unstructured", ignore: tuple[str, ...] = (), **arguments: Any) -> Recipe:
        """One method for every layer in the blocks: ``Recipe.single("dsf", density=0.5)``."""
        return cls((Rule(method, density=density, rank=rank, pattern=pattern, arguments=arguments),),
                   tuple(ignore))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "recipe") -> Recipe:
        """A recipe from plain data: one rule at the top level, or a ``rules`` list."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a recipe is a mapping with 'method' or 'rules', got "
                             f"{type(data).__name__}")
        unknown = sorted(set(data) - set(_TOP_FIELDS))
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; a recipe has {list(_TOP_FIELDS)}")
        if ("rules" in data) == ("method" in data):
            raise ValueError(f"{source}: give either 'method' (one rule) or 'rules' (a list), not both "
                             "or neither")
        raw_rules = data["rules"] if "rules" in data else [{k: v for k, v in data.items()
                                                            if k in _RULE_FIELDS}]
        if not isinstance(raw_rules, list) or not raw_rules:
            raise ValueError(f"{source}: 'rules' must be a non-empty list, got {raw_rules!r}")
        rules = []
        for index, raw in enumerate(raw_rules):
            if not isinstance(raw, dict):
                raise ValueError(f"{source}: rule {index} must be a mapping, got {raw!r}")
            extra = sorted(set(raw) - set(_RULE_FIELDS))
            if extra:
                raise ValueError(f"{source}: rule {index} has unknown field(s) {extra}; a rule has "
                                 f"{list(_RULE_FIELDS)}")
            try:
                rules.append(Rule(**{**raw, "arguments": raw.get("arguments") or {}}))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{source}: rule {index}: {exc}") from exc
        refine = data.get("refine")
        refine = None if refine is None else Refinement.from_dict(refine, source=f"{source}: refine")
        return cls(tuple(rules), tuple(data.get("ignore") or ()), refine)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Read a recipe from a ``.yaml``/``.yml`` (needs PyYAML) or ``.json`` file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"recipe file {str(path)!r} cannot be read: {exc.strerror}") from exc
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"recipe file {str(path)!r} is not valid YAML: {exc}") from exc
        elif path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"recipe file {str(path)!r} is not valid JSON: {exc}") from exc
        else:
            raise ValueError(f"recipe file {str(path)!r}: expected a .yaml, .yml or .json file")
        return cls.from_dict(data, source=f"recipe file {str(path)!r}")

    def rule_for(self, name: str, *, in_block: bool) -> Rule | None:
        """The rule that compresses layer ``name``, or ``None`` if it is left alone."""
        if any(_matches(pattern, name) for pattern in self.ignore):
            return None
        for rule in self.rules:
            if rule.targets is None and not in_block:
                continue
            if rule.applies_to(name):
                return rule
        return None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (round-trips through :meth:`from_dict`)."""
        data: dict[str, Any] = {"rules": [rule.to_dict() for rule in self.rules],
                                "ignore": list(self.ignore)}
        if self.refine is not None:
            data["refine"] = self.refine.to_dict()
        return data
