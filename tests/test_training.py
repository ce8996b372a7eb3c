"""Training compressed modules keeps their structure: after any number of optimiser steps, with
any optimiser (even one whose update mixes every entry of a matrix), under autocast, gradient
accumulation, gradient checkpointing and the Hugging Face Trainer, every module's support, pattern
and stored count are what the solver produced; training lowers the loss; a trained model saves
and reloads bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import matfactor as mf
from matfactor.testing import realistic_layer

transformers = pytest.importorskip("transformers")

from matfactor.adapters import (  # noqa: E402
    CompressedModule,
    Recipe,
    SparseParameter,
    compress_model,
    compressed_module,
    load_compressed,
    save_compressed,
)
from text_models import CAUSAL_CONFIGS  # noqa: E402

SHAPE = (48, 64)


def _problem():
    layer = realistic_layer(*SHAPE, seed=3)
    return torch.asarray(layer.W, dtype=torch.float32), torch.asarray(layer.H, dtype=torch.float32)


def _result(kind: str):
    W, H = _problem()
    if kind == "unstructured":
        return mf.sparsegpt_prune(W, H, density=0.5), {"pattern": "unstructured", "density": 0.5}
    if kind == "2:4":
        return mf.sparsegpt_prune(W, H, pattern="2:4"), {"pattern": "2:4", "density": None}
    if kind == "dsf":
        return mf.double_sparse(W, 0.4, H), {"pattern": None, "density": 0.4}
    if kind == "lowrank":
        return mf.weighted_lowrank(W, H, 8), {}
    if kind == "pifa":
        lowrank = mf.weighted_lowrank(W, H, 8)
        return mf.pifa_from_factors(lowrank.U, lowrank.V), {}
    return mf.sparse_plus_lowrank(W, H, 4, pattern="2:4", iters=3), {"pattern": "2:4", "density": None}


KINDS = ["unstructured", "2:4", "dsf", "lowrank", "pifa", "sparse_lowrank"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


def _module(kind: str) -> CompressedModule:
    result, sparsity = _result(kind)
    layer = nn.Linear(*SHAPE)
    return compressed_module(layer, result, compression={"method": kind, "arguments": {}, **sparsity})


def _sparse_parts(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every sparse matrix of the modules in ``module``, by ``<module>.<attribute>``."""
    parts = {}
    for name, child in module.named_modules():
        for attribute in {a for cls in type(child).__mro__ for a, v in vars(cls).items()
                          if isinstance(v, SparseParameter)}:
            parts[f"{name}.{attribute}"] = getattr(child, attribute).detach().clone()
    assert not isinstance(module, CompressedModule) or parts or not module.packed
    return parts


def _structure(module: nn.Module) -> dict[str, object]:
    """What training must not change: the masks, the stored counts, the shapes."""
    return {key: (value.dtype, tuple(value.shape), value.clone() if value.dtype == torch.bool else None)
            for key, value in module.state_dict().items()} | {
        f"{name}.n_params": child.n_params for name, child in module.named_modules()
        if isinstance(child, CompressedModule)}


def _same_structure(before: dict, after: dict) -> bool:
    return before.keys() == after.keys() and all(
        (b[:2] == a[:2] and (b[2] is None or torch.equal(b[2], a[2]))) if isinstance(b, tuple) else b == a
        for b, a in zip(before.values(), after.values()))


class Mixing(torch.optim.Optimizer):
    """An optimiser whose update of a matrix mixes all its entries (as Shampoo's or SOAP's
    preconditioners do): a gradient step plus ``noise`` times a dense random matrix."""

    def __init__(self, params, lr=1e-3, noise=1e-2):
        super().__init__(params, {"lr": lr, "noise": noise})
        self.generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
                    p.add_(torch.randn(p.shape, generator=self.generator).to(p.dtype), alpha=group["noise"])


OPTIMISERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.5),
    "mixing": lambda params: Mixing(params),
}


def _teacher_batches(count: int = 8, seed: int = 0):
    W, _ = _problem()
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(SHAPE, generator=generator) * 0.1 + W
    xs = [torch.randn(16, SHAPE[0], generator=generator) for _ in range(count)]
    return [(x, x @ teacher) for x in xs]


@pytest.mark.parametrize("optimiser", sorted(OPTIMISERS))
@pytest.mark.parametrize("kind", KINDS)
def test_any_optimiser_keeps_supports_patterns_and_counts(kind, optimiser):
    module = _module(kind).requires_grad_()
    structure, parts = _structure(module), _sparse_parts(module)
    step = OPTIMISERS[optimiser](module.parameters())
    for x, y in _teacher_batches() * 3:
        step.zero_grad()
        (module(x) - y).square().mean().backward()
        step.step()
    assert _same_structure(structure, _structure(module))
    for key, trained in _sparse_parts(module).items():
        assert not bool((trained != 0)[parts[key] == 0].any()), f"{key}: a zero became nonzero"
        assert not torch.equal(trained, parts[key]), f"{key}: its values were not trained"
    if "pattern" in module.compression and module.compression["pattern"] not in (None, "unstructured"):
        pattern = mf.parse_pattern(module.compression["pattern"])
        assert mf.mask_satisfies(module.weight.detach().T != 0, None, pattern, exact=False)
    density = module.compression.get("density")
    if density is not None:
        assert module.n_params <= mf.nnz_budget(SHAPE, density, "unstructured")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss_with_accumulation_and_autocast(kind, device):
    module = _module(kind).to(device).requires_grad_()
    batches = [(x.to(device), y.to(device)) for x, y in _teacher_batches()]
    structure = _structure(module)

    def loss() -> float:
        with torch.no_grad():
            return sum(float((module(x) - y).square().mean()) for x, y in batches)

    before = loss()
    optimiser = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in range(10):
        optimiser.zero_grad()
        for x, y in batches:  # one step per pass: gradients accumulated over the batches
            with torch.autocast(device, dtype=torch.bfloat16):
                output = module(x)
            ((output.float() - y).square().mean() / len(batches)).backward()
        optimiser.step()
    assert loss() < before
    assert _same_structure(structure, _structure(module))
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_only_the_stored_values_are_parameters():
    module = _module("dsf")
    names = {name for name, _ in module.named_parameters()}
    assert names == {"A_values", "B_values", "bias"}
    assert module.A_values.numel() + module.B_values.numel() == module.n_params
    assert module.A_mask.dtype == torch.bool and tuple(module.A_mask.shape) == tuple(module.A.shape)
    with pytest.raises(AttributeError, match="A is made from A_values and A_mask"):
        module.A = torch.zeros_like(module.A)


def _tiny_llama(seed: int = 0):
    name, options = CAUSAL_CONFIGS["llama"]
    torch.manual_seed(seed)
    config = getattr(transformers, name)(vocab_size=64, **options)
    return transformers.LlamaForCausalLM(config).eval()


def _token_batches(count: int = 4, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (4, 24), generator=generator),
             "attention_mask": torch.ones(4, 24, dtype=torch.long)} for _ in range(count)]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("recipe", [Recipe.single("dsf", density=0.5),
                                    Recipe.single("sparsegpt", pattern="2:4")],
                         ids=["dsf", "sparsegpt-2:4"])
def test_hugging_face_trainer_with_gradient_checkpointing_keeps_the_structure(tmp_path, recipe):
    model = _tiny_llama()
    compress_model(model, _token_batches(), recipe, progress=False)
    model.requires_grad_()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    structure, parts = _structure(model), _sparse_parts(model)
    assert len(parts) == (14 if recipe.rules[0].method == "sparsegpt" else 28)  # 2 blocks of 7 layers
    data = [{"input_ids": row["input_ids"][i], "attention_mask": row["attention_mask"][i],
             "labels": row["input_ids"][i]} for row in _token_batches(8, seed=2) for i in range(4)]

    def loss() -> float:
        with torch.no_grad():
            batch = {key: torch.stack([item[key] for item in data]) for key in data[0]}
            return float(model.eval()(**batch).loss)

    before = loss()
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4,
        gradient_accumulation_steps=2, num_train_epochs=3, learning_rate=3e-3, weight_decay=0.1,
        gradient_checkpointing=True, logging_strategy="no", save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    transformers.Trainer(model=model.train(), args=arguments, train_dataset=data).train()
    assert loss() < before
    assert _same_structure(structure, _structure(model))
    for key, trained in _sparse_parts(model).items():
        assert not bool((trained != 0)[parts[key] == 0].any()), f"{key}: a zero became nonzero"

    save_compressed(model, tmp_path / "trained")
    loaded = load_compressed(tmp_path / "trained")
    expected = model.state_dict()
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in state.items())
    ids = torch.arange(20).reshape(1, 20)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)
