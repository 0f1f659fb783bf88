"""`herd ppo`: on-policy RL (GRPO or PPO) of a checkpoint on prompts against a reward model or a Python reward;
flags from PPOConfig.

    herd ppo --init-from runs/sft/final --prompts prompts.jsonl --reward-fn herd.posttrain.arithmetic:reward
    herd ppo --algo ppo --init-from runs/sft/final --prompts prompts.jsonl --reward-model runs/rm/final
    herd ppo --out runs/ppo --resume            # the run's saved settings; flags given override
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from herd.flags import add_dataclass_args, dataclass_from_args, set_flags


UNUSED = ("compile", "activation_checkpointing", "eval_batches", "sample_prompts", "sample_tokens", "peak_tflops")
"""FinetuneConfig fields the RL loop has no use for (no validation loss, no compiled blocks, no MFU): not flags."""


def add_ppo_args(parser: argparse.ArgumentParser) -> None:
    from herd.posttrain.lora import LoRAConfig
    from herd.posttrain.ppo_config import PPOConfig, ppo_config_fields

    rl = ppo_config_fields()
    lora = tuple(f.name for f in dataclasses.fields(LoRAConfig))
    add_dataclass_args(parser, PPOConfig, skip=tuple(f.name for f in dataclasses.fields(PPOConfig) if f.name not in rl),
                       group="prompts, reward and RL")
    add_dataclass_args(parser, PPOConfig, skip=rl + lora + UNUSED, group="model, training and output")
    add_dataclass_args(parser, LoRAConfig, group="LoRA (on with --lora-rank > 0)")


def run_ppo(ns: argparse.Namespace) -> int:
    from herd.posttrain.ppo import ppo

    cfg = resolve_ppo_config(ns, say=lambda line: print(line, file=sys.stderr, flush=True))
    summary = ppo(cfg)
    keys = ("steps", "total_steps", "reward", "kl", "heldout_reward", "final", "adapter", "plot", "stopped_at")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0


def resolve_ppo_config(ns: argparse.Namespace, say: Any = print):
    """PPOConfig from the flags; with --resume and a checkpoint in --out, that run's saved settings with only
    the flags given applied (each override reported through `say`), as `herd sft` does."""
    from herd.posttrain.ppo_config import PPOConfig
    from herd.posttrain.resume import FIXED_ON_RESUME
    from herd.train.config import resumed_config
    from herd.train.state import latest_state, read_state_info

    cfg = dataclass_from_args(PPOConfig, ns)
    if not cfg.resume:
        return cfg
    latest = latest_state(Path(cfg.out) / "checkpoints", warn=lambda _: None)
    if latest is None:
        return cfg
    info = read_state_info(latest)
    fixed = {**FIXED_ON_RESUME, "algo": "the checkpoint holds that algorithm's state (a value head or not)",
             "group_size": "the prompts' position counts groups of that size"}
    cfg, changes = resumed_config(info.get("config", {}), set_flags(PPOConfig, ns), int(info.get("step", 0)),
                                  where=str(latest), cls=PPOConfig, fixed=fixed)
    say(f"resuming {latest} with its saved settings" + ("; overridden: " + ", ".join(changes) if changes
                                                        else " (no flag overrides them)"))
    return cfg
