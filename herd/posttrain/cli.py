"""`herd sft` (supervised fine-tuning; flags from SFTConfig), `herd merge-lora` (fold a LoRA adapter,
herd's or peft's, into its base model, any output format) and `herd average` (the weighted mean of
checkpoints, reward models or adapters). `herd score` lives in score_cli.py.

    herd sft --init-from ckpt/ --data chats.jsonl --out runs/sft
    herd sft --out runs/sft --resume                      # the run's saved settings; flags given override
    torchrun --nproc-per-node 2 --no-python herd sft --init-from ckpt/ --data chats.jsonl --dp 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from herd.checkpoint.common import DTYPES
from herd.errors import HerdError
from herd.flags import add_bool_flag, add_dataclass_args, dataclass_from_args, set_flags

_DTYPE_CHOICES = ["fp32", "bf16", "fp16"]


def add_merge_lora_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", type=Path, help="base checkpoint the adapter was trained on (herd, Hugging Face or Meta)")
    parser.add_argument("adapter", type=Path, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out", type=Path, help="folder to write the merged checkpoint into")
    parser.add_argument("--format", choices=["herd", "hf", "meta"], default="herd", help="format to write")
    parser.add_argument("--dtype", choices=_DTYPE_CHOICES, default=None,
                        help="dtype of the merged weights (default: the base's); the merge itself adds in float32")
    parser.add_argument("--shards", type=int, default=1, help="number of weight files")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.model to copy beside the weights (default: the one beside BASE, if any)")
    add_bool_flag(parser, "--overwrite", default=False, help="replace an existing checkpoint at OUT")


def run_merge_lora(ns: argparse.Namespace) -> int:
    from herd.checkpoint import find_tokenizer, load_checkpoint, save_checkpoint
    from herd.posttrain.adapter import load_adapter
    from herd.posttrain.lora import merge_lora

    if ns.out.resolve() in (ns.base.resolve(), ns.adapter.resolve()):
        raise HerdError(f"OUT {ns.out} is the base or adapter folder; write the merged model to a new folder.")
    if not ns.adapter.exists():
        raise HerdError(f"adapter folder {ns.adapter} does not exist; pass the folder holding adapter_config.json.")
    print(f"loading {ns.base} ...", file=sys.stderr, flush=True)
    model = load_checkpoint(ns.base)
    modules = load_adapter(model, ns.adapter)
    first = next(iter(modules.values()))
    n = merge_lora(model)
    if ns.dtype is not None:
        model = model.to(DTYPES[ns.dtype])
    tokenizer = ns.tokenizer or find_tokenizer(ns.base)
    save_checkpoint(model, ns.out, format=ns.format, shards=ns.shards, tokenizer_path=tokenizer,
                    overwrite=ns.overwrite)
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    print(f"merged {n} LoRA adapters (rank {first.rank}, alpha {first.alpha:g}) from {ns.adapter} into {ns.base}; "
          f"wrote {ns.format} checkpoint ({dtype}{', tokenizer' if tokenizer else ''}) to {ns.out}")
    return 0


def add_sft_args(parser: argparse.ArgumentParser) -> None:
    from herd.posttrain.config import SFTConfig
    from herd.posttrain.dataset import SFTDataConfig
    from herd.posttrain.lora import LoRAConfig

    data_fields = tuple(f.name for f in dataclasses.fields(SFTDataConfig) if f.name != "seed") + ("packing",)
    lora_fields = tuple(f.name for f in dataclasses.fields(LoRAConfig))
    add_dataclass_args(parser, SFTConfig, skip=data_fields + lora_fields, group="model, training and output")
    add_dataclass_args(parser, SFTConfig, skip=tuple(f.name for f in dataclasses.fields(SFTConfig)
                                                     if f.name not in data_fields), group="chat data")
    add_dataclass_args(parser, LoRAConfig, group="LoRA (on with --lora-rank > 0)")


def run_sft(ns: argparse.Namespace) -> int:
    from herd.parallel import destroy, is_main
    from herd.posttrain.sft import sft

    main_rank = os.environ.get("RANK", "0") == "0"  # before the process group exists
    cfg = resolve_sft_config(ns, say=lambda line: print(line, file=sys.stderr, flush=True) if main_rank else None)
    try:
        summary = sft(cfg)
        if is_main():
            keys = ("steps", "total_steps", "val_loss", "tokens_per_s", "final", "adapter", "stopped_at")
            print(json.dumps({k: summary[k] for k in keys if k in summary}))
    finally:
        destroy()
    return 0


def resolve_sft_config(ns: argparse.Namespace, say: Any = print):
    """SFTConfig from the flags; with --resume and a checkpoint in --out, that run's saved settings with
    only the flags given applied (each override reported through `say`), as `herd pretrain` does."""
    from herd.posttrain.config import SFTConfig
    from herd.posttrain.resume import FIXED_ON_RESUME
    from herd.train.config import resumed_config
    from herd.train.state import latest_state, read_state_info

    cfg = dataclass_from_args(SFTConfig, ns)
    if not cfg.resume:
        return cfg
    latest = latest_state(Path(cfg.out) / "checkpoints", warn=lambda _: None)  # the loop warns once
    if latest is None:
        return cfg
    info = read_state_info(latest)
    cfg, changes = resumed_config(info.get("config", {}), set_flags(SFTConfig, ns), int(info.get("step", 0)),
                                  where=str(latest), cls=SFTConfig, fixed=FIXED_ON_RESUME)
    say(f"resuming {latest} with its saved settings" + ("; overridden: " + ", ".join(changes) if changes
                                                        else " (no flag overrides them)"))
    return cfg


def add_average_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", type=Path, metavar="CKPT",
                        help="two or more checkpoints of one architecture (herd, Hugging Face or Meta format; or reward "
                             "models; or LoRA adapters of one base)")
    parser.add_argument("out", type=Path, metavar="OUT", help="folder to write the average into")
    parser.add_argument("--format", choices=["herd", "hf", "meta"], default=None,
                        help="format to write a model in (default: herd; reward models are written as hf, adapters "
                             "in peft's layout)")
    parser.add_argument("--dtype", choices=_DTYPE_CHOICES, default=None,
                        help="dtype of the averaged weights (default: the first input's); the sums are float32")
    parser.add_argument("--weights", default=None,
                        help="comma-separated weight of each checkpoint, normalized to sum 1 (default: equal)")
    parser.add_argument("--shards", type=int, default=1, help="number of weight files")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.model to copy beside the weights (default: the inputs' own, which must agree)")
    add_bool_flag(parser, "--overwrite", default=False, help="replace an existing checkpoint at OUT")


def run_average(ns: argparse.Namespace) -> int:
    from herd.posttrain.average import average_checkpoints

    weights = None
    if ns.weights is not None:
        try:
            weights = [float(w) for w in ns.weights.split(",") if w.strip()]
        except ValueError:
            raise HerdError(f"--weights '{ns.weights}' is not a comma-separated list of numbers.") from None
    print(f"averaging {len(ns.checkpoints)} checkpoints ...", file=sys.stderr, flush=True)
    what = average_checkpoints(ns.checkpoints, ns.out, format=ns.format, dtype=ns.dtype, weights=weights,
                               shards=ns.shards, tokenizer=ns.tokenizer, overwrite=ns.overwrite)
    total = sum(weights) if weights else 0.0
    shown = ", ".join(f"{p} x {w / total:.3g}" for p, w in zip(ns.checkpoints, weights)) if total else \
        ", ".join(map(str, ns.checkpoints))
    print(f"averaged {shown} in float32; wrote {what} to {ns.out}")
    return 0
