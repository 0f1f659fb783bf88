"""The end of a post-training run: the trained policy written to OUT in formats other tools read.

    full fine-tuning   OUT/final     the weights in --export-format (herd, hf, meta) + tokenizer.model
    LoRA               OUT/adapter   peft's layout (adapter_config.json + adapter_model.safetensors,
                                     Hugging Face module names) + tokenizer.model; peft loads it on
                                     the transformers model, `herd generate --adapter` on herd's
                       OUT/final     with merge: the --init-from weights, read again in their stored
                                     dtype, with the adapters added in float32 (as `herd merge-lora`)

Works on a plain model in one process and on a sharded one under torchrun (every rank calls;
the full tensors are gathered to rank 0, which writes). Each folder is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from herd.model import ModelArgs, Transformer
from herd.parallel import barrier, is_main
from herd.posttrain.lora import LoRAConfig, apply_lora, load_lora_state_dict, merge_lora, target_modules, wrap_modules
from herd.train.artifacts import export_final
from herd.train.state import unwrap


def gathered_adapters(model: nn.Module) -> dict[str, Tensor] | None:
    """The full LoRA A/B tensors (herd names, on the CPU) on rank 0, None elsewhere (a collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(unwrap(model), options=options)
    if not is_main():
        return None
    return {k: v.detach().float() for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def adapter_model(args: ModelArgs, lora: LoRAConfig, adapters: dict[str, Tensor]) -> Transformer:
    """A model whose adapters hold `adapters` and whose base stays on the meta device (for save_adapter)."""
    with torch.device("meta"):
        model = Transformer(args)
        apply_lora(model, lora)
    model.load_state_dict(adapters, strict=False, assign=True)
    return model


def export_policy(model: nn.Module, args: ModelArgs, out: Path, *, init_from: str | Path, export_format: str,
                  tokenizer_path: str | Path | None, lora: LoRAConfig | None = None,
                  merge: bool = False) -> dict[str, str]:
    """Write the run's export folders (see the module docstring); returns {"final": ..., "adapter": ...}."""
    out = Path(out)
    if lora is None or lora.lora_rank < 1:
        return {"final": str(export_final(model, args, out / "final", export_format, tokenizer_path))}
    from herd.checkpoint import load_checkpoint, save_checkpoint
    from herd.posttrain.adapter import save_adapter

    adapters = gathered_adapters(model)
    paths = {"adapter": str(out / "adapter")}
    if merge:
        paths["final"] = str(out / "final")
    if adapters is not None:
        save_adapter(adapter_model(args, lora, adapters), out / "adapter", base_model=str(init_from), overwrite=True,
                     tokenizer_path=tokenizer_path)
        if merge:
            base = load_checkpoint(init_from)
            wrap_modules(base, target_modules(base, lora.lora_targets), lora.lora_rank, lora.lora_alpha,
                         rslora=lora.lora_rslora)
            load_lora_state_dict(base, adapters)
            merge_lora(base)
            save_checkpoint(base, out / "final", format=export_format, tokenizer_path=tokenizer_path, overwrite=True)
    barrier()
    return paths
