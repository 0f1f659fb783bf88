"""TrainConfig: every knob of `herd pretrain`, one flat dataclass (CLI flags are generated from it).

The resolved config is saved inside every checkpoint (train_state.json). A resumed run takes its
settings from there, not from the flag defaults: `--resume` alone continues the run as it was,
and only flags given explicitly override a saved value (`resumed_config`), each one reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from herd.errors import HerdError
from herd.flags import field_default


DEFAULT_PRESET = "herd-1m"
# ModelArgs fields a run may override on top of its preset or --init-from checkpoint: the context
# length and the RoPE frequencies (Llama 3.1-style long-context extension). Shape fields are not
# offered: a loaded model's weights fix them.
MODEL_OVERRIDES = ("max_seq_len", "rope_theta", "use_scaled_rope", "rope_scale_factor", "rope_low_freq_factor",
                   "rope_high_freq_factor", "rope_original_max_seq_len")


@dataclass
class TrainConfig:
    """Pre-training settings. Steps count optimizer updates; batch sizes count sequences."""

    preset: str = ""
    """Model preset (herd.configs.PRESETS) to train from scratch; herd-1m when neither it nor --init-from is given."""
    init_from: str = ""
    """Start from the weights of this checkpoint (herd, Hugging Face or Meta folder) instead of a random init."""
    max_seq_len: int | None = None
    """Override the model's context length (e.g. long-context extension of a loaded model)."""
    rope_theta: float | None = None
    """Override the RoPE base frequency."""
    use_scaled_rope: bool | None = None
    """Override whether Llama 3.1 RoPE frequency scaling is applied."""
    rope_scale_factor: float | None = None
    """Override the Llama 3.1 RoPE scaling factor."""
    rope_low_freq_factor: float | None = None
    """Override the Llama 3.1 RoPE scaling low_freq_factor."""
    rope_high_freq_factor: float | None = None
    """Override the Llama 3.1 RoPE scaling high_freq_factor."""
    rope_original_max_seq_len: int | None = None
    """Override the Llama 3.1 RoPE scaling original context length."""
    data: str = ""
    """Shard directory written by the data pipeline (holds manifest.json, train/ and val/)."""
    out: str = "runs/pretrain"
    """Run directory: checkpoints/, log.jsonl, tensorboard/, loss.png and final/ go here."""
    resume: bool = False
    """Continue from the newest complete checkpoint in OUT/checkpoints (a fresh start if there is none)."""
    tokenizer: str = ""
    """tokenizer.model for samples and the export; default: the copy beside the shards, else the manifest's path (checked by sha256)."""
    seed: int = 0
    """Seed of the weight init and the data order (same seed + data = same run)."""
    steps: int = 200
    """Total optimizer steps (the schedule's horizon)."""
    stop_at: int = 0
    """Stop after this step with a checkpoint, keeping the --steps schedule (split a run into jobs; resume with --resume)."""
    max_minutes: float = 0.0
    """If > 0, shorten the run so it ends in about this many minutes (measured after the first steps)."""
    batch_size: int = 16
    """Global batch in sequences per optimizer step (over all data-parallel ranks and micro-steps)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward on one rank; 0 = the whole local batch (no accumulation)."""
    seq_len: int = 256
    """Training sequence length in tokens."""
    seq_len_stages: str = ""
    """Sequence-length stages as STEP:LEN pairs, e.g. '0:128,500:256' (the paper grows 4K -> 8K)."""
    batch_ramp: str = ""
    """Batch-size ramp as STEP:BATCH pairs, e.g. '0:8,100:16' (the paper doubles the batch twice)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of the peak (the paper decays to 0.1x)."""
    warmup_steps: int = 20
    """Linear warm-up steps from 0 to the peak learning rate."""
    schedule: str = "cosine"
    """Decay after warm-up: cosine (to the floor), wsd (warmup-stable-decay) or constant."""
    decay_fraction: float = 0.2
    """wsd: fraction of the steps spent in the final linear decay to the floor."""
    anneal_steps: int = 0
    """Final annealing: the last N steps take the learning rate linearly to 0 (paper, section 3.4.3)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not on norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    document_mask: bool = True
    """Keep attention inside each packed document (positions restart per document)."""
    loss_chunk: int = 4096
    """Tokens per cross-entropy slice (never builds the whole [tokens, vocab] float32 logits); 0 = one slice."""
    mixed_precision: str = "auto"
    """Compute dtype: bf16 (autocast / FSDP param dtype), fp32, or auto (bf16 on GPU, fp32 on CPU)."""
    compile: bool = False
    """torch.compile each transformer block (inductor; also works on CPU with a C compiler)."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    dp: int = 0
    """Data-parallel ranks (FSDP2); 0 = world size // tp."""
    tp: int = 1
    """Tensor-parallel ranks (DTensor); must divide the head counts."""
    device: str = "auto"
    """cpu, cuda, or auto (the GPU when there is one)."""
    threads: int = 0
    """CPU threads for torch ops; 0 = pick the fastest count for the machine's current load (herd.threads)."""
    log_every: int = 10
    """Console progress line every N steps (log.jsonl and TensorBoard get every step)."""
    eval_every: int = 50
    """Validation loss every N steps (and at the end); 0 = only at the end."""
    eval_batches: int = 4
    """Global batches of the val split per validation (the same windows every time)."""
    sample_every: int = 0
    """Greedy sample generation every M steps (and at the end); 0 = only at the end."""
    sample_tokens: int = 32
    """Tokens generated per sample."""
    sample_prompt: str = "def "
    """Prompt of the sample generations."""
    sample_temperature: float = 0.0
    """Temperature of the samples (top-p 0.95, seeded by --seed); 0 = greedy. Samples end at any special token."""
    checkpoint_every: int = 100
    """Save a resumable checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 3
    """Keep the newest K checkpoints (older ones are deleted after a newer one is complete)."""
    average_checkpoints: int = 0
    """At the end, export the average of the last K checkpoints' weights (Polyak); 0 = the final weights."""
    export_format: str = "herd"
    """Format of OUT/final: herd, hf or meta."""
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_overrides(self) -> dict[str, Any]:
        """The ModelArgs fields this run overrides (those set, not None)."""
        return {k: getattr(self, k) for k in MODEL_OVERRIDES if getattr(self, k) is not None}

    def model_name(self) -> str:
        """What is trained, for log lines: the preset, or the checkpoint it starts from."""
        return self.init_from or self.preset or DEFAULT_PRESET

    def validate(self) -> None:
        """HerdError for settings that cannot work, before anything is built or written."""
        if not self.data:
            raise HerdError("no training data given; pass --data DIR (a shard directory from `herd data run`).")
        if self.preset and self.init_from:
            raise HerdError(f"--preset {self.preset} and --init-from {self.init_from} both choose the model; pass "
                            "one (--init-from takes the architecture from the checkpoint).")
        if self.steps < 1:
            raise HerdError(f"--steps {self.steps} must be at least 1.")
        if self.batch_size < 1 or self.micro_batch_size < 0 or self.seq_len < 1:
            raise HerdError("--batch-size and --seq-len must be positive and --micro-batch-size >= 0.")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise HerdError(f"unknown --schedule '{self.schedule}'; use cosine, wsd or constant.")
        if self.nan_policy not in ("skip", "stop"):
            raise HerdError(f"unknown --nan-policy '{self.nan_policy}'; use skip or stop.")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise HerdError(f"unknown --mixed-precision '{self.mixed_precision}'; use auto, bf16 or fp32.")
        if self.export_format not in ("herd", "hf", "meta"):
            raise HerdError(f"unknown --export-format '{self.export_format}'; use herd, hf or meta.")
        parse_stages(self.seq_len_stages, "--seq-len-stages")
        parse_stages(self.batch_ramp, "--batch-ramp")


def parse_stages(text: str, flag: str) -> list[tuple[int, int]]:
    """'0:128,500:256' -> [(0, 128), (500, 256)], sorted by step."""
    stages = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            step, value = (int(x) for x in part.split(":"))
        except ValueError:
            raise HerdError(f"{flag} entry '{part}' is not STEP:VALUE; write e.g. '0:128,500:256'.") from None
        if step < 0 or value < 1:
            raise HerdError(f"{flag} entry '{part}' needs a step >= 0 and a value >= 1.")
        stages.append((step, value))
    return sorted(stages)


def stage_value(stages: list[tuple[int, int]], step: int, default: int) -> int:
    """The value of the last stage that started at or before `step` (default before the first)."""
    value = default
    for start, v in stages:
        if start <= step:
            value = v
    return value


# Settings a resumed run cannot change: the checkpoint's weights and data position depend on them.
FIXED_ON_RESUME = {
    "preset": "the checkpoint's weights have that model's shape",
    "seed": "the checkpoint's data position is in that seed's order",
}
# Flags that name the run rather than configure it.
_RUN_IDENTITY = ("out", "resume")
# Flags that belong to one invocation, not to the run: a resumed run does not inherit them
# (a run split with --stop-at continues past it with a bare --resume, as the loop tells the user).
_PER_INVOCATION = ("stop_at",)


def resumed_config(saved: dict[str, Any], explicit: dict[str, Any], step: int,
                   where: str = "the checkpoint", cls: type = TrainConfig,
                   fixed: dict[str, str] | None = None) -> tuple[Any, list[str]]:
    """The config of a resumed run: the saved one, with only the `explicit` flags applied.

    saved: the config stored in train_state.json; explicit: the flags the user set
    (herd.flags.set_flags); step: the checkpoint's step. Returns (config, one "--flag new (was
    old)" string per override). HerdError for an override that cannot continue the run.
    cls, fixed: the config class (another loop's, e.g. SFTConfig) and its settings that cannot
    change on resume (default: TrainConfig's FIXED_ON_RESUME).
    """
    fixed = FIXED_ON_RESUME if fixed is None else fixed
    defaults = {f.name: field_default(f) for f in fields(cls)}
    # a field added since the save gets its default
    base = {k: (v if k in _PER_INVOCATION else saved.get(k, v)) for k, v in defaults.items()}
    changes = []
    for key, value in explicit.items():
        if key in _RUN_IDENTITY or key not in base or base[key] == value:
            continue
        if key == "preset" and (base[key] or (None if base.get("init_from") else DEFAULT_PRESET)) == value:
            continue  # the preset the saved run used by default, now named
        flag = "--" + key.replace("_", "-")
        if key in fixed:
            raise HerdError(f"{where} was trained with {flag} {base[key]} and cannot continue with {value} "
                            f"({fixed[key]}); drop {flag} to resume, or start a new run with a new --out.")
        if key == "steps" and value <= step:
            raise HerdError(f"--steps {value} does not go past {where}'s step {step}; pass a larger --steps "
                            "or drop it to finish the saved schedule.")
        changes.append(f"{flag} {value} (was {base[key]})")
    cfg = cls(**{**base, **{k: v for k, v in explicit.items() if k in base}, "resume": True})
    return cfg, changes
