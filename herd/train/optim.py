"""The optimizer and learning-rate schedules shared by every training loop.

AdamW with two parameter groups: weight decay on the matrices of the attention and feed-forward
layers (and an untied output layer), none on norm weights and the token embedding. Decaying a
norm gain pulls it toward 0 rather than toward its identity value 1, and the embedding rows of
rare tokens get few gradient updates, so decay would mostly shrink them toward 0 (nanoGPT and
OLMo make the same choice). PyTorch's AdamW decay is decoupled and multiplied by the learning
rate, so weight_decay=0.1 is the paper's "weight decay 0.1 x LR".

The schedule is a pure function of the step (no scheduler object), so resuming at step k only
needs k: `lr_at(step, ...)` is the whole state.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from herd.train.config import TrainConfig


class OptimizerSettings(Protocol):
    """What build_optimizer reads from a run's config (TrainConfig, the post-training configs)."""

    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and undecayed norms/embeddings (names in each group's 'names').

    Only parameters that train (requires_grad) take part: a frozen base (LoRA) gets no optimizer state.
    """
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "tok_embeddings" in name:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [{"params": decay, "weight_decay": weight_decay, "names": decay_names},
            {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names}]


def build_optimizer(model: nn.Module, cfg: OptimizerSettings) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where the parameters allow it, else foreach."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]  # LoRA: no norms train
    if not groups:
        from herd.errors import HerdError

        raise HerdError("the model has no trainable parameters; unfreeze some (or add LoRA adapters) before training.")
    for g in groups:
        g.pop("names")
    params = [p for g in groups for p in g["params"]]
    # DTensor parameters (FSDP2 / TP) take the foreach path, which DTensor implements everywhere;
    # plain tensors on CPU or CUDA use the fused kernel.
    plain = not any(_is_dtensor(p) for p in params)
    kwargs = {"fused": True} if plain else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def _is_dtensor(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor)


def lr_at(step: int, *, peak: float, total: int, warmup: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2, anneal_steps: int = 0) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total`.

    warm-up: peak * (step + 1) / warmup for the first `warmup` steps;
    cosine:  floor + (peak - floor) * (1 + cos(pi * t)) / 2, t going 0 -> 1 from the end of warm-up
             to the start of the annealing phase (or the end), floor = min_lr_ratio * peak;
    wsd:     peak until the last decay_fraction of the main phase, then linear down to the floor;
    constant: peak;
    anneal:  over the last `anneal_steps` steps, linear from the main phase's final value to 0
             (step total - anneal_steps has the full value, step total would be 0).
    """
    floor = min_lr_ratio * peak
    main = total - anneal_steps  # steps of the main phase
    if anneal_steps > 0 and step >= main:
        start = _main_lr(main, peak, floor, main, warmup, schedule, decay_fraction)
        return start * (total - step) / anneal_steps
    return _main_lr(step, peak, floor, main, warmup, schedule, decay_fraction)


def _main_lr(step: int, peak: float, floor: float, main: int, warmup: int, schedule: str,
             decay_fraction: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        t = min((step - warmup) / max(main - warmup, 1), 1.0)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "wsd":
        decay_start = max(main - int(round(decay_fraction * main)), warmup)
        if step < decay_start:
            return peak
        t = min((step - decay_start) / max(main - decay_start, 1), 1.0)
        return peak + (floor - peak) * t
    raise ValueError(f"unknown schedule {schedule!r}")


def schedule_from_config(cfg: TrainConfig, total: int):
    """lr_at with the config's settings bound: step -> learning rate."""
    return lambda step: lr_at(step, peak=cfg.lr, total=total, warmup=cfg.warmup_steps, schedule=cfg.schedule,
                              min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction,
                              anneal_steps=cfg.anneal_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
