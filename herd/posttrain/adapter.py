"""LoRA adapters on disk in peft's layout, so peft loads herd's adapters and herd loads peft's.

    FOLDER/adapter_config.json         peft's LoraConfig: peft_type LORA, r, lora_alpha, use_rslora,
                                       target_modules (q_proj, v_proj, ...), ...
    FOLDER/adapter_model.safetensors   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight [r, in]
                                       base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight [out, r]
                                       ... base_model.model.lm_head.lora_A.weight for the output layer

Names map to herd's as the Hugging Face checkpoint format does (herd.checkpoint.hf). Hugging Face
orders the rows of q_proj / k_proj differently within each head (its RoPE rotates halves, Meta's
adjacent pairs), and a LoRA update B @ A lives in the same rows as its weight, so B of wq / wk is
row-permuted the same way on the way out and back; A is not.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from herd import fileio
from herd.checkpoint.common import copy_tokenizer, read_json, read_safetensors, write_safetensors
from herd.checkpoint.hf import from_hf_rows, herd_name, hf_name, to_hf_rows
from herd.errors import HerdError
from herd.posttrain.lora import BLOCK_TARGETS, LoRALinear, load_lora_state_dict, lora_modules, mark_only_lora_trainable, wrap_modules

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass
class AdapterSpec:
    """What an adapter folder holds, in herd's terms."""

    modules: list[str]
    """herd module names it adapts (layers.0.attention.wq, ..., output)."""
    rank: int
    alpha: float
    dropout: float
    rslora: bool
    base_model: str | None
    """base_model_name_or_path from the config (where the adapter says it belongs)."""


def _settings(modules: dict[str, LoRALinear]) -> tuple[int, float, float, bool]:
    firsts = {(m.rank, m.alpha, m.rslora, getattr(m.lora_dropout, "p", 0.0)) for m in modules.values()}
    if len(firsts) != 1:
        raise HerdError("the adapters of this model have different ranks or alphas; peft's single LoraConfig "
                        "cannot describe that, so save adapters made with one LoRA setting.")
    rank, alpha, rslora, dropout = firsts.pop()
    return rank, alpha, float(dropout), rslora


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's adapters in peft's names and Hugging Face's row order."""
    out = {}
    for name, m in lora_modules(model).items():
        hf = hf_name(name + ".weight").removesuffix(".weight")
        out[f"{_PREFIX}{hf}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{_PREFIX}{hf}.lora_B.weight"] = to_hf_rows(m.lora_B.weight.detach(), name + ".weight", model.args)
    return out


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model: str | None = None,
                 overwrite: bool = False, tokenizer_path: str | os.PathLike | None = None) -> Path:
    """Write the model's LoRA adapters as a peft adapter folder (atomically); returns the folder.

    tokenizer_path: a tokenizer.model to copy beside them (peft ignores it; herd finds it there).
    """
    modules = lora_modules(model)
    if not modules:
        raise HerdError("the model has no LoRA adapters to save; apply_lora or load_adapter first.")
    if any(m.merged for m in modules.values()):
        raise HerdError("the adapters are merged into the weights; unmerge_lora before saving them.")
    rank, alpha, dropout, rslora = _settings(modules)
    targets = sorted({hf_name(n + ".weight").removesuffix(".weight").rsplit(".", 1)[-1] for n in modules})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": dropout,
        "use_rslora": rslora, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    folder = Path(folder)
    tensors = {k: v.contiguous() for k, v in adapter_tensors(model).items()}
    with fileio.atomic_folder(folder, overwrite=overwrite, replaceable=lambda d: (d / CONFIG).is_file()) as tmp:
        write_safetensors(tmp / WEIGHTS, tensors, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer(tokenizer_path, tmp)
    return folder


def check_adapter_config(cfg: dict[str, Any], path: Path) -> None:
    """HerdError naming what herd's LoRA does not support in a peft adapter_config.json."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise HerdError(f"{path} describes a {cfg.get('peft_type')} adapter; herd loads LoRA adapters only.")
    unsupported = [k for k in ("use_dora", "use_qalora", "lora_bias") if cfg.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                                "trainable_token_indices") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']}")
    if cfg.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out")
    if unsupported:
        raise HerdError(f"{path} uses {', '.join(unsupported)}, which herd's LoRA does not support; "
                        "train the adapter with plain LoRA settings.")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1 or not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise HerdError(f"{path} has no valid 'r' and 'lora_alpha'; it is not a complete peft LoRA config.")


def read_adapter(folder: str | os.PathLike, args: Any) -> tuple[AdapterSpec, dict[str, Tensor]]:
    """An adapter folder's settings and its tensors in herd names and row order (float32)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise HerdError(f"{folder} is not a LoRA adapter folder (needs {CONFIG} and {WEIGHTS}); pass the folder "
                        "herd's save_adapter or peft's save_pretrained wrote.")
    cfg = read_json(folder / CONFIG)
    check_adapter_config(cfg, folder / CONFIG)
    state: dict[str, Tensor] = {}
    modules: list[str] = []
    for key, t in read_safetensors(folder / WEIGHTS).items():
        m = _KEY.match(key)
        if m is None:
            if key.endswith(".base_layer.weight"):  # peft also stores targeted output/embedding base weights
                continue
            raise HerdError(f"{folder / WEIGHTS} holds '{key}', which is not a LoRA A/B matrix; herd loads plain "
                            "LoRA adapters only.")
        hf_module, which = m.group(1).removeprefix(_PREFIX), m.group(2)
        herd = herd_name(hf_module + ".weight")
        if herd is None or herd.endswith(("norm.weight", "tok_embeddings.weight")):
            raise HerdError(f"the adapter targets '{hf_module}', which is not a linear layer of herd's Llama; "
                            "use an adapter trained on a Llama model.")
        module = herd.removesuffix(".weight")
        if module not in modules:
            modules.append(module)
        t = t.float()
        state[f"{module}.lora_{which}.weight"] = from_hf_rows(t, herd, args) if which == "B" else t
    if not modules:
        raise HerdError(f"{folder / WEIGHTS} holds no LoRA matrices; re-save the adapter.")
    modules.sort(key=_model_order)
    for module in modules:
        if f"{module}.lora_A.weight" not in state or f"{module}.lora_B.weight" not in state:
            raise HerdError(f"{folder / WEIGHTS} has only one of lora_A / lora_B for {module}; re-save the adapter.")
    rank = int(cfg["r"])
    spec = AdapterSpec(modules=modules, rank=rank, alpha=float(cfg["lora_alpha"]),
                       dropout=float(cfg.get("lora_dropout") or 0.0), rslora=bool(cfg.get("use_rslora")),
                       base_model=cfg.get("base_model_name_or_path"))
    for module in modules:
        got = state[f"{module}.lora_A.weight"].shape[0]
        if got != rank:
            raise HerdError(f"{folder / WEIGHTS}: {module} has rank {got} but {CONFIG} says r={rank}; re-save the adapter.")
    return spec, state


def load_adapter(model: nn.Module, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> dict[str, LoRALinear]:
    """Add the adapters of a peft-layout folder to a herd model (unmerged); returns the wrapped modules.

    The base stays frozen; the adapters are trainable (resume training) and cost a few small
    matmuls per layer at inference. merge_lora folds them in for full speed.
    """
    spec, state = read_adapter(folder, model.args)
    if "output" in spec.modules and getattr(model, "output", None) is None:
        raise HerdError(f"the adapter in {folder} adapts the output layer, but this model ties it to the "
                        "embedding; use the untied base model it was trained on.")
    missing = [m for m in spec.modules if not _has_module(model, m)]
    if missing:
        raise HerdError(f"the adapter in {folder} adapts {missing[0]}, which this model does not have "
                        f"({model.args.n_layers} layers); use the base model it was trained on.")
    modules = wrap_modules(model, spec.modules, spec.rank, spec.alpha, spec.dropout, spec.rslora, dtype)
    load_lora_state_dict(model, state)
    mark_only_lora_trainable(model)
    return modules


def _model_order(module: str) -> tuple[int, int]:
    """Sort key: blocks in order, inside a block wq wk wv wo w1 w2 w3; the output layer last."""
    if module == "output":
        return (1 << 30, 0)
    _, layer, rest = module.split(".", 2)
    return (int(layer), list(BLOCK_TARGETS.values()).index(rest))


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), nn.Linear)
    except AttributeError:
        return False
