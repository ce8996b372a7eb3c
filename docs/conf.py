"""Sphinx configuration of the matfactor documentation.

Build from the repository root::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python -m sphinx -W --keep-going -b doctest docs docs/_build/doctest

The API reference is generated from the docstrings: ``api.rst`` names the package ``matfactor``,
and the templates in ``_templates/autosummary`` walk its public modules (names without a leading
underscore, ``matfactor.adapters`` and every module in it included, so a new module appears
without editing anything here) and document each module's ``__all__``. A name is documented
once, in the shallowest public namespace that exports it (``matfactor.truncated_svd``, not
``matfactor.svd.truncated_svd``); the other modules that export it link there.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import inspect
import os
import pkgutil

# The examples run on one thread: they are small, and the machine may be shared. (Set before
# NumPy is first imported, which starts its BLAS threads.)
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import matfactor

project = "matfactor"
author = "the matfactor authors"
copyright = "the matfactor authors, Apache-2.0"
release = version = matfactor.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "figures/data"]
templates_path = ["_templates"]
html_theme = "furo"
html_title = f"matfactor {release}"

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
myst_update_mathjax = False  # leave mathjax's settings alone: the same for every builder

autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

doctest_global_setup = f"""
DOCS_DIR = {os.path.dirname(os.path.abspath(__file__))!r}  # the pages' examples read files beside them
import os
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
try:
    import torch
    torch.set_num_threads(1)
except ImportError:
    pass
"""
doctest_default_flags = (doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.IGNORE_EXCEPTION_DETAIL
                         | doctest.DONT_ACCEPT_TRUE_FOR_1)
doctest_test_doctest_blocks = ""  # only the {testcode} and {doctest} blocks of the pages run

# ---------------------------------------------------------------------------------------------
# The API reference: which modules, and where each public name is documented.

_PACKAGES = ("matfactor", "matfactor.adapters")
#: The order of the groups on a package's page (by defining module); others follow, by name.
_ORDER = ("sparsity", "pruning", "admm", "error", "exceptions", "svd", "lowrank_descent", "pifa",
          "reconstruct", "dsf", "sylvester", "sparse_lowrank", "layers", "calibration", "recipe",
          "methods", "pipeline", "modules", "checkpoint")


def _public(module_name: str) -> list[str]:
    return list(getattr(importlib.import_module(module_name), "__all__", []))


def _submodules(module_name: str) -> list[str]:
    """Public modules directly inside a package (``matfactor.adapters`` inside ``matfactor``)."""
    module = importlib.import_module(module_name)
    if not hasattr(module, "__path__"):
        return []
    names = {f"{module_name}.{info.name}" for info in pkgutil.iter_modules(module.__path__)}
    names |= {package for package in _PACKAGES if package.rpartition(".")[0] == module_name}
    return sorted(name for name in names if not name.rpartition(".")[2].startswith("_"))


def _all_modules() -> list[str]:
    found, todo = [], ["matfactor"]
    while todo:
        name = todo.pop(0)
        found.append(name)
        todo.extend(_submodules(name))
    return found


@functools.cache
def _canonical() -> dict[tuple[int, str], str]:
    """The documented full name of each public object: the shallowest namespace exporting it
    (an object is the same one when it is and is named the same)."""
    canonical: dict[tuple[int, str], str] = {}
    for module_name in sorted(_all_modules(), key=lambda name: (name.count("."), name)):
        module = importlib.import_module(module_name)
        for name in _public(module_name):
            canonical.setdefault((id(getattr(module, name)), name), f"{module_name}.{name}")
    return canonical


def documented_here(module_name: str) -> list[str]:
    """Names of ``module_name.__all__`` whose documentation lives on this module's page."""
    canonical = _canonical()
    module = importlib.import_module(module_name)
    return [name for name in _public(module_name)
            if canonical[id(getattr(module, name)), name] == f"{module_name}.{name}"]


def documented_elsewhere(module_name: str) -> list[str]:
    """Full documented names of the rest of ``module_name.__all__``."""
    canonical = _canonical()
    module = importlib.import_module(module_name)
    here = set(documented_here(module_name))
    return [canonical[id(getattr(module, name)), name] for name in _public(module_name) if name not in here]


def groups(module_name: str) -> list[tuple[str, list[str]]]:
    """The names documented on a package's page, grouped by the module that defines them,
    each group titled by that module's one-line summary."""
    module = importlib.import_module(module_name)
    grouped: dict[str, list[str]] = {}
    for name in documented_here(module_name):
        defining = getattr(getattr(module, name), "__module__", None) or module_name
        if not defining.startswith("matfactor"):
            defining = module_name
        grouped.setdefault(defining, []).append(name)
    def rank(defining: str) -> tuple[int, str]:
        last = defining.rpartition(".")[2]
        return (_ORDER.index(last) if last in _ORDER else len(_ORDER), defining)

    result = []
    for defining, names in sorted(grouped.items(), key=lambda item: rank(item[0])):
        if defining == module_name:
            result.append(("", names))
            continue
        summary = (inspect.getdoc(importlib.import_module(defining)) or defining).split("\n\n")[0]
        result.append((f"{summary.replace(chr(10), ' ').rstrip('.')} (:mod:`{defining}`)", names))
    return result


def _lookup(name: str) -> object | None:
    """The object a dotted name refers to (a module, or an attribute of one), or ``None``."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj
    return None


def _documented_name(app, env, node, contnode):
    """Resolve a Python reference to a name documented elsewhere: a docstring that writes
    ``matfactor.svd.truncated_svd`` (or ``truncated_svd`` inside ``matfactor.svd``) links to
    ``matfactor.truncated_svd``, where it is documented."""
    module = node.get("py:module") or ""
    if node.get("refdomain") != "py" or not node["reftarget"].startswith(("matfactor", "~matfactor")) \
            and not module.startswith("matfactor"):
        return None
    target = node["reftarget"].lstrip("~.")
    candidates = [target] + [f"{node[key]}.{target}" for key in ("py:class", "py:module") if node.get(key)]
    if node.get("py:module") and node.get("py:class"):
        candidates.append(f"{node['py:module']}.{node['py:class']}.{target}")
    for candidate in candidates:
        head, _, last = candidate.rpartition(".")
        parent = _lookup(head) if head else None
        if parent is None or not hasattr(parent, last):
            continue
        canonical = _canonical().get((id(getattr(parent, last)), last))
        if canonical is None:  # a method or attribute: resolve its owner, keep the rest
            owner = _canonical().get((id(parent), head.rpartition(".")[2]))
            canonical = owner and f"{owner}.{last}"
        if canonical and canonical != node["reftarget"]:
            domain = env.get_domain("py")
            resolved = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], canonical,
                                           node, contnode)
            if resolved is not None:
                return resolved
    if "." not in target:  # a bare public name documented in another module of the package
        matches = {name for name in _canonical().values() if name.rpartition(".")[2] == target}
        if len(matches) == 1:
            return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                                     matches.pop(), node, contnode)
    return None


def setup(app):
    app.connect("missing-reference", _documented_name)


# What the templates need, computed once here (plain data, so that Sphinx can cache the
# configuration and a second build reuses the first one's environment).
autosummary_context = {
    "api": {name: {"here": documented_here(name), "elsewhere": documented_elsewhere(name),
                   "groups": groups(name), "submodules": _submodules(name)}
            for name in _all_modules()},
}
