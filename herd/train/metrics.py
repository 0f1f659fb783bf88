"""What a training run reports: FLOPs and MFU, memory, and the sinks (console, JSONL, TensorBoard, plot).

FLOPs per token (forward + backward, the convention of the Llama 3 paper and PaLM's MFU):
    6 * (non-embedding parameters + output-layer parameters) + 12 * n_layers * n_heads * head_dim * seq_len
The first term counts one multiply-add (2 FLOPs) per weight forward and twice that backward; the
embedding lookup does no matmul, but the output layer does (a tied output matrix counts once, as
the output layer). The second term is attention's QK^T and PV matmuls over the full (causal,
unmasked) sequence. MFU = tokens/s * FLOPs per token / peak FLOP/s. Peak: a table of dense bf16
(tensor-core) peaks for known GPUs, --peak-tflops, or on a CPU a measured float32 matmul rate
with the run's own thread count, the best this machine has shown (which then says how close
training gets to this machine's own best matmul, not to a datasheet). A measured peak is never
below what the run itself reaches, so MFU stays <= 100%.

Only rank 0 writes: a console line per log interval, OUT/log.jsonl (one JSON object per event),
TensorBoard event files, and OUT/loss.png at the end.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from herd.fileio import atomic_path, atomic_write
from herd.model import ModelArgs
from herd.threads import pick_cpu_threads  # noqa: F401  (its home was here; kept importable)

# Dense bf16 peak FLOP/s (no sparsity) by a substring of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def flops_per_token(args: ModelArgs, seq_len: int, frozen_weights: bool = False) -> float:
    """Training FLOPs per token: 6 * (non-embedding params + output params) + 12 * L * H * D * S.

    frozen_weights (LoRA): the weight matrices get no gradient, so backward does one matmul per
    weight (the input gradient) instead of two: 4 instead of 6 per parameter. The adapters'
    own FLOPs (rank r << dim) are left out.
    """
    non_embedding = args.num_params(exclude_embeddings=True) - (0 if args.tie_embeddings else args.vocab_size * args.dim)
    output = args.vocab_size * args.dim
    per_param = 4.0 if frozen_weights else 6.0
    return per_param * (non_embedding + output) + 12.0 * args.n_layers * args.n_heads * args.head_dim * seq_len


def _peak_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "herd" / "cpu_peak_flops.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak_flops(n: int = 1024, seconds: float = 1.0) -> float:
    """Float32 matmul FLOP/s of this CPU with torch's current thread count.

    The best of short runs over `seconds`, and the best ever measured on this machine at this
    thread count (kept in ~/.cache/herd/cpu_peak_flops.json): a measurement taken while other
    processes share the cores reads low, and the peak is what the CPU does on a quiet moment.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up the BLAS threads
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    key = f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | n {n}"
    cache = _peak_cache()
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if best > known.get(key, 0.0):
        known[key] = best
        try:
            atomic_write(cache, json.dumps(known, indent=1))
        except OSError:  # a read-only home: use this run's measurement only
            pass
    return max(best, known.get(key, 0.0))


def peak_flops(device: torch.device, peak_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name} dense bf16 datasheet"
        return 0.0, f"unknown GPU {name}; pass --peak-tflops"
    return measure_cpu_peak_flops(), (f"measured fp32 matmul peak of this CPU with this run's "
                                      f"{torch.get_num_threads()} thread(s)")


def cap_mfu(mfu: float, peak: float, peak_source: str) -> tuple[float, float, str, str]:
    """(mfu, peak, peak_source, message): a measured CPU peak below the rate a run reaches (it was
    measured in a busy moment) is raised to that rate, so MFU stays <= 100%; message says so, once."""
    if mfu > 1.0 and peak_source.startswith("measured"):
        peak = peak * mfu
        return 1.0, peak, peak_source + ", raised to the rate this run reached", (
            f"MFU: the measured peak was low (a busy moment); now {peak / 1e12:.3g} TFLOP/s, the rate this run reached")
    return mfu, peak, peak_source, ""


def memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA max allocated, or this process's max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


class MetricsLogger:
    """Console, JSONL and TensorBoard output of one run (rank 0 only; other ranks get a silent logger)."""

    def __init__(self, out: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.out, self.enabled = Path(out), enabled
        self.path = self.out / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint we resume from
            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=resume_step)
        self._file = open(self.path, "a")

    def _truncate(self, step: int) -> None:
        """Keep log lines of steps <= step (a resumed run rewrites the ones after its checkpoint)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(self.path, "".join(line + "\n" for line in keep))

    def log(self, event: str, step: int, **values: Any) -> None:
        """One JSONL record (and TensorBoard scalars for its numbers)."""
        if not self.enabled:
            return
        record = {"event": event, "step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{event}/{k}", v, step)

    def text(self, tag: str, step: int, value: str) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, value, step)

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def read_log(path: str | os.PathLike, event: str = "train") -> list[dict[str, Any]]:
    """The records of one event type from a log.jsonl."""
    path = Path(path)
    if not path.is_file():
        return []
    return [r for r in map(json.loads, filter(str.strip, path.read_text().splitlines())) if r.get("event") == event]


def plot_loss(log_path: str | os.PathLike, png_path: str | os.PathLike, reference: float | None = None,
              reference_label: str = "") -> Path:
    """Train and validation loss against step, written atomically as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_log(log_path, "train"), read_log(log_path, "val")
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", label=reference_label or "reference")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png_path
