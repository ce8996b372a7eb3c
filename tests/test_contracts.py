"""The declared parameter contracts (``matfactor.contract``) and what is derived from them.

The bad-input corpus derived from the contracts is in ``tests/test_validation.py``; here: the
accessor, the declaration rules, and that the solvers and the pruner options of
``sparse_plus_lowrank`` read the declarations.
"""

from __future__ import annotations

import numpy as np
import pytest

import matfactor
from matfactor._contract import REQUIRED, Contract, Parameter, declare
from matfactor.testing import realistic_layer


def test_contract_lists_parameters_in_signature_order_with_defaults_and_meanings():
    declared = matfactor.contract(matfactor.admm_prune)
    assert isinstance(declared, Contract)
    assert list(declared.parameters) == ["W", "H", "density", "pattern", "iters", "gradual_iters",
                                         "damping", "rho", "warm_start", "return_state"]
    iters = declared.parameters["iters"]
    assert (iters.name, iters.kind, iters.default, iters.minimum) == ("iters", "integer", 20, 1)
    assert "ADMM iterations" in iters.doc
    assert declared.parameters["W"].default is REQUIRED and declared.parameters["W"].required
    assert declared.defaults()["gradual_iters"] == 15


def test_methods_and_classes_have_contracts_bound_or_not():
    solver = matfactor.SylvesterSolver(np.eye(3), np.eye(2))
    assert matfactor.contract(solver.solve) is matfactor.contract(matfactor.SylvesterSolver.solve)
    assert list(matfactor.contract(matfactor.SparsityPattern).parameters) == ["kind", "n", "m"]


@pytest.mark.parametrize("function", [42, None, print, lambda W: W, matfactor.layer_error])
def test_contract_of_something_undeclared_is_a_type_error_naming_the_argument(function):
    with pytest.raises(TypeError, match="function must be a public function"):
        matfactor.contract(function)


def test_validate_returns_canonical_values_in_the_order_given():
    declared = matfactor.contract(matfactor.sparsegpt_prune)
    valid = declared.validate(block_size=np.int64(64), damping=np.float32(0.5), pattern="2:4",
                              density=None)
    assert list(valid) == ["block_size", "damping", "pattern", "density"]
    assert type(valid["block_size"]) is int and type(valid["damping"]) is float
    assert valid["pattern"] == matfactor.parse_pattern("2:4") and valid["density"] == 0.5


def test_validate_raises_the_functions_own_errors():
    declared = matfactor.contract(matfactor.admm_prune)
    with pytest.raises(ValueError, match=r"gradual_iters must be an integer in \[0, 3\] \(at most "
                                         r"iters = 3\), got 4"):
        declared.validate(iters=3, gradual_iters=4)
    with pytest.raises(ValueError, match=r"at most iters = 20"):   # the declared default bounds it
        declared.validate(gradual_iters=21)
    with pytest.raises(TypeError, match="damping"):
        declared.validate(damping="0.1")
    with pytest.raises(TypeError, match=r"has no parameters \['bogus'\]"):
        declared.validate(bogus=1)


def test_validate_uses_the_context_for_rank_and_density():
    rank = matfactor.contract(matfactor.truncated_svd)
    assert rank.validate({"shape": (4, 3)}, rank=3) == {"rank": 3}
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 3\]"):
        rank.validate({"shape": (4, 3)}, rank=4)
    assert rank.validate(rank=100) == {"rank": 100}    # no weight: a count of at least one
    density = matfactor.contract(matfactor.mask_from_scores)
    with pytest.raises(ValueError, match="contradicts pattern '2:4'"):
        density.validate({"pattern": matfactor.parse_pattern("2:4")}, density=0.3)


def test_declare_refuses_a_declaration_that_is_not_the_signature():
    with pytest.raises(TypeError, match=r"declares \['a'\], its signature has \['a', 'b'\]"):
        @declare(Parameter("a", "flag"))
        def f(a: bool, b: int = 1) -> None: ...
    with pytest.raises(ValueError, match="unknown kind"):
        Parameter("a", "colour")


def test_declare_takes_defaults_from_the_signature_and_meanings_from_the_docstring():
    @declare(Parameter("x", "real", minimum=0.0), Parameter("y", "integer", doc="Stated."))
    def f(x: float, y: int = 3) -> None:
        """A test function.

        Parameters
        ----------
        x
            Some length,
            over two lines.
        y
            Documented here too.
        """

    declared = matfactor.contract(f)
    assert declared.parameters["x"].doc == "Some length, over two lines."
    assert declared.parameters["y"].doc == "Stated." and declared.parameters["y"].default == 3


def test_sparse_plus_lowrank_pruner_options_are_the_pruners_declared_parameters():
    layer = realistic_layer(16, 12, seed=0)
    with pytest.raises(TypeError, match=r"its options: iters, gradual_iters, damping, rho"):
        matfactor.sparse_plus_lowrank(layer.W, layer.H, 2, density=0.5, pruner="admm", iters=1,
                                      pruner_options={"warm_start": None})
    with pytest.raises(TypeError, match=r"its options: damping, block_size"):
        matfactor.sparse_plus_lowrank(layer.W, layer.H, 2, density=0.5, iters=1,
                                      pruner_options={"bogus": 1})
    # The defaults are the pruners' own: passing them changes nothing.
    defaults = matfactor.contract(matfactor.sparsegpt_prune).defaults()
    options = {name: defaults[name] for name in ("damping", "block_size")}
    base = matfactor.sparse_plus_lowrank(layer.W, layer.H, 2, density=0.5, iters=2, lowrank_iters=2)
    same = matfactor.sparse_plus_lowrank(layer.W, layer.H, 2, density=0.5, iters=2, lowrank_iters=2,
                                         pruner_options=options)
    np.testing.assert_array_equal(base.dense(), same.dense())


def test_the_command_and_recipes_can_read_the_choices():
    pruner = matfactor.contract(matfactor.sparse_plus_lowrank).parameters["pruner"]
    assert pruner.kind == "pruner" and pruner.choices == ("magnitude", "wanda", "sparsegpt", "admm")
    assert pruner.optional and pruner.default is None
    split = matfactor.contract(matfactor.double_sparse).parameters["split"]
    assert split.choices == ("auto", "paper") and split.default == "auto"
