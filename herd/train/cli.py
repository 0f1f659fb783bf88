"""`herd pretrain`: flags from TrainConfig, then the loop. Launch several processes with torchrun:

    herd pretrain --data shards/ --out runs/r1 --preset herd-15m --steps 2000
    torchrun --nproc-per-node 8 --no-python herd pretrain --data shards/ --preset herd-1b --tp 2
"""

from __future__ import annotations

import argparse
import json

from herd.flags import add_dataclass_args, dataclass_from_args
from herd.train.config import TrainConfig


def add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, TrainConfig)


def run_pretrain(args: argparse.Namespace) -> int:
    from herd.parallel import destroy, is_main
    from herd.train.loop import pretrain

    cfg = dataclass_from_args(TrainConfig, args)
    try:
        summary = pretrain(cfg)
        if is_main():
            keys = ("steps", "total_steps", "val_loss", "tokens_per_s", "wall_s", "final", "stopped_at")
            print(json.dumps({k: summary[k] for k in keys if k in summary}))
    finally:
        destroy()
    return 0
