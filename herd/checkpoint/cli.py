"""`herd init`, `herd info` and `herd convert`: make, size up and convert checkpoints (GGUF is read here,
written by `herd export` in export_cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from herd.checkpoint import FORMATS, detect_format, find_tokenizer, load_args, load_checkpoint, save_checkpoint
from herd.checkpoint.common import DTYPES, meta_model, parse_dtype
from herd.flags import add_bool_flag, add_dataclass_args, dataclass_from_args
from herd.configs import PRESETS, get_preset
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer

_DTYPE_CHOICES = ["fp32", "bf16", "fp16"]


def _human(n: float, unit: str = "B") -> str:
    """1536 -> '1.50 KiB' for bytes, 8.03e9 -> '8.03B' for counts."""
    if unit == "B":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or suffix == "TiB":
                return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.2f} {suffix}"
            n /= 1024
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(int(n))


# ---------------------------------------------------------------------------------------------
# herd init


def add_init_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", help=f"preset name: {', '.join(PRESETS)}")
    parser.add_argument("dst", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--format", choices=FORMATS, default="herd", help="checkpoint format")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the initialization")
    parser.add_argument("--dtype", choices=_DTYPE_CHOICES, default="fp32", help="dtype of the stored weights")
    parser.add_argument("--shards", type=int, default=1, help="number of weight files")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.model to copy beside the weights")
    add_bool_flag(parser, "--overwrite", default=False, help="replace an existing checkpoint at DST")
    add_dataclass_args(parser, ModelArgs, group="model overrides (applied on top of the preset)")


def init_model(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """A randomly initialized model, allocated once directly in `dtype` (no float32 detour)."""
    model = meta_model(args).to(dtype)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model.eval()


def run_init(ns: argparse.Namespace) -> int:
    try:
        args = dataclass_from_args(ModelArgs, ns, base=get_preset(ns.preset))
    except ValueError as e:  # ModelArgs' own checks already say what to change
        raise HerdError(str(e)) from None
    n = meta_model(args).num_params()
    if n > 200e6:  # random init of ~1B parameters takes minutes on a small CPU
        print(f"initializing {_human(n, 'n')} parameters ({ns.dtype}) ...", file=sys.stderr, flush=True)
    model = init_model(args, ns.seed, parse_dtype(ns.dtype))
    save_checkpoint(model, ns.dst, format=ns.format, shards=ns.shards, tokenizer_path=ns.tokenizer,
                    overwrite=ns.overwrite)
    print(f"wrote {ns.format} checkpoint of {ns.preset} ({_human(model.num_params(), 'n')} parameters, "
          f"{ns.dtype}) to {ns.dst}")
    return 0


# ---------------------------------------------------------------------------------------------
# herd info


def add_info_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"preset name: {', '.join(PRESETS)}")
    source.add_argument("--checkpoint", type=Path, help="checkpoint folder (herd, Hugging Face or Meta)")
    parser.add_argument("--seq-len", type=int, default=None, help="context length for the KV-cache size "
                        "(default: the model's max_seq_len)")
    add_bool_flag(parser, "--json", default=False, help="print the numbers as one JSON object")


def model_info(args: ModelArgs, seq_len: int | None = None) -> dict:
    """Parameter counts (counted on a meta-device model), weight memory per dtype and KV-cache sizes."""
    model = meta_model(args)
    total, non_emb = model.num_params(), model.num_params(exclude_embeddings=True)
    seq_len = seq_len or args.max_seq_len
    kv_elems = 2 * args.n_layers * args.n_kv_heads * args.head_dim  # keys + values, every layer
    return {
        "params": total, "params_without_embeddings": non_emb,
        "weights_bytes": {"fp32": 4 * total, "bf16": 2 * total, "int8": total},
        "kv_cache_bytes_per_token": {"bf16": 2 * kv_elems, "fp32": 4 * kv_elems},
        "seq_len": seq_len,
        "kv_cache_bytes": {"bf16": 2 * kv_elems * seq_len, "fp32": 4 * kv_elems * seq_len},
        "model_args": args.to_dict(), "hidden_dim": args.hidden_dim,
    }


def run_info(ns: argparse.Namespace) -> int:
    if ns.seq_len is not None and ns.seq_len < 1:
        raise HerdError(f"--seq-len must be positive, got {ns.seq_len}.")
    args = get_preset(ns.preset) if ns.preset else load_args(ns.checkpoint)
    info = model_info(args, ns.seq_len)
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    a = args
    print(f"model          {ns.preset or ns.checkpoint}")
    print(f"shape          dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.n_kv_heads} KV, head_dim "
          f"{a.head_dim}), ffn {a.hidden_dim}, vocab {a.vocab_size}, tied {a.tie_embeddings}")
    rope = f"llama3 x{a.rope_scale_factor:g}" if a.use_scaled_rope else "none"
    print(f"context        {a.max_seq_len} (rope theta {a.rope_theta:g}, scaling {rope})")
    print(f"parameters     {_human(info['params'], 'n')} ({info['params']:,}); without embeddings "
          f"{_human(info['params_without_embeddings'], 'n')} ({info['params_without_embeddings']:,})")
    w = info["weights_bytes"]
    print(f"weights        fp32 {_human(w['fp32'])}, bf16 {_human(w['bf16'])}, int8 {_human(w['int8'])}")
    t, c = info["kv_cache_bytes_per_token"], info["kv_cache_bytes"]
    print(f"KV cache       per token: bf16 {_human(t['bf16'])}, fp32 {_human(t['fp32'])}; "
          f"{info['seq_len']} tokens: bf16 {_human(c['bf16'])}, fp32 {_human(c['fp32'])} (batch 1)")
    return 0


# ---------------------------------------------------------------------------------------------
# herd convert


def add_convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="checkpoint to read (herd, Hugging Face, Meta folder or a .gguf file; "
                        "detected)")
    parser.add_argument("dst", type=Path, help="folder to write")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="format to write (for GGUF use `herd export`)")
    parser.add_argument("--shards", type=int, default=1, help="number of weight files (Meta: model-parallel shards)")
    parser.add_argument("--dtype", choices=_DTYPE_CHOICES, default=None, help="convert the weights (default: keep)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="store int8 / int4 weight-only linear layers (herd format only; loads without "
                             "re-quantizing)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64, 128 or 256)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.model to copy (default: the one beside SRC, or the vocabulary inside a GGUF)")
    add_bool_flag(parser, "--overwrite", default=False, help="replace an existing checkpoint at DST")


def run_convert(ns: argparse.Namespace) -> int:
    import tempfile

    if ns.src.resolve() == ns.dst.resolve():
        raise HerdError(f"SRC and DST are the same folder ({ns.src}); write the conversion to a new folder.")
    if ns.quantize and ns.format != "herd":
        raise HerdError("--quantize stores herd's int8/int4 layers, which only the herd format holds; use "
                        "--format herd (or `herd export --type q8_0` for llama.cpp).")
    model = load_checkpoint(ns.src, dtype=ns.dtype and DTYPES[ns.dtype])
    if ns.quantize:
        from herd.quant import QuantConfig, quantize_model

        quantize_model(model, QuantConfig(method=ns.quantize, group_size=ns.group_size))
    tokenizer = ns.tokenizer or find_tokenizer(ns.src)
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is None and detect_format(ns.src)[0] == "gguf":
            from herd.checkpoint.gguf import read_tokenizer, tokenizer_file_text

            tok = read_tokenizer(ns.src)
            if tok is not None:  # the GGUF's own vocabulary, as a tokenizer.model beside the weights
                tokenizer = Path(tmp) / "tokenizer.model"
                tokenizer.write_text(tokenizer_file_text(tok))
        save_checkpoint(model, ns.dst, format=ns.format, shards=ns.shards, tokenizer_path=tokenizer,
                        overwrite=ns.overwrite)
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    quant = f", {ns.quantize}" if ns.quantize else ""
    print(f"wrote {ns.format} checkpoint ({_human(model.num_params(), 'n')} parameters, {dtype}{quant}, "
          f"{ns.shards} shard(s){', tokenizer' if tokenizer else ''}) to {ns.dst}")
    return 0
