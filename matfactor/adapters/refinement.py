"""Block refinement: a compressed block's stored values optimised to match the dense model.

The layer solves each minimise one layer's output error on its calibration inputs; the errors
of a block's layers then add up through its nonlinearities, and those of earlier blocks reach
its inputs. Block-level reconstruction, the second step of today's compression pipelines
("transformer matching" in 3BASiL, the regional optimisation of Wanda++, "A Free Lunch in LLM
Compression", 2025), goes on from the layer solves: with the supports, patterns and ranks the
solves chose held fixed, the values the block stores (:class:`~matfactor.adapters.modules.
SparseParameter` values, dense factors, biases) are optimised by Adam so that the compressed
block, fed its calibration inputs, gives the dense model's outputs of that block:

.. math::

    \\min_{\\theta} \\; \\frac{\\sum_b \\lVert f_\\theta(\\tilde x_b) - f(x_b) \\rVert^2}
    {\\sum_b \\lVert f(x_b) \\rVert^2}

where :math:`\\tilde x_b` are the block's inputs in the compressed model (sequential mode) or
the dense model's (one-shot mode), :math:`f(x_b)` the dense block's outputs on the dense
model's inputs, and the sums run over the real tokens of calibration batch :math:`b` (padding
excluded). Matching the dense *model* rather than the dense block on the compressed inputs lets
the refinement also correct the error that reaches the block from before it. ``loss="cosine"``
minimises the mean of :math:`1 - \\cos` between each token's output and target instead.

A step is one Adam update on one calibration batch (the batches taken in a seeded random order,
every batch once before any twice), with the learning rate decaying along a cosine to zero. The
refined values are kept only if they lower the loss over all the calibration batches; otherwise
(a learning rate too large for the block, a loss that is not finite) the solved values are
restored and the report says so.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from matfactor import _validation as check

from .modules import CompressedModule

__all__ = ["Refinement", "RefinementReport", "refine_block", "stored_parameters"]

LOSSES = ("mse", "cosine")


@dataclass(frozen=True)
class Refinement:
    """How a block is refined after its layers are solved (see the module docstring).

    Parameters
    ----------
    steps
        Adam steps per block, each on one calibration batch; ``0`` (default): no refinement, the
        pipeline is exactly the one without it.
    lr
        Adam's peak learning rate relative to each tensor's scale (decayed along a cosine to
        zero over ``steps``): a tensor whose values have root mean square ``s`` (a sparse part's
        kept values, a factor, a bias) gets the learning rate ``lr · s``, so that one step moves
        each value by about ``lr`` of the tensor's typical size whatever its scale (the two
        factors of a DSF or low-rank layer may differ in scale by orders of magnitude). Default
        ``0.01``.
    loss
        ``"mse"`` (default): the squared error of the block's outputs relative to the dense
        outputs' squared norm, over the real tokens; ``"cosine"``: the mean ``1 − cos`` between
        each token's output and its dense output.
    """

    steps: int = 0
    lr: float = 1e-2
    loss: str = "mse"

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check.integer("steps", self.steps, minimum=0))
        object.__setattr__(self, "lr", check.real("lr", self.lr, minimum=0.0, low_open=True))
        object.__setattr__(self, "loss", check.choice("loss", self.loss, LOSSES))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "refine") -> Refinement:
        """From plain data ``{"steps": ..., "lr": ..., "loss": ...}`` (each optional)."""
        if not isinstance(data, dict) or not set(data) <= {"steps", "lr", "loss"}:
            raise ValueError(f"{source} must be a mapping with some of 'steps', 'lr' and 'loss', "
                             f"got {data!r}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """The refinement as plain data (round-trips through :meth:`from_dict`)."""
        return {"steps": self.steps, "lr": self.lr, "loss": self.loss}


@dataclass(frozen=True)
class RefinementReport:
    """What refining one block did.

    Attributes
    ----------
    block
        The block's name.
    steps
        Adam steps taken.
    loss_before, loss_after
        The loss over all calibration batches with the solved values, and with the refined
        ones (``loss_after`` is what the block keeps: equal to ``loss_before`` when not kept).
    kept
        Whether the refined values were kept (they lowered the loss).
    seconds
        Wall time of the refinement, evaluations included.
    """

    block: str
    steps: int
    loss_before: float
    loss_after: float
    kept: bool
    seconds: float


def stored_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of every compressed module inside ``module`` (``module`` itself included):
    the kept values of the sparse parts, the dense factors, the biases; each once."""
    found: dict[int, nn.Parameter] = {}
    for child in module.modules():
        if isinstance(child, CompressedModule):
            for parameter in child.parameters():
                found.setdefault(id(parameter), parameter)
    return list(found.values())


@contextlib.contextmanager
def _training(block: nn.Module, trainable: list[nn.Parameter]) -> Iterator[None]:
    """``trainable`` requiring grad and every other parameter of ``block`` not (so that no
    gradient lands in the model's own ``.grad``), restored afterwards."""
    flags = {id(p): (p, p.requires_grad) for p in block.parameters()}
    chosen = {id(p) for p in trainable}
    try:
        for parameter, _ in flags.values():
            parameter.requires_grad_(id(parameter) in chosen)
        with torch.enable_grad():
            yield
    finally:
        for parameter, flag in flags.values():
            parameter.requires_grad_(flag)
            parameter.grad = None


def _loss(output: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None,
          kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(numerator, denominator)`` of one batch's loss, summed over its real tokens (the
    denominator: the target's squared norm for ``"mse"``, the token count for ``"cosine"``)."""
    output, target = output.float(), target.to(device=output.device, dtype=torch.float32)
    if token_mask is not None and token_mask.shape == output.shape[:token_mask.ndim]:
        keep = token_mask.to(output.device)
        output, target = output[keep], target[keep]
    if kind == "cosine":
        features = output.reshape(-1, output.shape[-1]), target.reshape(-1, target.shape[-1])
        cosine = torch.nn.functional.cosine_similarity(*features, dim=-1)
        return (1 - cosine).sum(), torch.tensor(float(cosine.numel()), device=output.device)
    return (output - target).square().sum(), target.square().sum()


def _total_loss(run: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor],
                token_masks: Sequence[torch.Tensor | None], kind: str) -> float:
    with torch.no_grad():
        parts = [_loss(run(index), targets[index], token_masks[index], kind)
                 for index in range(len(targets))]
    denominator = float(sum(float(d) for _, d in parts))
    return float(sum(float(n) for n, _ in parts)) / denominator if denominator > 0 else 0.0


def refine_block(block: nn.Module, run: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor],
                 token_masks: Sequence[torch.Tensor | None], refinement: Refinement, *, name: str,
                 seed: int = 0) -> RefinementReport:
    """Optimise the stored values of ``block``'s compressed modules (in place) so that its
    outputs match ``targets``.

    Parameters
    ----------
    block
        The block whose layers are compressed (its other parameters are left alone).
    run
        ``run(b)``: the block's output for calibration batch ``b`` (it calls ``block``).
    targets
        The dense model's output of the block for each batch.
    token_masks
        Each batch's real tokens (``(batch, seq)`` booleans) or ``None`` (every position).
    refinement
        Steps, learning rate and loss (:class:`Refinement`), ``steps > 0``.
    name
        The block's name, for the report.
    seed
        Seed of the order in which batches are taken.

    Returns
    -------
    RefinementReport
    """
    if len(targets) != len(token_masks) or not targets:
        raise ValueError(f"refine_block needs one token mask per target and at least one target, "
                         f"got {len(targets)} targets and {len(token_masks)} masks")
    start = time.perf_counter()
    trainable = stored_parameters(block)
    before = _total_loss(run, targets, token_masks, refinement.loss)
    if not trainable or refinement.steps == 0:
        return RefinementReport(name, 0, before, before, False, time.perf_counter() - start)
    solved = [p.detach().clone() for p in trainable]
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    with _training(block, trainable):
        # one group a tensor: its learning rate relative to its own scale (see Refinement.lr)
        groups = [{"params": [p], "lr": refinement.lr * float(p.detach().float().square().mean().sqrt())}
                  for p in trainable if p.numel()]
        optimizer = torch.optim.Adam(groups, lr=refinement.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / refinement.steps)))
        for _ in range(refinement.steps):
            if not order:
                order = torch.randperm(len(targets), generator=generator).tolist()
            index = order.pop()
            numerator, denominator = _loss(run(index), targets[index], token_masks[index],
                                           refinement.loss)
            optimizer.zero_grad(set_to_none=True)
            (numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny)).backward()
            optimizer.step()
            schedule.step()
    after = _total_loss(run, targets, token_masks, refinement.loss)
    kept = math.isfinite(after) and after < before
    if not kept:
        with torch.no_grad():
            for parameter, value in zip(trainable, solved):
                parameter.copy_(value)
        after = before
    return RefinementReport(name, refinement.steps, before, after, kept, time.perf_counter() - start)
