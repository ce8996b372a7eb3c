"""The ``matfactor`` command on a tiny Hugging Face model saved in the test."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from text_models import WORDS, save_tiny_bert, save_tiny_causal_lm, tiny_causal_lm, write_texts

from matfactor.adapters.command import main
from matfactor.adapters import load_compressed

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-block BERT with its WordPiece tokenizer, saved as a Hugging Face model directory."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def test_compress_then_evaluate(tiny_model_dir, tmp_path, capsys):
    calibration = write_texts(tmp_path / "calibration.txt", 48, seed=1)
    held_out = write_texts(tmp_path / "held_out.txt", 20, seed=2)
    out = tmp_path / "compressed"
    main(["compress", "--model", str(tiny_model_dir), "--method", "sparsegpt", "--density", "0.5",
          "--calibration", str(calibration), "--texts", str(held_out), "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "48 calibration texts" in printed
    assert "12 layers (sequential, 2 blocks" in printed
    assert "encoder.layer.1.output.dense" in printed
    assert "saved model: embedding cosine to the dense model on 20 held-out texts" in printed
    manifest = json.loads((out / "matfactor.json").read_text())
    assert len(manifest["modules"]) == 12
    assert all(entry["compression"]["method"] == "sparsegpt" for entry in manifest["modules"].values())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("the value")["input_ids"][1:3] == [5, WORDS.index("value") + 5]

    main(["evaluate", "--model", str(tiny_model_dir), "--compressed", str(out), "--texts", str(held_out)])
    line = capsys.readouterr().out.strip()
    mean = float(line.split("mean ")[1].split(",")[0])
    assert line.startswith("embedding cosine to the dense model on 20 held-out texts") and 0.5 < mean <= 1


def test_recipe_file_and_one_shot(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rules:\n  - {targets: ['*.attention.*'], method: wanda, pattern: '2:4'}\n"
                      "  - {method: pifa, density: 0.5}\n")
    calibration = write_texts(tmp_path / "calibration.txt", 32, seed=3)
    main(["compress", "--model", str(tiny_model_dir), "--recipe", str(recipe), "--one-shot",
          "--calibration", str(calibration), "--no-evaluate", "--quiet", "--workers", "1",
          "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "one-shot" in printed and "wanda" in printed and "pifa" in printed
    assert "embedding cosine" not in printed


@pytest.mark.parametrize("arguments, message", [
    (["compress"], "the following arguments are required: --out"),
    (["compress", "--density", "0", "--out", "x"], r"argument --density: expected a number in \(0, 1\]"),
    (["compress", "--density", "half", "--out", "x"], "argument --density"),
    (["compress", "--density", "0.5", "--rank", "4", "--out", "x"], "not allowed with argument"),
    (["compress", "--method", "svd", "--out", "x"],
     r"argument --method: unknown method 'svd' \(choose from magnitude, wanda"),
    (["compress", "--method", "dfs", "--out", "x"], "unknown method 'dfs'; did you mean 'dsf'"),
    (["compress", "--method", "sparse_gpt", "--out", "x"], "did you mean 'sparsegpt'"),
    (["plan", "--method", "admn"], "did you mean 'admm'"),
    (["compres", "--out", "x"], "invalid choice: 'compres'"),
    (["compress", "--samples", "0", "--out", "x"], "argument --samples: expected a positive integer"),
    (["compress", "--mix", "1.5", "--out", "x"], r"argument --mix: expected a number in \[0, 1\]"),
    (["compress", "--model", "/no/such/dir", "--out", "x"],
     r"model '/no/such/dir' is not a directory, a .gguf file nor a built-in model \(minilm, smollm2\)"),
    (["compress", "--kind", "seq2seq", "--out", "x"], "argument --kind: invalid choice"),
    (["compress", "--seq-len", "0", "--out", "x"], "argument --seq-len: expected a positive integer"),
    (["compress", "--dtype", "int8", "--out", "x"], "argument --dtype: invalid choice"),
    (["compress", "--calibration", "/no/such.txt", "--out", "x"], "no such file"),
    (["compress", "--device", "gpu7", "--out", "x"], "not a torch device"),
    (["compress", "--workers", "0", "--out", "x"], "argument --workers: expected a positive integer"),
    (["compress", "--threads", "two", "--out", "x"], "argument --threads: expected a positive integer"),
    (["compress", "--executor", "spark", "--out", "x"], "argument --executor: invalid choice: 'spark'"),
    (["compress", "--memory-limit", "lots", "--out", "x"], "argument --memory-limit: expected a size"),
    (["compress", "--memory-limit", "0GB", "--out", "x"], "argument --memory-limit: expected a size"),
    (["compress", "--refine-steps", "0", "--out", "x"],
     "argument --refine-steps: expected a positive integer"),
    (["compress", "--refine-lr", "1e-3", "--out", "x"],
     "--refine-lr and --refine-loss need --refine-steps"),
    (["compress", "--refine-steps", "8", "--refine-lr", "0", "--out", "x"],
     r"--refine-lr: lr must be a real number > 0, got 0"),
    (["compress", "--refine-steps", "8", "--refine-loss", "l1", "--out", "x"], "argument --refine-loss"),
    (["compress", "--recipe", __file__, "--refine-steps", "8", "--out", "x"],
     "--recipe cannot be combined with --refine-steps"),
    (["evaluate"], "the following arguments are required: --compressed"),
    ([], "the following arguments are required"),
])
def test_bad_arguments_are_argparse_errors(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert re.search(message, " ".join(capsys.readouterr().err.split()))


def test_library_errors_are_reported_not_raised(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"method": "dsf"}')
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--model", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "needs a density" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", "--recipe", str(recipe), "--method", "dsf", "--out", str(tmp_path)])
    assert "--recipe cannot be combined with --method" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(tiny_model_dir), "--compressed", str(empty)])
    assert "matfactor: error:" in capsys.readouterr().err


def test_console_script_and_module_agree():
    for command in (["matfactor", "--help"], [sys.executable, "-m", "matfactor", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        assert "{compress,evaluate,export,plan}" in result.stdout


def test_plan_reports_every_method_and_what_does_not_fit(tiny_model_dir, capsys):
    main(["plan", "--model", str(tiny_model_dir), "--workers", "2"])
    printed = capsys.readouterr().out
    for method in ("magnitude", "dsf", "mpifa", "sparse_lowrank"):
        assert f"{method} at density 0.5: memory plan on cpu" in printed
    assert "shared by 2 concurrent solves): fits" in printed and "does not fit" not in printed
    main(["plan", "--model", str(tiny_model_dir), "--method", "dsf"])  # the workers of compress
    from matfactor.adapters.executors import usable_cpus

    cpus = usable_cpus()
    assert (f"shared by {cpus} concurrent solves" in capsys.readouterr().out) == (cpus > 1)
    main(["plan", "--model", str(tiny_model_dir), "--method", "dsf", "--memory-limit", "1MiB"])
    printed = capsys.readouterr().out
    assert "(memory_limit): does NOT fit" in printed
    assert "does not fit: dsf: layer 'encoder.layer.0.intermediate.dense'" in printed \
        or "does not fit: dsf: layer 'encoder.layer.0.output.dense'" in printed


def test_version_needs_no_subcommand(capsys):
    from matfactor import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"matfactor {__version__}"
    result = subprocess.run(["matfactor", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"matfactor {__version__}"
    result = subprocess.run(["matfactor", "frobnicate"], check=False, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("usage: matfactor")


def test_cheap_checks_come_before_the_model_loads(tmp_path, capsys):
    """A bad calibration file, held-out file or output directory is refused before any model is
    loaded: here the model directory holds a config but no weights, so loading it would fail."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    (model / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    texts = write_texts(tmp_path / "texts.txt", 4, seed=0)
    occupied = tmp_path / "a-file"
    occupied.write_text("")
    cases = [
        (["--calibration", str(empty)], "has no non-empty line"),
        (["--calibration", str(texts), "--texts", str(empty)], "has no non-empty line"),
        (["--out", str(occupied)], "exists and is not a directory"),
        (["--out", str(occupied / "below")], "is not a writable directory"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["compress", "--model", str(model), "--out", str(tmp_path / "out"), *extra])
        assert exit_info.value.code == 2
        error = " ".join(capsys.readouterr().err.split())
        assert message in error, error
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["compress", "--model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "has no config.json" in capsys.readouterr().err


def test_quiet_prints_only_the_results(tiny_model_dir, tmp_path):
    """--quiet: no progress bars, plan or transformers messages on either stream; without it,
    progress for the layers and for both models' evaluation passes."""
    calibration = write_texts(tmp_path / "calibration.txt", 24, seed=1)
    held_out = write_texts(tmp_path / "held_out.txt", 8, seed=2)
    command = ["matfactor", "compress", "--model", str(tiny_model_dir), "--method", "wanda",
               "--calibration", str(calibration), "--texts", str(held_out), "--workers", "1"]
    quiet = subprocess.run([*command, "--quiet", "--out", str(tmp_path / "quiet")],
                           capture_output=True, text=True, check=True)
    assert quiet.stderr == ""
    assert "memory plan" not in quiet.stdout and "%|" not in quiet.stdout
    assert "saved model: embedding cosine" in quiet.stdout
    loud = subprocess.run([*command, "--out", str(tmp_path / "loud")], capture_output=True, text=True,
                          check=True)
    assert "memory plan" in loud.stdout
    for bar in ("layers:", "dense model:", "compressed model:"):
        assert bar in loud.stderr, loud.stderr[-2000:]
    evaluate = subprocess.run(["matfactor", "evaluate", "--model", str(tiny_model_dir), "--compressed",
                               str(tmp_path / "quiet"), "--texts", str(held_out)],
                              capture_output=True, text=True, check=True)
    assert "dense model:" in evaluate.stderr and "compressed model:" in evaluate.stderr


def test_export_writes_what_transformers_loads(tiny_model_dir, tmp_path):
    calibration = write_texts(tmp_path / "calibration.txt", 24, seed=1)
    out, dense = tmp_path / "compressed", tmp_path / "dense"
    main(["compress", "--model", str(tiny_model_dir), "--method", "sparsegpt", "--calibration",
          str(calibration), "--no-evaluate", "--quiet", "--workers", "1", "--out", str(out)])
    main(["export", "--compressed", str(out), "--out", str(dense)])
    from matfactor.adapters import load_compressed

    ids = transformers.AutoTokenizer.from_pretrained(dense)(["the value of a list"], return_tensors="pt")
    with torch.no_grad():
        expected = load_compressed(out)(**ids).last_hidden_state
        actual = transformers.AutoModel.from_pretrained(dense)(**ids).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ causal language models


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A 2-block Llama causal LM with a word-level tokenizer, saved as a model directory."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), "llama")


def test_causal_lm_compress_reports_perplexity_and_generates(tiny_llama_dir, tmp_path, capsys):
    calibration = write_texts(tmp_path / "calibration.txt", 120, seed=1)
    held_out = write_texts(tmp_path / "held_out.txt", 60, seed=2)
    out = tmp_path / "compressed"
    main(["compress", "--model", str(tiny_llama_dir), "--method", "sparsegpt", "--calibration",
          str(calibration), "--texts", str(held_out), "--seq-len", "32", "--samples", "12",
          "--eval-windows", "5", "--prompt", "the value of", "--quiet", "--out", str(out),
          "--dense", str(tmp_path / "dense")])
    printed = capsys.readouterr().out
    assert "(LlamaForCausalLM, torch.float32); 12 calibration windows of 32 tokens, 384 tokens" in printed
    assert "14 layers (sequential, 2 blocks" in printed  # q, k, v, o, gate, up, down per block
    assert re.search(r"dense model: perplexity [\d.]+ on 5 windows of 32 tokens \(155 tokens predicted\)",
                     printed)
    assert re.search(r"saved model: perplexity [\d.]+ on 5 windows .* x the dense model's\)", printed)
    assert re.search(r"sample, saved model: 'the value of \w+", printed)
    assert (out / "generation_config.json").is_file()
    manifest = json.loads((out / "matfactor.json").read_text())
    assert manifest["model_class"] == "LlamaForCausalLM" and len(manifest["modules"]) == 14
    assert manifest["source"] == str(tiny_llama_dir.resolve())
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    compressed = load_compressed(out)
    prompt = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(plain(prompt).logits, compressed(prompt).logits, rtol=1e-4, atol=1e-5)

    # evaluate finds the dense model from the checkpoint, and reports the same numbers
    main(["evaluate", "--compressed", str(out), "--texts", str(held_out), "--seq-len", "32",
          "--eval-windows", "5", "--prompt", "the value of", "--quiet"])
    evaluated = capsys.readouterr().out
    for line in evaluated.splitlines():
        assert line in printed.splitlines(), line


def test_causal_lm_bad_input_is_refused_before_any_work(tiny_llama_dir, tmp_path, capsys):
    """Truncated or foreign .gguf files, a directory without a tokenizer, held-out text shorter
    than one window, a window longer than the model's context: each a one-line error, and
    nothing written in --out."""
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(100))
    foreign = tmp_path / "other.gguf"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    untokenized = tmp_path / "no-tokenizer"
    tiny_causal_lm("llama").save_pretrained(untokenized)
    short = tmp_path / "short.txt"
    short.write_text("the value of a list\n")
    out = tmp_path / "out"
    cases = [
        (["--model", str(gguf_file)], r"model\.gguf' is a truncated or damaged GGUF file"),
        (["--model", str(foreign)], r"other\.gguf' is not a GGUF file \(it starts with b'PK"),
        (["--model", str(untokenized)], r"no-tokenizer' has no tokenizer \(none of tokenizer\.json"),
        (["--model", str(tiny_llama_dir), "--texts", str(short), "--seq-len", "16"],
         "the held-out text has 5 tokens, fewer than one window of --seq-len 16"),
        (["--model", str(tiny_llama_dir), "--seq-len", "1000"],
         "--seq-len: seq_len 1000 is longer than the model's context of 128 tokens"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["compress", *extra, "--quiet", "--out", str(out)])
        assert exit_info.value.code == 2
        error = " ".join(capsys.readouterr().err.split())
        assert re.search(message, error), error
        assert not out.exists()


def test_dtype_loads_and_keeps_the_weights_in_it(tiny_llama_dir, tmp_path, capsys):
    calibration = write_texts(tmp_path / "calibration.txt", 60, seed=1)
    out = tmp_path / "bf16"
    main(["compress", "--model", str(tiny_llama_dir), "--dtype", "bfloat16", "--method", "wanda",
          "--calibration", str(calibration), "--seq-len", "16", "--samples", "4", "--no-evaluate",
          "--quiet", "--out", str(out)])
    assert "(LlamaForCausalLM, torch.bfloat16)" in capsys.readouterr().out
    manifest = json.loads((out / "matfactor.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    assert {entry["dtype"] for entry in manifest["modules"].values()} == {"bfloat16"}
