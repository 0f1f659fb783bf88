"""Resumable state of a post-training run: where to start, what must match, save and restore.

    resume_from = resume_point(cfg)                       # None: fresh start (refuses to clobber a run)
    saved = check_resumable(resume_from, cfg, args, tokenizer_sha256=tok.sha256)   # before building anything
    check_fingerprints(saved, resume_from, data_sha256=fingerprint)                   # once the data is read
    ... build model + optimizer ...
    saved = restore(resume_from, model, optimizer, cfg)   # model/optimizer/RNG; saved["loader"] etc.
    save(cfg, step, model, optimizer, {"loader": ..., ...})

On top of herd.train.state (torch Distributed Checkpoint, atomic step_N folders, per-rank RNG):
a LoRA run saves only the adapters and their optimizer state (trainable_only), since the frozen
base comes back from --init-from; and a resume is refused, with the reason, when the checkpoint
was written for another base model, other LoRA settings, data or tokenizer (the weights would
not fit, or the curve would not continue the one it claims to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from herd.errors import HerdError
from herd.model import ModelArgs
from herd.posttrain.config import FinetuneConfig
from herd.train import state

FIXED_ON_RESUME = {
    "init_from": "the checkpoint continues that model",
    "seed": "the checkpoint's data position is in that seed's order",
    "lora_rank": "the checkpoint holds adapters of that shape",
    "lora_targets": "the checkpoint holds adapters on those layers",
    "lora_alpha": "the adapters were trained with that scaling",
    "lora_rslora": "the adapters were trained with that scaling",
    "lora_base_dtype": "the adapters were trained on that base",
}
"""Config fields a resumed run cannot change, and why (the CLI refuses such flags with --resume)."""
MUST_MATCH = tuple(k for k in FIXED_ON_RESUME if k != "seed")  # the loader checks the seed itself


def checkpoint_root(cfg: FinetuneConfig) -> Path:
    return Path(cfg.out) / "checkpoints"


def resume_point(cfg: FinetuneConfig) -> Path | None:
    """The checkpoint to resume from (--resume), None for a fresh start; HerdError if a fresh start
    would write over an existing run."""
    latest = state.latest_state(checkpoint_root(cfg))
    if cfg.resume:
        return latest
    if latest is not None:
        raise HerdError(f"{checkpoint_root(cfg)} already holds checkpoints; pass --resume to continue that run or "
                        "choose a new --out (nothing was overwritten).")
    return None


def check_resumable(ckpt: Path | None, cfg: FinetuneConfig, args: ModelArgs, **fingerprints: str) -> dict[str, Any]:
    """The checkpoint's train_state.json after checking it fits this run; {} for a fresh start.

    fingerprints: values the run saved under the same names (tokenizer sha256, ...); more can be
    checked later with check_fingerprints (the data's, once it is rendered).
    """
    if ckpt is None:
        return {}
    saved = state.read_state_info(ckpt)
    state.check_compatible(saved, args, ckpt)
    old = saved.get("config", {})
    for key in MUST_MATCH:
        if key in old and old[key] != getattr(cfg, key):
            raise HerdError(f"{ckpt} was trained with --{key.replace('_', '-')} {old[key]} but this run has "
                            f"{getattr(cfg, key)}; resume with the run's settings (leave the flag out) or start "
                            "a new --out.")
    check_fingerprints(saved, ckpt, **fingerprints)
    return saved


def check_fingerprints(saved: dict[str, Any], ckpt: Path | None, **fingerprints: str) -> None:
    """HerdError when a value the checkpoint saved (data sha256, ...) differs from this run's."""
    for key, value in fingerprints.items():
        if saved.get(key) and saved[key] != value:
            what = key.removesuffix("_sha256").replace("_", " ")
            raise HerdError(f"the {what} differs from the one {ckpt} was trained on (sha256 {value[:12]}... vs "
                            f"{saved[key][:12]}...); resume with the same --data and settings, or start a new --out.")


def save(cfg: FinetuneConfig, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         info: dict[str, Any]) -> Path:
    """Write OUT/checkpoints/step_N (all ranks call); LoRA runs keep only the trainable state."""
    return state.save_train_state(checkpoint_root(cfg), step, model, optimizer, {**info, "config": cfg.to_dict()},
                                  keep=cfg.keep_checkpoints, trainable_only=cfg.lora)


def restore(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: FinetuneConfig) -> dict[str, Any]:
    """Load model, optimizer and RNG state from `ckpt` into the built run; returns its train_state.json."""
    return state.load_train_state(ckpt, model, optimizer, trainable_only=cfg.lora)
