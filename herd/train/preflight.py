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

from herd.data.shards import ShardDataset, check_tokenizer, file_sha256, find_tokenizer
from herd.errors import HerdError
from herd.model import ModelArgs
from herd.train.config import DEFAULT_PRESET, TrainConfig


@dataclass
class TrainData:
    """The opened shard splits and the tokenizer that made them."""

    train: ShardDataset
    val: ShardDataset | None
    tokenizer: Any
    tokenizer_path: str | None
    tokenizer_sha256: str


def resolve_model(cfg: TrainConfig) -> ModelArgs:
    """The architecture this run trains: the preset's or the --init-from checkpoint's, plus overrides."""
    from dataclasses import replace

    from herd.configs import get_preset
    from herd.errors import ConfigError

    if cfg.init_from:
        from herd.checkpoint import load_args

        if not Path(cfg.init_from).exists():
            raise HerdError(f"--init-from {cfg.init_from} does not exist; pass a herd, Hugging Face or Meta "
                            "checkpoint folder.")
        args = load_args(cfg.init_from)
    else:
        args = get_preset(cfg.preset or DEFAULT_PRESET)
    overrides = cfg.model_overrides()
    for name in ("max_seq_len", "rope_original_max_seq_len"):
        if name in overrides and overrides[name] < 1:
            raise HerdError(f"--{name.replace('_', '-')} {overrides[name]} must be a positive number of tokens.")
    for name in ("rope_theta", "rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
        if name in overrides and not overrides[name] > 0:
            raise HerdError(f"--{name.replace('_', '-')} {overrides[name]} must be positive.")
    try:
        args = replace(args, **overrides)
    except ConfigError as e:
        raise HerdError(str(e)) from None
    if args.use_scaled_rope and not args.rope_high_freq_factor > args.rope_low_freq_factor:
        raise HerdError(f"--rope-high-freq-factor {args.rope_high_freq_factor} must exceed --rope-low-freq-factor "
                        f"{args.rope_low_freq_factor} (Llama 3.1 uses 4 and 1).")
    return args


def init_weights(cfg: TrainConfig, args: ModelArgs, data: "TrainData") -> dict[str, torch.Tensor] | None:
    """The --init-from weights as a state dict (memory-mapped where the format allows), after checking
    that the checkpoint's tokenizer is the one that made the shards; None without --init-from."""
    if not cfg.init_from:
        return None
    from herd.checkpoint import find_tokenizer, load_checkpoint

    tok = find_tokenizer(cfg.init_from)
    if tok is not None and data.tokenizer_sha256 and file_sha256(tok) != data.tokenizer_sha256:
        raise HerdError(f"{cfg.data} was tokenized with another tokenizer than {cfg.init_from} ({tok}); re-tokenize "
                        f"the data with `herd data pack --tokenizer {tok}` or pick the matching checkpoint.")
    model = load_checkpoint(cfg.init_from)
    return {k: v for k, v in model.state_dict().items()}


def open_data(cfg: TrainConfig, args: ModelArgs) -> TrainData:
    """Open the train / val splits, find and check the tokenizer, check the vocabulary fits the model."""
    if not Path(cfg.data).is_dir():
        raise HerdError(f"--data {cfg.data} is not a directory; pass a shard directory from `herd data run`.")
    train = ShardDataset(cfg.data, "train")
    val = ShardDataset(cfg.data, "val") if "val" in train.manifest.get("splits", {}) else None
    info = train.manifest.get("tokenizer", {})
    n_words = int(info.get("n_words", 0))
    if n_words > args.vocab_size:
        raise HerdError(f"the shards use a {n_words}-token vocabulary but {cfg.model_name()} has only {args.vocab_size} "
                        "embedding rows; pick a model with a large enough vocab_size or re-tokenize with its tokenizer.")
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
                   masked: bool = True, n_trainable: int | None = None) -> int:
    """Rough peak memory of one training step: weights, grads and AdamW moments (4 copies) plus
    the activations autograd keeps per block (~ 16 dim-wide + 3 hidden-wide tensors per token),
    the boolean document mask and attention scores on the CPU path, and one loss slice.

    n_trainable: when only these parameters train (LoRA), the others are held once, without
    gradients or optimizer state."""
    tokens = micro_batch * seq_len
    per_token = args.n_layers * (16 * args.dim + 3 * args.hidden_dim) * bytes_per
    scores = micro_batch * seq_len * seq_len * (1 + (args.n_heads * 4 if masked else 0))
    state = 4 * n_params * 4 if n_trainable is None else n_params * 4 + 3 * n_trainable * 4
    return state + tokens * per_token + scores + min(tokens, 4096) * args.vocab_size * 4 * 2


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
        raise HerdError(f"a micro-batch of {micro} x {seq_len} tokens of {cfg.model_name()} needs about {need / 2**30:.1f} GiB "
                        f"but {device.type} has {have / 2**30:.1f} GiB free; lower --micro-batch-size (gradient "
                        "accumulation keeps the global batch) or --seq-len, or turn on --activation-checkpointing.")
    return micro
