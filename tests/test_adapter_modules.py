"""Compressed torch modules: every solver result on every layer type computes ``x @ Ŵ + b``
(Linear, HF Conv1D) or the convolution by ``Ŵ`` (Conv2d) in float64, float32, float16 and
bfloat16, merges back into a dense layer, counts its parameters as the result does, keeps dtype and
device, runs with autograd; the factory and the constructors reject bad input by name."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import matfactor as mf
from matfactor.adapters.modules import (
    CompressedConv2d,
    CompressedLinear,
    DoubleSparseLinear,
    LowRankLinear,
    PifaLinear,
    SparseConv2d,
    SparseLinear,
    SparseLowRankLinear,
    UnfoldedConv2d,
    compressed_module,
    replace_module,
)
from matfactor.testing import realistic_layer

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

LINEAR_SHAPE = (32, 48)
# A Conv2d with 4 input channels, a 3 x 3 kernel (d_in = 36) and 16 outputs, with a geometry
# that differs in every direction so that the output-size arithmetic is exercised.
CONV = dict(in_channels=4, out_channels=16, kernel_size=3, stride=(2, 1), padding=(1, 2),
            dilation=(1, 2))
CONV_SHAPE = (36, 16)

RESULT_KINDS = ["pruned", "double_sparse", "lowrank", "pifa", "sparse_lowrank"]
LAYER_KINDS = ["linear", "conv1d", "conv2d"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]

MODULE_TYPES = {"pruned": SparseLinear, "double_sparse": DoubleSparseLinear,
                "lowrank": LowRankLinear, "pifa": PifaLinear,
                "sparse_lowrank": SparseLowRankLinear}

COMPRESSION = {
    "pruned": {"method": "sparsegpt", "arguments": {"density": 0.5}, "pattern": "unstructured",
               "density": 0.5},
    "double_sparse": {"method": "dsf", "arguments": {"density": 0.5}, "pattern": None,
                      "density": 0.5},
    "lowrank": {"method": "lowrank", "arguments": {"rank": 8}},
    "pifa": {"method": "pifa", "arguments": {"rank": 8}},
    "sparse_lowrank": {"method": "hassle_free", "arguments": {"rank": 4, "iters": 3},
                       "pattern": "2:4", "density": None},
}




@functools.cache
def problem(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    layer = realistic_layer(*shape, seed=sum(shape))
    return torch.from_numpy(layer.W).float(), torch.from_numpy(layer.H).float()


@functools.cache
def solver_result(kind: str, shape: tuple[int, int]):
    """The real solver's float32 result for the realistic ``shape`` problem (computed once)."""
    W, H = problem(shape)
    if kind == "pruned":
        return mf.sparsegpt_prune(W, H, density=0.5)
    if kind == "double_sparse":
        return mf.double_sparse(W, 0.5, H)
    if kind == "lowrank":
        return mf.weighted_lowrank(W, H, 8)
    if kind == "pifa":
        lowrank = solver_result("lowrank", shape)
        return mf.pifa_from_factors(lowrank.U, lowrank.V)
    return mf.sparse_plus_lowrank(W, H, 4, pattern="2:4", iters=3)


def cast_result(result, dtype: torch.dtype):
    """``result`` with its floating-point tensors cast to ``dtype`` (indices untouched)."""
    if isinstance(result, torch.Tensor):
        return result.to(dtype)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.init}
    return type(result)(**{name: value.to(dtype) if isinstance(value, torch.Tensor)
                           and value.is_floating_point() else value
                           for name, value in fields.items()})


def dense_of(result) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else result.dense()


def reference_matmul(result, x: torch.Tensor) -> torch.Tensor:
    return x @ result if isinstance(result, torch.Tensor) else result.matmul(x)


def n_params_of(result) -> int:
    return int(torch.count_nonzero(result)) if isinstance(result, torch.Tensor) else result.n_params


def original_layer(layer_kind: str, W: torch.Tensor, dtype: torch.dtype, device: str = "cpu",
                   bias: bool = True) -> nn.Module:
    """A dense layer of ``layer_kind`` whose ``(d_in, d_out)`` matrix is ``W``, with a bias."""
    d_in, d_out = W.shape
    generator = torch.Generator().manual_seed(d_in * d_out)
    if layer_kind == "linear":
        layer = nn.Linear(d_in, d_out, bias=bias)
        layer.weight.data = W.T.double().contiguous()
    elif layer_kind == "conv1d":
        layer = Conv1D(d_out, d_in)
        layer.weight.data = W.double().clone()
    else:
        layer = nn.Conv2d(**CONV, bias=bias)
        layer.weight.data = W.T.double().reshape(layer.weight.shape).contiguous()
    if layer.bias is not None:
        layer.bias.data = torch.randn(d_out, generator=generator, dtype=torch.float64)
    return layer.to(device=device, dtype=dtype)


def layer_input(layer_kind: str, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    shape = (2, 4, 9, 11) if layer_kind == "conv2d" else (3, 5, LINEAR_SHAPE[0])
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device,
                                                                            dtype=dtype)


def reference_output(layer_kind: str, result, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ Ŵ + b`` or the convolution by ``Ŵ``, in float64 from the values the module holds
    (the result rounded to the layer's dtype)."""
    dtype = layer.weight.dtype
    result64 = cast_result(cast_result(result, dtype), torch.float64)
    x64 = x.double()
    bias = None if layer.bias is None else layer.bias.detach().double()
    if layer_kind == "conv2d":
        weight = dense_of(result64).T.reshape(layer.weight.shape)
        return F.conv2d(x64, weight, bias, stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation)
    y = reference_matmul(result64, x64)
    return y if bias is None else y + bias


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(y.detach().double() - reference)
                 / torch.linalg.vector_norm(reference))


def tolerance(dtype: torch.dtype) -> float:
    """Norm-wise relative error of a product or two computed in ``dtype``."""
    return 8 * torch.finfo(dtype).eps


def shape_for(layer_kind: str) -> tuple[int, int]:
    return CONV_SHAPE if layer_kind == "conv2d" else LINEAR_SHAPE


def build(result_kind: str, layer_kind: str, dtype: torch.dtype, device: str = "cpu",
          bias: bool = True):
    shape = shape_for(layer_kind)
    result = solver_result(result_kind, shape)
    layer = original_layer(layer_kind, problem(shape)[0], dtype, device, bias)
    return result, layer, compressed_module(layer, result, compression=COMPRESSION[result_kind])


# --------------------------------------------------------------------------- the forward pass


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer_kind", LAYER_KINDS)
@pytest.mark.parametrize("result_kind", RESULT_KINDS)
def test_module_computes_the_result_and_merges_back(result_kind, layer_kind, dtype):
    result, layer, module = build(result_kind, layer_kind, dtype)
    if layer_kind == "conv2d":
        expected = SparseConv2d if result_kind == "pruned" else UnfoldedConv2d
        assert isinstance(module, expected) and isinstance(module, CompressedConv2d)
        if expected is UnfoldedConv2d:
            assert isinstance(module.linear, MODULE_TYPES[result_kind])
            assert (module.in_channels, module.out_channels, module.kernel_size, module.stride,
                    module.padding, module.dilation) == (4, 16, (3, 3), (2, 1), (1, 2), (1, 2))
    else:
        assert isinstance(module, MODULE_TYPES[result_kind])
        assert isinstance(module, CompressedLinear)
        assert (module.in_features, module.out_features) == LINEAR_SHAPE
    assert all(p.dtype == dtype for p in module.parameters())
    assert module.compression == COMPRESSION[result_kind]

    x = layer_input(layer_kind, dtype)
    reference = reference_output(layer_kind, result, layer, x)
    y = module(x)
    assert y.dtype == dtype and y.shape == reference.shape
    assert relative_error(y, reference) <= tolerance(dtype)

    dense = module.to_dense()
    assert type(dense) is (nn.Conv2d if layer_kind == "conv2d" else nn.Linear)
    assert dense.weight.dtype == dtype and torch.equal(dense.bias, layer.bias)
    assert relative_error(dense(x), reference) <= tolerance(dtype)
    assert torch.equal(module.dense_weight(), dense.weight.detach().reshape(dense.weight.shape[0], -1).T)

    assert module.n_params == n_params_of(result)


@pytest.mark.parametrize("result_kind", RESULT_KINDS)
def test_dense_weight_is_the_result_matrix(result_kind):
    result, _, module = build(result_kind, "linear", torch.float32)
    torch.testing.assert_close(module.dense_weight(), dense_of(result), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_kind", ["linear", "conv2d"])
@pytest.mark.parametrize("result_kind", RESULT_KINDS)
def test_module_lives_on_the_layers_device(result_kind, layer_kind, device):
    result, layer, module = build(result_kind, layer_kind, torch.float32, device)
    tensors = list(module.parameters()) + list(module.buffers())
    assert all(t.device == layer.weight.device for t in tensors)
    x = layer_input(layer_kind, torch.float32, device)
    y = module(x)
    assert y.device == x.device
    assert relative_error(y.cpu(), reference_output(layer_kind, result, layer.cpu(), x.cpu())) \
        <= tolerance(torch.float32)
    assert module.to_dense().weight.device == layer.weight.device


@pytest.mark.parametrize("layer_kind", LAYER_KINDS)
@pytest.mark.parametrize("result_kind", RESULT_KINDS)
def test_gradients_reach_the_input_and_not_the_frozen_parameters(result_kind, layer_kind):
    result, layer, module = build(result_kind, layer_kind, torch.float64)
    assert not any(p.requires_grad for p in module.parameters())
    x = layer_input(layer_kind, torch.float64).requires_grad_()
    module(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference_output(layer_kind, result, layer, x_ref).square().sum().backward()
    assert relative_error(x.grad, x_ref.grad) <= tolerance(torch.float64)
    with torch.no_grad():
        assert not module(x).requires_grad


@pytest.mark.parametrize("result_kind", RESULT_KINDS)
def test_layer_without_bias(result_kind):
    result, layer, module = build(result_kind, "linear", torch.float32, bias=False)
    assert module.bias is None and module.to_dense().bias is None
    x = layer_input("linear", torch.float32)
    assert relative_error(module(x), reference_output("linear", result, layer, x)) \
        <= tolerance(torch.float32)


def test_modules_follow_to_and_keep_integer_pivots():
    result, layer, module = build("pifa", "linear", torch.float32)
    module.to(torch.float64)
    assert module.W_p.dtype == torch.float64 and module.pivots.dtype == torch.int64
    x = layer_input("linear", torch.float64)
    assert relative_error(module(x), reference_output("linear", result, layer, x)) \
        <= tolerance(torch.float32)


def test_unfolded_conv_accepts_unbatched_input_and_checks_channels():
    _, _, module = build("lowrank", "conv2d", torch.float32)
    x = layer_input("conv2d", torch.float32)
    torch.testing.assert_close(module(x[0]), module(x)[0])
    with pytest.raises(ValueError, match="expected an"):
        module(x[:, :3])


def test_sparse_modules_record_pattern_and_density():
    _, _, pruned = build("pruned", "linear", torch.float32)
    assert (pruned.pattern, pruned.density) == ("unstructured", 0.5)
    _, _, slr = build("sparse_lowrank", "linear", torch.float32)
    assert (slr.pattern, slr.density) == ("2:4", 0.5)
    _, _, conv = build("pruned", "conv2d", torch.float32)
    assert (conv.pattern, conv.density) == ("unstructured", 0.5)
    _, _, dsf = build("double_sparse", "linear", torch.float32)
    assert dsf.density == 0.5


# --------------------------------------------------------------------------- bad input


def test_factory_rejects_a_result_of_another_shape():
    layer = original_layer("linear", problem(LINEAR_SHAPE)[0], torch.float32)
    with pytest.raises(ValueError, match=r"result has shape \(48, 32\).*\(32, 48\)"):
        compressed_module(layer, solver_result("pruned", LINEAR_SHAPE).T,
                          compression=COMPRESSION["pruned"])


def test_factory_rejects_unknown_results_layers_and_non_torch_arrays():
    layer = original_layer("linear", problem(LINEAR_SHAPE)[0], torch.float32)
    with pytest.raises(TypeError, match="result must be"):
        compressed_module(layer, np.zeros(LINEAR_SHAPE), compression=COMPRESSION["pruned"])
    lowrank = solver_result("lowrank", LINEAR_SHAPE)
    with pytest.raises(TypeError, match=r"result\.U .*numpy"):
        compressed_module(layer, mf.LowRank(lowrank.U.numpy(), lowrank.V.numpy()),
                          compression=COMPRESSION["lowrank"])
    with pytest.raises(TypeError, match="Embedding has no matrix problem"):
        compressed_module(nn.Embedding(10, 4), lowrank, compression=COMPRESSION["lowrank"])
    grouped = nn.Conv2d(4, 16, 3, groups=2)
    with pytest.raises(ValueError, match="grouped convolution"):
        compressed_module(grouped, lowrank, compression=COMPRESSION["lowrank"])


def test_factory_checks_the_sparsity_pattern():
    layer = original_layer("linear", problem(LINEAR_SHAPE)[0], torch.float32)
    pruned = solver_result("pruned", LINEAR_SHAPE)  # unstructured: violates 2:4 somewhere
    with pytest.raises(ValueError, match="SparseLinear: W violates its sparsity pattern '2:4'"):
        compressed_module(layer, pruned, compression={**COMPRESSION["pruned"], "pattern": "2:4",
                                                      "density": None})
    with pytest.raises(ValueError, match="violates its sparsity pattern 'unstructured'"):
        compressed_module(layer, pruned, compression={**COMPRESSION["pruned"], "density": 0.3})
    with pytest.raises(ValueError, match="exceeds the budget"):
        compressed_module(layer, solver_result("double_sparse", LINEAR_SHAPE),
                          compression={**COMPRESSION["double_sparse"], "density": 0.3})


def test_factory_checks_the_compression_record():
    layer = original_layer("linear", problem(LINEAR_SHAPE)[0], torch.float32)
    lowrank = solver_result("lowrank", LINEAR_SHAPE)
    with pytest.raises(TypeError, match="'method' and 'arguments'"):
        compressed_module(layer, lowrank, compression={"method": "lowrank"})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        compressed_module(layer, lowrank, compression={"method": "lowrank",
                                                       "arguments": {"rank": torch.tensor(8)}})


def test_constructors_reject_bad_tensors_by_name():
    U, V = torch.randn(8, 2), torch.randn(6, 2)
    with pytest.raises(ValueError, match="LowRankLinear: V contains NaN or Inf"):
        LowRankLinear(U, V.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="LowRankLinear: V is torch.float64"):
        LowRankLinear(U, V.double())
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        LowRankLinear(U, V, torch.zeros(5))
    with pytest.raises(ValueError, match="must be a 2-D matrix"):
        SparseLinear(torch.zeros(4))
    pifa = solver_result("pifa", LINEAR_SHAPE)
    duplicated = pifa.pivots.clone()
    duplicated[1] = duplicated[0]
    with pytest.raises(ValueError, match="PifaLinear: pivots and non_pivots must together be a "
                                         "permutation of range"):
        PifaLinear(duplicated, pifa.non_pivots, pifa.W_p, pifa.C)
    with pytest.raises(TypeError, match="pivots must be an integer"):
        PifaLinear(pifa.pivots.float(), pifa.non_pivots, pifa.W_p, pifa.C)
    with pytest.raises(TypeError, match="linear must be a CompressedLinear"):
        UnfoldedConv2d(nn.Linear(36, 4), in_channels=4, kernel_size=3)
    with pytest.raises(ValueError, match="in_channels"):
        UnfoldedConv2d(LowRankLinear(torch.randn(36, 2), torch.randn(4, 2)), in_channels=3,
                       kernel_size=3)


# --------------------------------------------------------------------------- replace_module


def test_replace_module_sets_dotted_names_and_list_indices():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleDict({"inner": nn.ModuleList([nn.ReLU(),
                                                                                   nn.Linear(4, 2)])}))
    new = LowRankLinear(torch.randn(4, 1), torch.randn(2, 1))
    old = replace_module(model, "1.inner.1", new)
    assert isinstance(old, nn.Linear) and model[1]["inner"][1] is new
    assert dict(model.named_modules())["1.inner.1"] is new
    for bad in ["1.inner.7", "2", "1.nothing.0", ""]:
        with pytest.raises(ValueError, match="submodule"):
            replace_module(model, bad, new)
    with pytest.raises(TypeError, match="new_module"):
        replace_module(model, "0", torch.zeros(1))
