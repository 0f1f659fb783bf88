"""herd's own checkpoint format: the resolved ModelArgs in herd.json + weights in safetensors.

    herd.json            {"format": "herd", "version": 1, "model_args": {...every ModelArgs field...},
                          "dtype": "bfloat16", "quantization": {...QuantConfig...} (quantized models only)}
    model.safetensors    Meta's parameter names (tok_embeddings, layers.N.attention.wq, ...), or
                         model-0000i-of-0000n.safetensors + model.safetensors.index.json

No name map and no permutation: the tensors are exactly the model's state_dict. A model quantized
by herd.quant is stored as its int8 / int4 buffers (layers.N.attention.wq.weight_int8, .scale, ...)
and loads back into the same structure without re-quantizing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from herd.checkpoint.common import (dtype_name, meta_model, model_from_state_dict, read_json,
                                    read_safetensors_folder, write_safetensors_shards)
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer

VERSION = 1


def load_args(folder: Path) -> ModelArgs:
    """The ModelArgs recorded in herd.json."""
    meta = read_json(folder / "herd.json")
    if not isinstance(meta.get("model_args"), dict):
        raise HerdError(f"{folder / 'herd.json'} has no 'model_args' object; regenerate the checkpoint.")
    try:
        return ModelArgs.from_dict(meta["model_args"])
    except (TypeError, ValueError) as e:
        raise HerdError(f"{folder / 'herd.json'} has invalid model_args ({e}); fix that file.") from None


def load(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    args = load_args(folder)
    state = read_safetensors_folder(folder)
    quant = read_json(folder / "herd.json").get("quantization")
    if quant is not None:
        return _load_quantized(args, quant, state, folder, device, dtype)
    return model_from_state_dict(args, state, device, dtype, source=str(folder))


def _load_quantized(args: ModelArgs, quant: dict, state: dict, folder: Path, device: torch.device | str,
                    dtype: torch.dtype | None) -> Transformer:
    """A quantized model: rebuild its structure from the recorded QuantConfig, then assign the stored buffers
    (float tensors converted to `dtype`; the int8 / int4 weights and their bf16 scales kept as stored)."""
    from herd.quant import QuantConfig, quantize_model

    try:
        config = QuantConfig(**quant)
    except TypeError as e:
        raise HerdError(f"{folder / 'herd.json'} has an invalid 'quantization' record ({e}); regenerate the checkpoint.") from None
    model = quantize_model(meta_model(args), config, empty=True)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise HerdError(f"{folder} does not match its quantization record (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); regenerate the checkpoint.")
    loaded = {}
    for k, ref in expected.items():
        t = state.pop(k)
        if tuple(t.shape) != tuple(ref.shape) or t.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise HerdError(f"tensor '{k}' in {folder} has shape {list(t.shape)} ({t.dtype}) but the quantized "
                            f"model expects {list(ref.shape)} ({ref.dtype}); regenerate the checkpoint.")
        scale_like = ref.dtype == torch.bfloat16 and k.endswith((".scale", ".scales_zeros"))
        loaded[k] = t.to(device=device, dtype=dtype if dtype and t.is_floating_point() and not scale_like else t.dtype)
    model.load_state_dict(loaded, assign=True, strict=True)
    model.reset_buffers()
    for module in model.modules():
        if hasattr(module, "_use_cpu_layout"):
            module._use_cpu_layout()  # int4 on CPU: re-tile for the kernel (assign bypassed _apply)
    return model.eval()


def save(model: Transformer, folder: Path, shards: int = 1) -> None:
    """Write `model` into an (empty, temporary) folder."""
    state = {k: v for k, v in model.state_dict().items()}
    dtype = model.tok_embeddings.weight.dtype
    write_safetensors_shards(folder, state, shards, metadata={"format": "pt"})
    meta = {"format": "herd", "version": VERSION, "model_args": model.args.to_dict(), "dtype": dtype_name(dtype)}
    quant = getattr(model, "quantization", None)
    if quant is not None:
        meta["quantization"] = quant.to_dict()
    (folder / "herd.json").write_text(json.dumps(meta, indent=2) + "\n")
