"""The ``matfactor`` command on a tiny Hugging Face model saved in the test."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from text_models import WORDS, save_tiny_bert, write_texts

from matfactor.__main__ import main

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
    (["compress", "--method", "svd", "--out", "x"], "invalid choice: 'svd'"),
    (["compress", "--samples", "0", "--out", "x"], "argument --samples: expected a positive integer"),
    (["compress", "--mix", "1.5", "--out", "x"], r"argument --mix: expected a number in \[0, 1\]"),
    (["compress", "--model", "/no/such/dir", "--out", "x"], "no such directory"),
    (["compress", "--calibration", "/no/such.txt", "--out", "x"], "no such file"),
    (["compress", "--device", "gpu7", "--out", "x"], "not a torch device"),
    (["compress", "--workers", "0", "--out", "x"], "argument --workers: expected a positive integer"),
    (["compress", "--threads", "two", "--out", "x"], "argument --threads: expected a positive integer"),
    (["compress", "--executor", "spark", "--out", "x"], "argument --executor: invalid choice: 'spark'"),
    (["compress", "--memory-limit", "lots", "--out", "x"], "argument --memory-limit: expected a size"),
    (["compress", "--memory-limit", "0GB", "--out", "x"], "argument --memory-limit: expected a size"),
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
        assert "{compress,evaluate,plan}" in result.stdout


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
