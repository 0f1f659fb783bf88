"""One optimizer step, shared by every training loop (pretrain, SFT, reward model, DPO, PPO).

    result = train_step(model, optimizer, micro_batches, loss_fn, denominator=n, grad_clip=1.0, guard=guard)

The caller owns the loop (schedule, data, logging, checkpoints); this owns what happens between
two optimizer updates, the same for every job:

    for each micro-batch: loss_fn(mb) -> (sum of its per-item losses, metric sums)
                          backward of sum / denominator              (gradient accumulation)
    mean loss over ranks -> clip the global gradient norm -> NaN / spike check
    -> optimizer step (or skip it, zeroing the gradients) -> StepResult

Normalization: `denominator` is the number of items (target tokens, pairs, ...) the loss is a
mean over, *per data-parallel rank*: the global count divided by the data-parallel size. FSDP
averages gradients over the data-parallel ranks, so the gradient is exactly that of the mean
over every item of the global batch, as one process computing the whole batch at once. Metric
sums from loss_fn are normalized the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from herd.errors import HerdError
from herd.parallel import all_reduce_mean, clip_grad_norm_

LossFn = Callable[[Any], "Tensor | tuple[Tensor, dict[str, Tensor]]"]


@dataclass
class StepResult:
    """What one step did."""

    loss: float
    """Mean loss over the global batch (before the update)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    skipped: str = ""
    """Empty if the optimizer stepped; otherwise why the step was skipped."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The loss function's extra metrics, as means over the global batch."""


class SpikeGuard:
    """Decides whether a step's loss / grad norm is bad: non-finite, or a spike over the running average.

    factor: a loss above factor x the running average (after 10 good steps) is a spike; 0 = off.
    policy: "skip" bad steps, or "stop" at the first; max_skips: stop after this many in a row.
    """

    def __init__(self, factor: float = 0.0, policy: str = "skip", max_skips: int = 5):
        self.factor, self.policy, self.max_skips = factor, policy, max_skips
        self.ema, self.seen, self.consecutive = 0.0, 0, 0

    def check(self, loss: float, gnorm: float) -> str:
        """'' for a good step (and update the average), else the reason the step is bad."""
        reason = ""
        if not math.isfinite(loss):
            reason = f"non-finite loss {loss}"
        elif not math.isfinite(gnorm):
            reason = f"non-finite gradient norm {gnorm}"
        elif self.factor > 0 and self.seen >= 10 and loss > self.factor * self.ema:
            reason = f"loss spike {loss:.4f} > {self.factor} x running average {self.ema:.4f}"
        if reason:
            self.consecutive += 1
            return reason
        self.consecutive = 0
        self.ema = loss if self.seen == 0 else 0.9 * self.ema + 0.1 * loss
        self.seen += 1
        return ""

    def must_stop(self) -> bool:
        """After a bad step: whether the run should end rather than skip it."""
        return self.consecutive > 0 and (self.policy == "stop" or self.consecutive > self.max_skips)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "seen": self.seen, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema, self.seen = float(state.get("ema", 0.0)), int(state.get("seen", 0))
        self.consecutive = int(state.get("consecutive", 0))


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable[Any],
               loss_fn: LossFn, *, denominator: float, grad_clip: float = 1.0,
               guard: SpikeGuard | None = None, oom_hint: str = "") -> StepResult:
    """Accumulate gradients over `micro_batches`, clip, check, and step the optimizer (see module doc).

    loss_fn(mb) returns the *sum* of the per-item losses of one micro-batch (a float32 scalar
    tensor with grad), optionally with a dict of metric sums (tensors) over the same items.
    oom_hint: what to tell the user when a micro-batch does not fit in memory.
    """
    device = next(model.parameters()).device
    loss_acc = torch.zeros((), device=device)
    sums: dict[str, Tensor] = {}
    try:
        for mb in micro_batches:
            out = loss_fn(mb)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            scaled = loss / denominator
            scaled.backward()
            loss_acc += scaled.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / denominator
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        optimizer.zero_grad(set_to_none=True)
        raise HerdError(f"a micro-batch does not fit in {device.type} memory; "
                        f"{oom_hint or 'use smaller micro-batches or shorter sequences'}.") from None
    loss_mean = float(all_reduce_mean(loss_acc))
    metrics_mean = {k: float(all_reduce_mean(torch.as_tensor(v, device=device))) for k, v in sums.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    gnorm = float(clip_grad_norm_(params, grad_clip))
    verdict = guard.check(loss_mean, gnorm) if guard is not None else ""
    if not verdict:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_mean, grad_norm=gnorm, skipped=verdict, metrics=metrics_mean)
