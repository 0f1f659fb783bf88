"""Flat configs of the post-training loops: FinetuneConfig (what every loop shares) and SFTConfig.

    FinetuneConfig   the run, the policy (--init-from, optional LoRA), optimizer and schedule,
                     parallel layout, logging, eval samples, checkpoints and export; the reward
                     model, DPO and PPO loops add their own fields on top, as SFTConfig does.
    SFTConfig        FinetuneConfig + the chat data (SFTDataConfig) + packing.

Each is one flat dataclass (fields inherited, not nested), so `herd sft --help` lists every
flag and the resolved config is saved in every checkpoint.

Fine-tuning defaults, where they come from:
  lr 1e-5 (full)      the Llama 3 paper's SFT learning rate (arXiv:2407.21783, section 4.1.3);
  lr 2e-4 (LoRA)      QLoRA's for 7B-13B models (arXiv:2305.14314, hyperparameter appendix):
                      adapters start at zero and need larger steps than full weights;
  cosine, 3% warm-up  Stanford Alpaca's fine-tuning recipe (github.com/tatsu-lab/stanford_alpaca, README);
  AdamW (0.9, 0.999), weight decay 0, clipping at 1.0: the defaults of transformers'
                      TrainingArguments, which TRL's SFTTrainer runs on. Decay, when set, never
                      applies to norms or embeddings (herd.train.optim).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from herd.errors import HerdError
from herd.posttrain.dataset import SFTDataConfig
from herd.posttrain.lora import LoRAConfig
from herd.train.optim import lr_at

FULL_LR = 1e-5
LORA_LR = 2e-4
SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class FinetuneConfig(LoRAConfig):
    """Settings every post-training loop shares. Steps count optimizer updates; batch sizes count rows."""

    init_from: str = ""
    """Checkpoint to fine-tune (herd, Hugging Face or Meta folder); required."""
    tokenizer: str = ""
    """tokenizer.model to use; empty = the one beside --init-from (a different one is refused)."""
    out: str = "runs/sft"
    """Run directory: checkpoints/, log.jsonl, tensorboard/, data_report.json, loss.png and the export go here."""
    resume: bool = False
    """Continue from the newest checkpoint in OUT/checkpoints; flags not given keep the run's saved values."""
    seed: int = 0
    """Seed of the validation split, the batch order and the LoRA init (same seed + data = same run)."""
    steps: int = 0
    """Total optimizer steps; 0 = as many as --epochs passes over the training rows take."""
    epochs: float = 1.0
    """Passes over the training rows when --steps is 0."""
    stop_at: int = 0
    """Stop after this step with a checkpoint, keeping the schedule (split a run into jobs; continue with --resume)."""
    batch_size: int = 8
    """Global batch in rows (packed sequences) per optimizer step, over all data-parallel ranks and micro-steps."""
    micro_batch_size: int = 0
    """Rows per forward/backward on one rank; 0 = the whole local batch (no accumulation)."""
    lr: float = 0.0
    """Peak learning rate; 0 = 1e-5 for full fine-tuning, 2e-4 for LoRA."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of the peak."""
    warmup_ratio: float = 0.03
    """Linear warm-up over this fraction of the steps (at least one step)."""
    schedule: str = "cosine"
    """Decay after warm-up: cosine, wsd (warmup-stable-decay) or constant."""
    decay_fraction: float = 0.2
    """wsd: fraction of the steps spent in the final linear decay."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on matrices (never on norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    loss_chunk: int = 4096
    """Tokens per cross-entropy slice (the [tokens, vocab] logits never exist at once); 0 = one slice."""
    mixed_precision: str = "auto"
    """Compute dtype: bf16 (autocast / FSDP param dtype), fp32, or auto (bf16 on GPU, fp32 on CPU)."""
    compile: bool = False
    """torch.compile each transformer block."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    dp: int = 0
    """Data-parallel ranks (FSDP2); 0 = world size // tp."""
    tp: int = 1
    """Tensor-parallel ranks (full fine-tuning only); must divide the head counts."""
    device: str = "auto"
    """cpu, cuda, or auto (the GPU when there is one)."""
    threads: int = 0
    """CPU threads for torch ops; 0 = pick the fastest count for the machine's current load (herd.threads)."""
    log_every: int = 10
    """Console progress line every N steps (log.jsonl and TensorBoard get every step)."""
    eval_every: int = 50
    """Validation loss and sampled replies every N steps (and at the end); 0 = only at the end."""
    eval_on_start: bool = True
    """Also evaluate before the first step (the starting point of the curve and of the replies)."""
    eval_batches: int = 0
    """Global batches of the validation rows per evaluation; 0 = all of them."""
    sample_prompts: int = 3
    """Held-out prompts answered greedily at each evaluation; 0 = none."""
    sample_tokens: int = 64
    """Longest sampled reply in tokens."""
    checkpoint_every: int = 100
    """Save a resumable checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Keep the newest K checkpoints."""
    export_format: str = "herd"
    """Format of OUT/final: herd, hf or meta."""
    merge: bool = False
    """LoRA: also write OUT/final, the base with the adapter merged in (OUT/adapter is always written)."""
    nan_policy: str = "skip"
    """On a NaN/inf loss or gradient, or a loss spike: skip the step, or stop naming the step and batch."""
    spike_factor: float = 0.0
    """A loss above this multiple of its running average counts as a spike; 0 = no spike check."""
    max_skips: int = 5
    """Stop after this many skipped steps in a row."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s for MFU; 0 = a table for known GPUs, a measured matmul peak on CPU."""
    tensorboard: bool = True
    """Write TensorBoard event files to OUT/tensorboard."""

    @property
    def lora(self) -> bool:
        """Whether adapters train (lora_rank > 0) rather than every weight."""
        return self.lora_rank > 0

    @property
    def peak_lr(self) -> float:
        return self.lr or (LORA_LR if self.lora else FULL_LR)

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(**{f.name: getattr(self, f.name) for f in fields(LoRAConfig)})

    def total_steps(self, rows: int) -> int:
        """--steps, or the steps --epochs passes over `rows` training rows take."""
        return self.steps or max(1, math.ceil(self.epochs * rows / self.batch_size))

    def warmup_steps(self, total: int) -> int:
        return max(1, math.ceil(self.warmup_ratio * total)) if self.warmup_ratio > 0 else 0

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of optimizer step `step` (0-based) of `total` (herd.train.optim.lr_at)."""
        return lr_at(step, peak=self.peak_lr, total=total, warmup=self.warmup_steps(total), schedule=self.schedule,
                     min_lr_ratio=self.min_lr_ratio, decay_fraction=self.decay_fraction)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """HerdError for settings that cannot work, before anything is built or written."""
        if not self.init_from:
            raise HerdError("no model to fine-tune; pass --init-from with a herd, Hugging Face or Meta checkpoint folder.")
        if self.steps < 0 or self.epochs <= 0:
            raise HerdError(f"--steps must be >= 0 and --epochs > 0, got {self.steps} and {self.epochs}.")
        if self.batch_size < 1 or self.micro_batch_size < 0:
            raise HerdError("--batch-size must be positive and --micro-batch-size >= 0.")
        if self.lr < 0 or not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise HerdError("--lr must be >= 0, --warmup-ratio in [0, 1) and --min-lr-ratio in [0, 1].")
        for name, value, allowed in (("schedule", self.schedule, SCHEDULES), ("nan-policy", self.nan_policy, ("skip", "stop")),
                                     ("mixed-precision", self.mixed_precision, ("auto", "bf16", "fp32")),
                                     ("export-format", self.export_format, ("herd", "hf", "meta"))):
            if value not in allowed:
                raise HerdError(f"unknown --{name} '{value}'; use one of: {', '.join(allowed)}.")
        if self.lora:
            self.lora_config().validate()
            if self.tp > 1:
                raise HerdError(f"LoRA under tensor parallel (--tp {self.tp}) is not supported; use --dp for "
                                "data parallel (FSDP2), or full fine-tuning with --tp.")
        elif self.merge:
            raise HerdError("--merge folds LoRA adapters into the base; without --lora-rank there is nothing to merge "
                            "(full fine-tuning always exports OUT/final).")


@dataclass
class SFTConfig(FinetuneConfig, SFTDataConfig):
    """`herd sft`: supervised fine-tuning on chat data (every field is a flag)."""

    packing: bool = True
    """Pack several examples into each row of max_seq_len positions (attention and positions stay per example)."""

    def data_config(self) -> SFTDataConfig:
        return SFTDataConfig(**{f.name: getattr(self, f.name) for f in fields(SFTDataConfig)})

    def validate(self) -> None:
        FinetuneConfig.validate(self)
        self.data_config().validate()
