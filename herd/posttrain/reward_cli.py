"""`herd reward` (train a reward model; flags from RewardTrainConfig) and `herd rejection-sample`
(best-of-K replies as new SFT data; flags from RejectionConfig).

    herd reward --init-from runs/sft/final --data pairs.jsonl --out runs/rm
    herd reward --out runs/rm --resume                    # the run's saved settings; flags given override
    herd rejection-sample --policy runs/sft/final --prompts prompts.jsonl --k 8 --reward-model runs/rm/final \\
        --out data/rs.jsonl
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

# FinetuneConfig fields that mean nothing for a reward model (no text is sampled; the export is always
# transformers' LlamaForSequenceClassification)
_NOT_REWARD = ("sample_prompts", "sample_tokens", "export_format", "merge")


def add_reward_args(parser: argparse.ArgumentParser) -> None:
    from herd.posttrain.lora import LoRAConfig
    from herd.posttrain.preference_data import PreferenceDataConfig
    from herd.posttrain.reward_train import RewardTrainConfig

    data_fields = tuple(f.name for f in dataclasses.fields(PreferenceDataConfig) if f.name != "seed") + ("layout",)
    lora_fields = tuple(f.name for f in dataclasses.fields(LoRAConfig))
    add_dataclass_args(parser, RewardTrainConfig, skip=data_fields + lora_fields + _NOT_REWARD,
                       group="model, training and output")
    add_dataclass_args(parser, RewardTrainConfig, skip=tuple(f.name for f in dataclasses.fields(RewardTrainConfig)
                                                             if f.name not in data_fields), group="preference data")
    add_dataclass_args(parser, LoRAConfig, group="LoRA (on with --lora-rank > 0; the score head always trains)")


def run_reward(ns: argparse.Namespace) -> int:
    from herd.parallel import destroy, is_main
    from herd.posttrain.reward_train import train_reward

    main_rank = os.environ.get("RANK", "0") == "0"  # before the process group exists
    cfg = resolve_reward_config(ns, say=lambda line: print(line, file=sys.stderr, flush=True) if main_rank else None)
    try:
        summary = train_reward(cfg)
        if is_main():
            keys = ("steps", "total_steps", "val_accuracy", "val_margin", "val_loss", "pairs_per_s", "final",
                    "stopped_at")
            print(json.dumps({k: summary[k] for k in keys if k in summary}))
    finally:
        destroy()
    return 0


def resolve_reward_config(ns: argparse.Namespace, say: Any = print):
    """RewardTrainConfig from the flags; with --resume and a checkpoint in --out, that run's saved settings
    with only the flags given applied (each override reported through `say`)."""
    from herd.posttrain.resume import FIXED_ON_RESUME
    from herd.posttrain.reward_train import RewardTrainConfig
    from herd.train.config import resumed_config
    from herd.train.state import latest_state, read_state_info

    cfg = dataclass_from_args(RewardTrainConfig, ns)
    if not cfg.resume:
        return cfg
    latest = latest_state(Path(cfg.out) / "checkpoints", warn=lambda _: None)  # the loop warns once
    if latest is None:
        return cfg
    info = read_state_info(latest)
    cfg, changes = resumed_config(info.get("config", {}), set_flags(RewardTrainConfig, ns), int(info.get("step", 0)),
                                  where=str(latest), cls=RewardTrainConfig, fixed=FIXED_ON_RESUME)
    say(f"resuming {latest} with its saved settings" + ("; overridden: " + ", ".join(changes) if changes
                                                        else " (no flag overrides them)"))
    return cfg


def add_rejection_sample_args(parser: argparse.ArgumentParser) -> None:
    from herd.posttrain.rejection import RejectionConfig

    add_dataclass_args(parser, RejectionConfig)


def run_rejection_sample(ns: argparse.Namespace) -> int:
    from herd.posttrain.rejection import RejectionConfig, rejection_sample

    summary = rejection_sample(dataclass_from_args(RejectionConfig, ns))
    keys = ("prompts_done", "written", "mean_reward", "mean_best_reward", "max_reward", "mean_first_reward",
            "best_differs_from_first", "tokens_per_s", "samples_per_s", "prefills_per_prompt", "out")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0
