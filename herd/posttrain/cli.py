"""`herd merge-lora` (fold a LoRA adapter into its base model, any output format) and `herd average`
(the weighted mean of checkpoints, reward models or adapters). `herd score` lives in score_cli.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from herd.checkpoint.common import DTYPES
from herd.errors import HerdError
from herd.flags import add_bool_flag

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
