"""LoRA: low-rank adapters on a frozen herd model, with peft's update rule.

    apply_lora(model, LoRAConfig(lora_rank=16, lora_alpha=32))   # wraps wq/wk/wv/wo, freezes the rest
    ... train: only lora_A / lora_B have requires_grad ...
    merge_lora(model)                                            # fold into the weights, unwrap

Each targeted nn.Linear (wq, wk, wv, wo, w1, w2, w3 in every block, and/or the output layer)
becomes a LoRALinear holding the original layer as `base` plus lora_A [r, in] and lora_B [out, r]:

    y = base(x) + lora_B(lora_A(dropout(x))) * scaling,   scaling = alpha / r   (rsLoRA: alpha / sqrt(r))

as peft's LoRA layer computes it (peft/tuners/lora/layer.py: A kaiming-uniform with a = sqrt(5),
B zero, so the adapted model starts equal to the base; merge adds (B @ A) * scaling to the
weight). Adapters stay float32 whatever the base dtype (a bfloat16 base halves its memory and has
no gradients or optimizer state); the adapter path runs in float32 and its output is cast back.
The base may also be a frozen int8 weight-only layer (herd.quant.Int8Linear, QLoRA-style: a
quarter of the float32 memory); such an adapter is merged into the float checkpoint, not into it.
The model file is not touched: wrapping replaces modules from outside, so state-dict names gain
".base" (layers.0.attention.wq.base.weight) until merge_lora unwraps them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from herd.errors import HerdError

BLOCK_TARGETS = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
                 "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
"""LoRA target name -> module path inside each transformer block."""
TARGETS = (*BLOCK_TARGETS, "output")
HF_TARGET_NAMES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w1",
                   "down_proj": "w2", "up_proj": "w3", "lm_head": "output"}
"""Hugging Face / peft names accepted as aliases."""
TARGET_GROUPS = {"attention": ["wq", "wk", "wv", "wo"], "mlp": ["w1", "w2", "w3"],
                 "all-linear": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}
"""Shorthands; all-linear is peft's (every linear layer except the output)."""
BASE_DTYPES = ("auto", "fp32", "bf16", "int8")


@dataclass
class LoRAConfig:
    """LoRA settings (flags of `herd sft`); lora_rank 0 means full fine-tuning."""

    lora_rank: int = 0
    """Rank r of the adapters; 0 trains every weight instead (full fine-tuning)."""
    lora_alpha: float = 16.0
    """Scale of the adapter update: alpha / r (alpha / sqrt(r) with --lora-rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input during training."""
    lora_targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    """Layers to adapt: any of wq wk wv wo w1 w2 w3 output (or q_proj ... lm_head, attention, mlp, all-linear)."""
    lora_rslora: bool = False
    """rsLoRA scaling alpha / sqrt(r), which keeps the update size steady as r grows."""
    lora_base_dtype: str = "auto"
    """dtype the frozen base is held in: bf16 (half the memory), int8 (block linear layers int8 weight-only, QLoRA-style), fp32, or auto (bf16 on GPU, fp32 on CPU)."""

    @property
    def scaling(self) -> float:
        return scaling(self.lora_alpha, self.lora_rank, self.lora_rslora)

    def validate(self) -> None:
        """HerdError for settings that cannot work (checked only when LoRA is on)."""
        if self.lora_rank < 0:
            raise HerdError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise HerdError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.lora_base_dtype not in BASE_DTYPES:
            raise HerdError(f"unknown --lora-base-dtype '{self.lora_base_dtype}'; use one of: {', '.join(BASE_DTYPES)}.")
        resolve_targets(self.lora_targets)


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def resolve_targets(names: Iterable[str]) -> list[str]:
    """herd target names (wq ... w3, output) from herd names, peft/HF names and group shorthands."""
    out: list[str] = []
    for name in names:
        name = name.strip()
        found = TARGET_GROUPS.get(name) or ([HF_TARGET_NAMES.get(name, name)])
        for t in found:
            if t not in TARGETS:
                raise HerdError(f"unknown LoRA target '{name}'; use any of {', '.join(TARGETS)} (or "
                                f"{', '.join(HF_TARGET_NAMES)}, {', '.join(TARGET_GROUPS)}).")
            if t not in out:
                out.append(t)
    if not out:
        raise HerdError("--lora-targets is empty; name at least one layer, e.g. wq,wv.")
    return out


def base_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The float dtype to hold a frozen base in: lora_base_dtype resolved for `device` (int8: the
    layers that are not quantized, embeddings, norms and the output layer, stay float32)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}[name]


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: base(x) + B(A(dropout(x))) * scaling."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if rank < 1:
            raise HerdError(f"LoRA rank must be at least 1, got {rank}.")
        # an nn.Linear, or a frozen quantized linear (herd.quant's Int8Linear: int8 buffers, no weight)
        weight = base.weight if isinstance(base, nn.Linear) else next(base.buffers())
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = scaling(alpha, rank, rslora)
        # on the base's device, the meta device included (a model materialized later with to_empty
        # then needs reset_lora_parameters or loaded adapters)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # adapters_disabled(): the base alone (DPO's reference under LoRA)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """peft's default init: A kaiming-uniform (a = sqrt(5), nn.Linear's own), B zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> Tensor:
        """The effective matrix W + (B @ A) * scaling [out, in], differentiable in A and B (W once merged).

        For code that multiplies by the matrix itself rather than calling the layer: the chunked
        loss reads the output layer's (Transformer.output_weight). It costs one [out, in] matrix
        and leaves out the adapter dropout, which acts on inputs only the layer call sees.
        """
        w = self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantize()
        if self.merged or self.disabled:
            return w
        return w + (self.lora_B.weight @ self.lora_A.weight * self.scaling).to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged or self.disabled:
            return out
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling  # [..., out] fp32
        return out + update.to(out.dtype)

    def delta_weight(self) -> Tensor:
        """(B @ A) * scaling, float32 [out, in]: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to the base weight (in float32, rounded once to the base dtype); forward skips the adapter."""
        if not isinstance(self.base, nn.Linear):
            raise HerdError("the adapter sits on a quantized (int8) base, which cannot hold the update; merge it into "
                            "the float checkpoint instead (herd merge-lora BASE ADAPTER OUT).")
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact in float32 up to rounding; a bf16 base loses low bits)."""
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


def target_modules(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Full module names (layers.0.attention.wq, ..., output) of `targets` in a herd Transformer."""
    targets = resolve_targets(targets)
    names = [f"layers.{i}.{BLOCK_TARGETS[t]}" for i in range(len(model.layers)) for t in targets if t != "output"]
    if "output" in targets:
        if getattr(model, "output", None) is None:
            raise HerdError("this model ties its output layer to the token embedding, so LoRA on 'output' would "
                            "untie them; leave output out of --lora-targets.")
        names.append("output")
    return names


def wrap_modules(model: nn.Module, names: Iterable[str], rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.float32) -> dict[str, LoRALinear]:
    """Replace each named linear with a LoRALinear around it; returns them by name."""
    out = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, LoRALinear):
            raise HerdError(f"{name} already has a LoRA adapter; merge or remove it before adding another.")
        if not isinstance(module, nn.Linear) and not _frozen_quantized(module):
            raise HerdError(f"{name} is a {type(module).__name__}, not a linear layer LoRA can adapt.")
        wrapped = LoRALinear(module, rank, alpha, dropout, rslora, dtype)
        setattr(parent, child, wrapped)
        out[name] = wrapped
    return out


def _frozen_quantized(module: nn.Module) -> bool:
    """A weight-only quantized linear layer (herd.quant.Int8Linear): frozen buffers, a dequantize method."""
    return hasattr(module, "dequantize") and hasattr(module, "in_features") and not any(True for _ in module.parameters())


def apply_lora(model: nn.Module, cfg: LoRAConfig, dtype: torch.dtype = torch.float32) -> dict[str, LoRALinear]:
    """Wrap cfg.lora_targets of every block with adapters of dtype `dtype` and freeze everything else."""
    cfg.validate()
    if cfg.lora_rank < 1:
        raise HerdError("apply_lora needs lora_rank >= 1 (0 means full fine-tuning, without adapters).")
    modules = wrap_modules(model, target_modules(model, cfg.lora_targets), cfg.lora_rank, cfg.lora_alpha,
                           cfg.lora_dropout, cfg.lora_rslora, dtype)
    mark_only_lora_trainable(model)
    return modules


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[int]:
    """Within the block every LoRALinear computes its base layer alone (yields how many were turned off).

    DPO with LoRA takes the base with the adapters off as its reference, so the reference needs no
    second copy of the weights. Merged adapters live inside the base weight and cannot be turned off.
    """
    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if any(m.merged for m in modules):
        raise HerdError("the adapters are merged into the base weights and cannot be turned off; unmerge them first.")
    for m in modules:
        m.disabled = True
    try:
        yield len(modules)
    finally:
        for m in modules:
            m.disabled = False


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear modules of a model by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad on lora_A / lora_B only: the base gets no gradients and no optimizer state."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B.")))


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, herd names: layers.0.attention.wq.lora_A.weight, ... (what training saves)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors (herd names) into a model that has the same adapters; HerdError on any mismatch."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise HerdError(f"the adapter does not fit this model: {len(missing)} missing "
                        f"({', '.join(missing[:2]) or '-'}), {len(unexpected)} unexpected "
                        f"({', '.join(unexpected[:2]) or '-'}); use the LoRA settings it was trained with.")
    for k, t in own.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise HerdError(f"adapter tensor '{k}' has shape {list(state[k].shape)} but this model expects "
                            f"{list(t.shape)}; use the base model and rank it was trained with.")
        t.copy_(state[k])


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain layer back; returns how many were merged.

    The model then has exactly its original structure and names (save it in any format).
    """
    modules = lora_modules(model)
    for name, m in modules.items():
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.base)
    return len(modules)


def unmerge_lora(model: nn.Module) -> None:
    """Take merged adapters (LoRALinear.merge) out of the base weights again."""
    for m in lora_modules(model).values():
        m.unmerge()


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by trainable and frozen parameters (shared tensors counted once)."""
    seen: set[int] = set()
    out = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        out["trainable" if p.requires_grad else "frozen"] += p.numel() * p.element_size()
    return out

