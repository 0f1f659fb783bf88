"""Helpers several test modules share (test modules never import each other): tiny shard sets and
training configs, chat records and a tiny chat checkpoint."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

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


CHAT_SHAPE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=128)


def arithmetic_chats(n: int, seed: int = 0) -> list[dict]:
    """TRL-format chat records (conversations with a system turn, and prompt/completion pairs)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if i % 3 == 0:
            out.append({"prompt": f"Add {a} and {b}.", "completion": f"{a} + {b} = {a + b}."})
        else:
            out.append({"messages": [{"role": "system", "content": "Answer briefly."},
                                     {"role": "user", "content": f"What is {a} + {b}?"},
                                     {"role": "assistant", "content": f"The answer is {a + b}."}]})
    return out


def write_jsonl(path: Path, records: list, raw_lines: list[str] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in raw_lines))
    return path


def tiny_chat_checkpoint(path: Path, tokenizer_model: Path, seed: int = 7) -> Path:
    """A tiny random Llama in Hugging Face format with the official tokenizer beside it; attention
    sharper than the default init, so masking or layout mistakes show in the loss."""
    from herd.checkpoint import save_checkpoint
    from herd.model import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**CHAT_SHAPE))
    model.init_weights(std=0.05)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(6)
            layer.attention.wk.weight.mul_(6)
    save_checkpoint(model, path, format="hf", tokenizer_path=tokenizer_model)
    return path
