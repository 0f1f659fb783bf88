"""quantize_model: turn a herd Transformer's linear layers into int8 / int4 weight-only layers.

A model transform, not a model variant: model.py stays float, and this replaces modules in place.

    quantize_model(model, QuantConfig(method="int8"))       # or quantize_model(model, "int4")

What is quantized: every linear layer of the transformer blocks (wq, wk, wv, wo, w1, w2, w3) with
`method`, and the output layer as `output` says. A tied model (Llama 3.2, herd presets) gets its
own quantized output layer next to the float embedding. The embedding always stays in float: a
lookup reads one row per token, so quantizing it saves memory but no decode time.

The config is kept on the model (`model.quantization`) so herd's checkpoint format can record it
and rebuild the same structure before loading, without re-quantizing (`quantize_model(..., empty=True)`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from herd.errors import HerdError
from herd.quant.int4 import GROUP_SIZES, Int4Linear, check_int4_shape
from herd.quant.int8 import Int8Linear

METHODS = ("int8", "int4")
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
"""The linear layers of a transformer block, by Meta's names."""


@dataclass
class QuantConfig:
    """How `quantize_model` stores the weights."""

    method: str = "int8"
    """Transformer-block linear layers: int8 (per-channel, weight-only) or int4 (group-wise, weight-only)."""
    group_size: int = 128
    """int4 only: weights per scale/zero group (32, 64, 128 or 256); smaller is more accurate and larger."""
    output: str = "int8"
    """The output layer: int8, int4, or none (kept in float, the most accurate)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise HerdError(f"unknown quantization '{self.method}'; use int8 or int4.")
        if self.output not in METHODS + ("none",):
            raise HerdError(f"unknown output quantization '{self.output}'; use int8, int4 or none.")
        if "int4" in (self.method, self.output) and self.group_size not in GROUP_SIZES:
            raise HerdError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}.")

    def to_dict(self) -> dict:
        return asdict(self)


def _make(method: str, weight: torch.Tensor, group_size: int, empty: bool, name: str) -> nn.Module:
    out_features, in_features = weight.shape
    if method == "int4":
        problem = check_int4_shape(in_features, out_features, group_size)
        if problem:
            raise HerdError(f"cannot quantize {name} to int4: {problem}; use --quantize int8 or another group size.")
        if empty:
            return Int4Linear(in_features, out_features, group_size, device="meta")
        return Int4Linear.from_float(weight, group_size)
    return Int8Linear(in_features, out_features, device="meta") if empty else Int8Linear.from_float(weight)


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig | str = "int8", *, empty: bool = False) -> nn.Module:
    """Replace model's linear layers by quantized ones as `config` says; returns the same model.

    empty=True builds the quantized structure with empty (meta) buffers, for loading a saved
    quantized checkpoint into. A model that is already quantized raises HerdError.
    """
    if isinstance(config, str):
        config = QuantConfig(method=config)
    if getattr(model, "quantization", None) is not None:
        raise HerdError("this model is already quantized; load the float checkpoint to quantize it another way.")
    for block_name, block in model.layers.named_children():
        for path in LINEARS:
            parent_name, child_name = path.split(".")
            parent = getattr(block, parent_name)
            child = getattr(parent, child_name)
            full = f"layers.{block_name}.{path}"
            if not isinstance(child, nn.Linear):
                raise HerdError(f"{full} is a {type(child).__name__}, not a plain linear layer; merge adapters into the "
                                "model first (herd merge-lora), then quantize.")
            setattr(parent, child_name, _make(config.method, child.weight, config.group_size, empty, full))
    if config.output != "none":
        if model.output is not None and not isinstance(model.output, nn.Linear):
            raise HerdError(f"the output layer is a {type(model.output).__name__}, not a plain linear layer; merge "
                            "adapters into the model first (herd merge-lora), then quantize.")
        weight = model.tok_embeddings.weight if model.output is None else model.output.weight
        model.output = _make(config.output, weight, config.group_size, empty, "the output layer")
    model.quantization = config
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer except the embedding table
    (one row per token) and the RoPE table, counted at their stored size (int4 at half a byte)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("tok_embeddings.") and getattr(model, "output", None) is not None:
            continue
        if name == "rope_inv_freq":
            continue
        total += t.numel() * t.element_size()
    return total
