"""Checkpoints: load and save herd models in herd's own, Hugging Face and Meta formats, and GGUF.

    model = load_checkpoint("ckpt/")                      # format detected from the files
    model = load_checkpoint("model.gguf")                 # llama.cpp's format, dequantized
    save_checkpoint(model, "ckpt-hf/", format="hf", shards=2, tokenizer_path="tokenizer.model")
    write_gguf(model, tokenizer, "model.gguf", qtype="q8_0")   # (herd.checkpoint.gguf; `herd export`)

Loading builds the model on the meta device and assigns memory-mapped tensors to it, so it needs
about 1x the weights' memory (see herd.checkpoint.common). Saving writes into a temporary folder
next to the target and renames it into place, so a crash never leaves half a checkpoint. The
tokenizer, when given, is copied beside the weights as tokenizer.model in every format;
`find_tokenizer` finds it again (also under original/, as on the Hugging Face hub).
"""

from __future__ import annotations

from pathlib import Path

import torch

from herd.checkpoint import gguf, hf, meta, native
from herd.checkpoint.common import atomic_folder, copy_tokenizer, parse_dtype
from herd.checkpoint.detect import FORMATS, detect_format, find_tokenizer
from herd.checkpoint.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer

__all__ = ["load_checkpoint", "save_checkpoint", "load_args", "find_tokenizer", "detect_format",
           "hf_config", "to_hf_state_dict", "from_hf_state_dict", "FORMATS"]

_MODULES = {"herd": native, "hf": hf, "meta": meta, "gguf": gguf}


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | str | None = None) -> Transformer:
    """Load a herd, Hugging Face, Meta or GGUF checkpoint (detected from its files) as a model in eval mode.

    dtype None keeps the stored dtype; otherwise each tensor is converted as it is loaded.
    """
    fmt, folder = detect_format(path)
    return _MODULES[fmt].load(folder, device=device, dtype=parse_dtype(dtype))


def load_args(path: str | Path) -> ModelArgs:
    """The ModelArgs of a checkpoint without reading its weights (Meta: tie inferred from params only)."""
    fmt, folder = detect_format(path)
    return _MODULES[fmt].load_args(folder)


def save_checkpoint(model: Transformer, path: str | Path, format: str = "herd", shards: int = 1,
                    tokenizer_path: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write `model` to folder `path` in `format` ("herd", "hf" or "meta"), atomically.

    shards: number of weight files (Meta: model-parallel shards; herd/hf: safetensors shards +
    index). tokenizer_path: a tokenizer.model to copy beside the weights. overwrite: replace an
    existing checkpoint folder. Returns the folder.
    """
    if format == "gguf":
        raise HerdError("GGUF is written by `herd export` (herd.checkpoint.gguf.write_gguf), which also needs the "
                        "tokenizer and a quantization type.")
    if getattr(model, "quantization", None) is not None and format != "herd":
        raise HerdError(f"a quantized model can only be saved in herd's own format, not '{format}'; save the "
                        "float model, or use `herd export` for llama.cpp's quantized GGUF.")
    if format not in FORMATS:
        raise HerdError(f"unknown checkpoint format '{format}'; use one of: {', '.join(FORMATS)}.")
    if not isinstance(shards, int) or shards < 1:
        raise HerdError(f"shards must be a positive integer, got {shards!r}.")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise HerdError("the model is on the meta device (no weights); initialize or load it before saving.")
    path = Path(path)
    with atomic_folder(path, overwrite=overwrite) as tmp:
        with torch.no_grad():
            _MODULES[format].save(model, tmp, shards=shards)
        copy_tokenizer(tokenizer_path, tmp)
    return path
