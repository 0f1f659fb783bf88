"""`herd dpo`: direct preference optimization with Llama 3's recipe (flags from herd.posttrain.dpo.DPOTrainConfig).

    herd dpo --init-from runs/sft/final --data prefs.jsonl --out runs/dpo
    herd dpo --init-from runs/sft/final --data prefs.jsonl --out runs/dpo-lora --lora-rank 16
    herd dpo --out runs/dpo --resume                     # the run's saved settings; flags given override
    herd dpo ... --mask completion --nll-weight 0         # TRL DPOTrainer's plain sigmoid loss
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from herd.flags import add_dataclass_args, dataclass_from_args, set_flags


def add_dpo_args(parser: argparse.ArgumentParser) -> None:
    from herd.posttrain.dpo import DPOTrainConfig
    from herd.posttrain.lora import LoRAConfig
    from herd.posttrain.losses import DPOConfig
    from herd.posttrain.preference_data import PreferenceDataConfig

    names = lambda cls: tuple(f.name for f in dataclasses.fields(cls))  # noqa: E731
    data_fields = tuple(n for n in names(PreferenceDataConfig) if n != "seed")
    loss_fields = names(DPOConfig) + ("reference", "layout", "reference_chunk")
    lora_fields = names(LoRAConfig)
    everything = names(DPOTrainConfig)
    add_dataclass_args(parser, DPOTrainConfig, skip=data_fields + loss_fields + lora_fields,
                       group="model, training and output")
    add_dataclass_args(parser, DPOTrainConfig, skip=tuple(n for n in everything if n not in loss_fields),
                       group="DPO loss and reference (defaults: Llama 3's recipe)")
    add_dataclass_args(parser, DPOTrainConfig, skip=tuple(n for n in everything if n not in data_fields),
                       group="preference data")
    add_dataclass_args(parser, LoRAConfig, group="LoRA (on with --lora-rank > 0)")


def resolve_dpo_config(ns: argparse.Namespace, say: Any = print):
    """DPOTrainConfig from the flags; with --resume and a checkpoint in --out, that run's saved settings with
    only the flags given applied (each override reported through `say`)."""
    from herd.posttrain.dpo import DPOTrainConfig
    from herd.posttrain.resume import FIXED_ON_RESUME
    from herd.train.config import resumed_config
    from herd.train.state import latest_state, read_state_info

    cfg = dataclass_from_args(DPOTrainConfig, ns)
    if not cfg.resume:
        return cfg
    latest = latest_state(Path(cfg.out) / "checkpoints", warn=lambda _: None)
    if latest is None:
        return cfg
    info = read_state_info(latest)
    fixed = {**FIXED_ON_RESUME, "reference": "the cached reference log-probs are that model's",
             "beta": "the run optimizes that objective", "mask": "the run optimizes that objective"}
    cfg, changes = resumed_config(info.get("config", {}), set_flags(DPOTrainConfig, ns), int(info.get("step", 0)),
                                  where=str(latest), cls=DPOTrainConfig, fixed=fixed)
    say(f"resuming {latest} with its saved settings" + ("; overridden: " + ", ".join(changes) if changes
                                                        else " (no flag overrides them)"))
    return cfg


def run_dpo(ns: argparse.Namespace) -> int:
    from herd.parallel import destroy, is_main
    from herd.posttrain.dpo import dpo

    main_rank = os.environ.get("RANK", "0") == "0"
    cfg = resolve_dpo_config(ns, say=lambda line: print(line, file=sys.stderr, flush=True) if main_rank else None)
    try:
        summary = dpo(cfg)
        if is_main():
            keys = ("steps", "total_steps", "val_dpo_loss", "val_accuracy", "val_margin", "val_logp_margin",
                    "pairs_per_s", "final", "adapter", "stopped_at")
            print(json.dumps({k: summary[k] for k in keys if k in summary}))
    finally:
        destroy()
    return 0
