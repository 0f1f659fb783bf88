"""Checks a training run makes before it builds or writes anything: the data, the tokenizer, memory.

Each failure is a HerdError naming the problem and the fix, raised while nothing has been
written yet, so a bad command never costs a previous run's checkpoints or logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from herd.data.shards import ShardDataset, check_tokenizer, find_tokenizer
from herd.errors import HerdError
from herd.model import ModelArgs
from herd.train.config import TrainConfig


@dataclass
class TrainData:
    """The opened shard splits and the tokenizer that made them."""

    train: ShardDataset
    val: ShardDataset | None
    tokenizer: Any
    tokenizer_path: str | None
    tokenizer_sha256: str


def open_data(cfg: TrainConfig, args: ModelArgs) -> TrainData:
    """Open the train / val splits, find and check the tokenizer, check the vocabulary fits the model."""
    if not Path(cfg.data).is_dir():
        raise HerdError(f"--data {cfg.data} is not a directory; pass a shard directory from `herd data run`.")
    train = ShardDataset(cfg.data, "train")
    val = ShardDataset(cfg.data, "val") if "val" in train.manifest.get("splits", {}) else None
    info = train.manifest.get("tokenizer", {})
    n_words = int(info.get("n_words", 0))
    if n_words > args.vocab_size:
        raise HerdError(f"the shards use a {n_words}-token vocabulary but {cfg.preset} has only {args.vocab_size} "
                        "embedding rows; pick a preset with a large enough vocab_size or re-tokenize with a smaller vocabulary.")
    # the tokenizer is found wherever the run starts (a copy beside the shards, the recorded
    # absolute path) and checked by sha256; a run that cannot find it stops here, because without
    # it there would be no samples, no tokenizer in OUT/final and no check of the shards
    from herd.tokenizer import Tokenizer

    path = find_tokenizer(cfg.data, train.manifest, cfg.tokenizer or None)
    tokenizer = None
    if path is not None:  # None: shards written without a tokenizer file (token ids made by code)
        tokenizer = Tokenizer.from_file(path)
        check_tokenizer(train.manifest, tokenizer)
    return TrainData(train, val, tokenizer, str(path) if path else None, str(info.get("sha256", "")))


def estimate_bytes(args: ModelArgs, micro_batch: int, seq_len: int, n_params: int, bytes_per: int = 4,
                   masked: bool = True) -> int:
    """Rough peak memory of one training step: weights, grads and AdamW moments (4 copies) plus
    the activations autograd keeps per block (~ 16 dim-wide + 3 hidden-wide tensors per token),
    the boolean document mask and attention scores on the CPU path, and one loss slice."""
    tokens = micro_batch * seq_len
    per_token = args.n_layers * (16 * args.dim + 3 * args.hidden_dim) * bytes_per
    scores = micro_batch * seq_len * seq_len * (1 + (args.n_heads * 4 if masked else 0))
    return 4 * n_params * 4 + tokens * per_token + scores + min(tokens, 4096) * args.vocab_size * 4 * 2


def available_bytes(device: torch.device) -> int:
    """Free memory the run may use: free GPU memory, or MemAvailable on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(cfg: TrainConfig, args: ModelArgs, device: torch.device, local_batch: int, seq_len: int) -> int:
    """The micro-batch size to use; HerdError when the local batch cannot split into it or clearly cannot fit."""
    micro = cfg.micro_batch_size or local_batch
    if local_batch % micro:
        raise HerdError(f"the per-rank batch of {local_batch} sequences does not split into micro-batches of "
                        f"{micro}; choose a --micro-batch-size that divides it.")
    shard = max(cfg.dp, 1) * max(cfg.tp, 1) if cfg.dp else 1  # optimizer state is sharded under FSDP/TP
    need = estimate_bytes(args, micro, seq_len, args.num_params() // shard, masked=cfg.document_mask)
    have = available_bytes(device)
    if need > have:
        raise HerdError(f"a micro-batch of {micro} x {seq_len} tokens of {cfg.preset} needs about {need / 2**30:.1f} GiB "
                        f"but {device.type} has {have / 2**30:.1f} GiB free; lower --micro-batch-size (gradient "
                        "accumulation keeps the global batch) or --seq-len, or turn on --activation-checkpointing.")
    return micro
