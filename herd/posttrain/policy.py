"""The model a post-training loop trains (or holds frozen): loaded from --init-from, with optional
LoRA adapters, built straight into its parallel layout.

    args = policy_args(cfg.init_from)
    model = load_policy(cfg.init_from, args, mesh, device, lora=cfg.lora_config(), seed=cfg.seed)
    ref = load_policy(cfg.init_from, args, mesh, device, trainable=False)     # DPO's frozen reference

The model is built on the meta device, adapters are added there (so the parallel plans see the
final module tree), it is parallelized (TP -> activation checkpointing -> compile -> FSDP2, as
herd.parallel does for pre-training), and only then are the local shards allocated and filled:
the base weights from the memory-mapped checkpoint, each rank copying its slices; the adapters
with peft's init (A kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B zero)
drawn in full from one seeded generator, one tensor at a time in parameter order, each rank
keeping its slice. So one process and any FSDP layout start from the very same weights, and
train the same way.

A LoRA base may be held in bf16 (lora_base_dtype): the frozen weights are converted as they are
copied, the adapters stay float32. With int8 the block linear layers (wq ... w3) become int8
weight-only layers (herd.quant, per-channel scales, QLoRA-style), quantized from the checkpoint's
float weights as they load; embeddings, norms and the output layer stay float32. LoRA under tensor parallel is not supported (the TP plans
shard the plain linear layers the adapters wrap).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from herd.errors import ConfigError, HerdError
from herd.model import ModelArgs, Transformer
from herd.parallel import load_full_state_dict, parallelize
from herd.posttrain.lora import LoRAConfig, apply_lora, base_dtype


def policy_args(init_from: str | Path, **overrides: Any) -> ModelArgs:
    """The checkpoint's architecture (read without its weights), with ModelArgs overrides."""
    from herd.checkpoint import load_args

    if not Path(init_from).exists():
        raise HerdError(f"--init-from {init_from} does not exist; pass a herd, Hugging Face or Meta checkpoint folder.")
    args = load_args(init_from)
    try:
        return replace(args, **overrides) if overrides else args
    except ConfigError as e:
        raise HerdError(str(e)) from None


def _base_name(name: str) -> str:
    """The checkpoint name of a parameter: layers.0.attention.wq.base.weight -> layers.0.attention.wq.weight."""
    return name.replace(".base.", ".")


def load_policy(init_from: str | Path, args: ModelArgs, mesh: DeviceMesh | None, device: torch.device | str, *,
                lora: LoRAConfig | None = None, trainable: bool = True, seed: int = 0, tp: int = 1,
                compile: bool = False, activation_checkpointing: bool = False,
                mixed_precision: str = "fp32", weights: dict[str, Tensor] | None = None,
                build: Callable[[ModelArgs], Transformer] = Transformer,
                also_train: tuple[str, ...] = ()) -> Transformer:
    """Build the (possibly sharded) model of `init_from` with `args`; see the module docstring.

    lora: adapters to add (lora_rank > 0); only they train. trainable=False freezes every weight
    (a reference model). weights: the checkpoint's state dict when the caller already holds it
    (default: memory-mapped from init_from). mixed_precision: FSDP2's parameter dtype (dp > 1).
    build: the module to build from args (a Transformer subclass, e.g. herd.posttrain.reward.RewardModel,
    whose extra parameters `weights` must then hold). also_train: name prefixes of parameters that train
    next to LoRA adapters (a reward model's new "score." head).
    """
    device = torch.device(device)
    use_lora = lora is not None and lora.lora_rank > 0
    if use_lora and tp > 1:
        raise HerdError(f"LoRA under tensor parallel (tp={tp}) is not supported; use data parallel (FSDP2) "
                        "or full fine-tuning.")
    with torch.device("meta"):
        model = build(args)
    int8 = use_lora and lora.lora_base_dtype == "int8"
    if use_lora:
        model.to(base_dtype(lora.lora_base_dtype, device))  # the frozen base; adapters below stay float32
        if int8:  # every block linear becomes an (empty) int8 weight-only layer, filled after loading
            from herd.quant import QuantConfig, quantize_model

            quantize_model(model, QuantConfig(method="int8", output="none"), empty=True)
        apply_lora(model, lora)
        for name, module in model.named_modules():
            if also_train and name and (name + ".").startswith(also_train):
                module.float().requires_grad_(True)  # trains like the adapters: float32 on any base dtype
    if not trainable:
        model.requires_grad_(False)
    parallelize(model, mesh, tp=tp, compile=compile, activation_checkpointing=activation_checkpointing,
                mixed_precision=mixed_precision)
    if weights is None:
        from herd.checkpoint import load_checkpoint

        weights = load_checkpoint(init_from).state_dict()  # memory-mapped where the format allows
    model.to_empty(device=device)
    full = _full_tensors(model, weights, seed)
    load_full_state_dict(model, full)
    if int8:
        _fill_int8(model, weights)
    model.reset_buffers()
    return model


@torch.no_grad()
def _fill_int8(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Quantize each int8 layer's float checkpoint weight into its buffers (whole on every rank: FSDP2
    shards parameters, and these are buffers)."""
    from herd.quant.int8 import Int8Linear, aligned, quantize_int8

    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            q, scale = quantize_int8(weights[_base_name(name + ".weight")])
            module.weight_int8 = aligned(q.to(module.weight_int8.device))
            module.scale = aligned(scale.to(module.scale.device))


def _full_tensors(model: nn.Module, weights: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Every parameter of `model` as a full tensor: the checkpoint's, or a fresh adapter init."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            full = torch.zeros(p.shape, dtype=torch.float32)
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform(a=sqrt(5)) on [r, in]
                full.uniform_(-bound, bound, generator=gen)
            out[name] = full
            continue
        key = _base_name(name)
        if key not in weights:
            raise HerdError(f"the checkpoint has no '{key}'; fine-tune a checkpoint of the architecture its "
                            "config describes.")
        out[name] = weights[key]
    return out


def trainable_parameters(model: nn.Module) -> int:
    """Elements of the parameters that train (global counts for sharded DTensors)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
