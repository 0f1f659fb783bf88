"""`herd pretrain`: flags from TrainConfig, then the loop. Launch several processes with torchrun:

    herd pretrain --data shards/ --out runs/r1 --preset herd-15m --steps 2000
    torchrun --nproc-per-node 8 --no-python herd pretrain --data shards/ --preset herd-1b --tp 2

`--resume` continues with the settings saved in the newest checkpoint; flags given with it
override those (each override is printed), and ones that cannot continue the run are refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from herd.flags import add_dataclass_args, dataclass_from_args, set_flags
from herd.train.config import TrainConfig, resumed_config
from herd.train.state import latest_state, read_state_info


def add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, TrainConfig)


def resolve_config(args: argparse.Namespace, say: Any = print) -> TrainConfig:
    """TrainConfig from the flags; with --resume and a checkpoint to resume, the saved config of
    that checkpoint with only the explicitly given flags applied (reported through `say`)."""
    cfg = dataclass_from_args(TrainConfig, args)
    if not cfg.resume:
        return cfg
    latest = latest_state(Path(cfg.out) / "checkpoints", warn=lambda _: None)  # the loop warns once
    if latest is None:
        return cfg
    info = read_state_info(latest)
    cfg, changes = resumed_config(info.get("config", {}), set_flags(TrainConfig, args), int(info.get("step", 0)),
                                  where=str(latest))
    say(f"resuming {latest} with its saved settings" + ("; overridden: " + ", ".join(changes) if changes
                                                        else " (no flag overrides them)"))
    return cfg


def run_pretrain(args: argparse.Namespace) -> int:
    from herd.parallel import destroy, is_main
    from herd.train.loop import pretrain

    main_rank = os.environ.get("RANK", "0") == "0"  # before the process group exists
    cfg = resolve_config(args, say=lambda line: print(line, file=sys.stderr, flush=True) if main_rank else None)
    try:
        summary = pretrain(cfg)
        if is_main():
            keys = ("steps", "total_steps", "val_loss", "tokens_per_s", "wall_s", "final", "stopped_at")
            print(json.dumps({k: summary[k] for k in keys if k in summary}))
    finally:
        destroy()
    return 0
