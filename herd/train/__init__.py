"""Pre-training: one explicit loop (loop.py) over packed token shards, and the parts it shares
with other loops: TrainConfig, AdamW + schedules, batches, document masks, the chunked loss,
checkpoints (DCP), metrics. `herd pretrain` (cli.py) and `herd speedrun` (speedrun.py) drive it.
"""

from herd.train.config import TrainConfig


def pretrain(cfg: TrainConfig):
    """Run pre-training as configured; see herd.train.loop.pretrain."""
    from herd.train.loop import pretrain as _pretrain

    return _pretrain(cfg)


__all__ = ["TrainConfig", "pretrain"]
