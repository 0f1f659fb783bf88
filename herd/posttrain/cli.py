"""`herd sft` (supervised fine-tuning; flags from SFTConfig) and `herd merge-lora` (fold a LoRA adapter,
herd's or peft's, into its base model and save it in any format).

    herd sft --init-from ckpt/ --data chats.jsonl --out runs/sft
    herd sft --out runs/sft --resume                      # the run's saved settings; flags given override
    torchrun --nproc-per-node 2 --no-python herd sft --init-from ckpt/ --data chats.jsonl --dp 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from herd.checkpoint.common import DTYPES
from herd.errors import HerdError
from herd.flags import add_bool_flag, add_dataclass_args, dataclass_from_args

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
    from herd.posttrain.config import SFTConfig
    from herd.posttrain.sft import sft

    cfg = dataclass_from_args(SFTConfig, ns, base=_saved_config(ns))
    try:
        summary = sft(cfg)
        if is_main():
            keys = ("steps", "total_steps", "val_loss", "tokens_per_s", "final", "adapter", "stopped_at")
            print(json.dumps({k: summary[k] for k in keys if k in summary}))
    finally:
        destroy()
    return 0


def _saved_config(ns: argparse.Namespace):
    """With --resume, the settings of the run in --out (flags given on the command line override them)."""
    from herd.posttrain.config import SFTConfig
    from herd.train import state

    if not ns.resume:
        return None
    latest = state.latest_state(Path(ns.out or SFTConfig.out) / "checkpoints")
    if latest is None:
        return None
    saved = state.read_state_info(latest).get("config", {})
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    return SFTConfig(**{k: v for k, v in saved.items() if k in known})
