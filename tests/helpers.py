"""Helpers several test modules share (test modules never import each other): tiny shard sets and
training configs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from herd.data.shards import ShardWriter
from herd.train.config import TrainConfig
from herd.train.metrics import read_log

STEPS = 8


def make_shards(out, n_docs=120, vocab=256, seed=0, sha="a" * 64, shard_tokens=1500):
    """Real herd-shards-v1 directories of learnable documents: arithmetic progressions mod vocab - 2."""
    rng = np.random.default_rng(seed)
    info = {"path": "", "sha256": sha, "n_words": vocab, "bos_id": vocab - 2, "eos_id": vocab - 1}
    for split, n in (("train", n_docs), ("val", max(n_docs // 10, 4))):
        with ShardWriter(out, split, info, shard_tokens=shard_tokens) as w:
            for _ in range(n):
                length, start, step = int(rng.integers(5, 60)), int(rng.integers(0, 200)), int(rng.integers(1, 4))
                w.add((start + step * np.arange(length)) % (vocab - 2))
    return out


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(preset="herd-1m", data=str(data), out=str(out), steps=STEPS, batch_size=4, seq_len=32,
                lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=1, checkpoint_every=0, log_every=100,
                tensorboard=False, peak_tflops=1.0, seed=1,
                # a fixed count (conftest's), not --threads 0's pick for the current load: float
                # sums depend on the thread count, and comparisons between runs must not
                threads=int(os.environ.get("HERD_TEST_THREADS", "1")))
    return TrainConfig(**{**base, **kw})


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out / "log.jsonl", "train")]
