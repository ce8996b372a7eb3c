"""A real vision check: a small CNN trained here on scikit-learn's digits, compressed through the
Conv2d (im2col) path of :func:`matfactor.adapters.compress_model`, keeps its test accuracy.

The CNN (two 3x3 convolutions, a hidden Linear, the classifier) is trained for 5 epochs of Adam
on three quarters of the 1797 digits and reaches 97.56% on the other quarter (450 images, fixed
stratified split). Its two convolutions, (C_in·kh·kw, C_out) = (9, 16) and (144, 32), are
compressed at density 0.5 by a pruner (SparseGPT, giving ``SparseConv2d``) and a factorization
(DSF, giving ``UnfoldedConv2d``), in sequential mode (every child of the ``Sequential`` is a
block) and in one-shot mode (which also compresses the hidden Linear); the classifier is left
alone.

Margin: the compressed model's test accuracy is at most 1 percentage point (4 of the 450 test
images) below the dense model's, and at least 98% of the test predictions are unchanged. At
seed 0 the four cases lose 0.0 to 0.2 points (agreement 99.3% to 100%). Over seeds 0 to 5 (split
and initialisation) their largest loss was 0.7 points and their lowest agreement 98.4%; with the
split fixed and the initialisation varied, 0.9 points. Weaker compressions miss the margin:
Hessian-weighted low rank at the same density loses 1.3 points at seed 0 (one-shot) and up to
15 on other seeds; magnitude pruning loses up to 2.4 points.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from matfactor.adapters import Recipe, Rule, compress_model
from matfactor.adapters.modules import (
    DoubleSparseLinear,
    SparseConv2d,
    SparseLinear,
    UnfoldedConv2d,
)

datasets = pytest.importorskip("sklearn.datasets")
model_selection = pytest.importorskip("sklearn.model_selection")

SEED = 0
EPOCHS = 5
BATCH = 32
DENSITY = 0.5
MARGIN = 0.01             # test accuracy the compressed model may lose: 1 point (module docstring)
MIN_AGREEMENT = 0.98      # fraction of test images whose prediction must not change
CONVS = {"0.0": (9, 16), "1.0": (144, 32)}   # im2col shapes (C_in·kh·kw, C_out)
HIDDEN = {"3": (32 * 4 * 4, 64)}




def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def digits():
    """``(X_train, y_train, X_test, y_test)``: 8x8 images in [0, 1] as (N, 1, 8, 8) tensors."""
    data = datasets.load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    X_train, X_test, y_train, y_test = model_selection.train_test_split(
        images, data.target, test_size=0.25, random_state=SEED, stratify=data.target)
    return (torch.from_numpy(X_train), torch.from_numpy(y_train), torch.from_numpy(X_test),
            torch.from_numpy(y_test))


def predictions(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(X).argmax(dim=1)


@pytest.fixture(scope="module")
def trained(digits):
    """The dense CNN after training, in eval mode, and its test predictions (shared: copy it)."""
    X_train, y_train, X_test, y_test = digits
    torch.manual_seed(SEED)
    model = make_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    order = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        permutation = torch.randperm(len(X_train), generator=order)
        for start in range(0, len(X_train), BATCH):
            batch = permutation[start:start + BATCH]
            loss = nn.functional.cross_entropy(model(X_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    dense = predictions(model, X_test)
    accuracy = (dense == y_test).double().mean().item()
    assert accuracy > 0.95, f"the dense CNN reaches only {accuracy:.2%}: training is broken"
    return model, dense


CASES = [  # (method, sequential, compressed conv type, compressed Linear type in one-shot mode)
    ("sparsegpt", True, SparseConv2d, None),
    ("sparsegpt", False, SparseConv2d, SparseLinear),
    ("dsf", True, UnfoldedConv2d, None),
    ("dsf", False, UnfoldedConv2d, DoubleSparseLinear),
]


@pytest.mark.parametrize("method, sequential, conv_type, linear_type", CASES,
                         ids=[f"{m}-{'sequential' if s else 'one-shot'}" for m, s, _, _ in CASES])
def test_compressed_cnn_keeps_its_accuracy(trained, digits, method, sequential, conv_type,
                                           linear_type):
    dense_model, dense = trained
    X_train, _, X_test, y_test = digits
    model = copy.deepcopy(dense_model)
    calibration = [X_train[start:start + 256] for start in range(0, len(X_train), 256)]
    # Sequential mode compresses layers inside blocks only, and the hidden Linear is a block of
    # its own here (a direct child): one-shot mode compresses it too.
    layers = CONVS if sequential else {**CONVS, **HIDDEN}
    recipe = Recipe([Rule(method, targets=list(layers), density=DENSITY)], ignore=["5"])
    if sequential:
        report = compress_model(model, calibration, recipe, blocks=list(model.children()),
                                progress=False)
    else:
        report = compress_model(model, calibration, recipe, sequential=False, blocks=None,
                                progress=False)

    assert report.mode == ("sequential" if sequential else "one-shot")
    assert {layer.name: layer.shape for layer in report.layers} == layers
    for layer in report.layers:
        assert layer.method == method
        assert layer.params_after <= math.floor(DENSITY * layer.params_before)
        # every conv output position is a calibration row: 64 per 8x8 image (padding 1, stride 1)
        rows = len(X_train) * (64 if layer.name in CONVS else 1)
        assert layer.n_samples == rows
        assert 0 <= layer.rel_error < 0.2
    for name in CONVS:
        assert type(model.get_submodule(name)) is conv_type
    assert type(model.get_submodule("3")) is (linear_type or nn.Linear)
    assert type(model.get_submodule("5")) is nn.Linear
    assert torch.equal(model[5].weight, dense_model[5].weight)

    compressed = predictions(model, X_test)
    dense_accuracy = (dense == y_test).double().mean().item()
    accuracy = (compressed == y_test).double().mean().item()
    agreement = (compressed == dense).double().mean().item()
    summary = (f"{method} ({report.mode}) at density {DENSITY}: test accuracy {accuracy:.2%} against "
               f"{dense_accuracy:.2%} dense, {agreement:.2%} of the predictions unchanged")
    assert accuracy >= dense_accuracy - MARGIN, summary
    assert agreement >= MIN_AGREEMENT, summary
