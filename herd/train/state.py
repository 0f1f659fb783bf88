"""Resumable training state (torch Distributed Checkpoint): save, find, load and average it.

Not to be confused with herd.checkpoint, which reads and writes *weights* in herd, Hugging Face
and Meta formats; this module saves everything a run needs to continue exactly (model and
optimizer shards, data position, RNG), under OUT/checkpoints.

Layout of OUT/checkpoints/step_00000100/:
    .metadata, __R_0.distcp   DCP files: model + optimizer state, each rank writes its own shards
    rng_rank{R}.pt            each rank's torch / CUDA / numpy / python RNG states
    train_state.json          step, total steps, data position, config, model args, tokenizer
                              sha256; written last (a directory with it is complete)

Atomicity: everything is written into step_N.tmp, then rank 0 renames it to step_N (one rename
on one file system) and only then deletes checkpoints beyond the newest K. A crash at any point
leaves either the old set of complete checkpoints or the old set plus the new one; a stale
*.tmp directory is ignored by `latest_state` and removed by the next save of that step.

Model and optimizer state go through torch.distributed.checkpoint.state_dict.get_state_dict /
set_state_dict, which handle plain modules, FSDP2 and tensor-parallel DTensors alike, so the same
code saves one process or a thousand (and a checkpoint can be resumed on a different world size).
With trainable_only (LoRA: a frozen base plus small adapters) only the parameters that train, and
their optimizer state, are saved; the frozen weights come back from where the run loaded them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from herd.errors import HerdError
from herd.fileio import replace_folder
from herd.model import ModelArgs, Transformer

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "train_state.json"

# DCP warns on every call that it runs without a process group; in one process that is the intent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def _barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper (state dict keys without '_orig_mod.')."""
    return getattr(model, "_orig_mod", model)


def state_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under root (those with train_state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def damage(ckpt: Path) -> str:
    """'' when ckpt's files are all there and whole, else what is wrong (one short phrase).

    Reads the DCP .metadata (which records, for every tensor, the file, offset and length of its
    bytes) and checks each .distcp file exists and is long enough, so a truncated or missing
    shard is found before a load fails deep inside torch.
    """
    try:
        info = json.loads((ckpt / STATE_FILE).read_text())
        if not isinstance(info, dict) or "step" not in info:
            return f"{STATE_FILE} has no step"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__})"
    if not (ckpt / ".metadata").is_file():
        return ".metadata is missing"
    try:
        metadata = dcp.FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # a truncated pickle raises anything from EOFError to UnpicklingError
        return f".metadata is unreadable ({type(e).__name__})"
    need: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        end = int(item.offset) + int(item.length)
        need[item.relative_path] = max(need.get(item.relative_path, 0), end)
    for name, end in sorted(need.items()):
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size < end:
            return f"{name} is truncated ({path.stat().st_size} of {end} bytes)"
    return ""


def latest_state(root: str | os.PathLike, warn: Any = None) -> Path | None:
    """The newest intact checkpoint under root. A damaged one (a missing or truncated file) is
    skipped with a one-line warning through `warn` (default: stderr), falling back to the next."""
    for ckpt in reversed(state_dirs(root)):
        problem = damage(ckpt)
        if not problem:
            return ckpt
        message = (f"herd: warning: skipping damaged checkpoint {ckpt} ({problem}); "
                   "falling back to the newest intact one")
        if warn is not None:
            warn(message)
        elif _rank() == 0:
            print(message, file=sys.stderr, flush=True)
    return None


def read_state_info(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HerdError(f"cannot read {ckpt / STATE_FILE} ({e}); resume from an older checkpoint by "
                        f"moving {ckpt} aside.") from None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _options(trainable_only: bool) -> StateDictOptions | None:
    # strict=False on load: the frozen parameters a trainable-only checkpoint leaves out stay as they are
    return StateDictOptions(ignore_frozen_params=True, strict=False) if trainable_only else None


def save_train_state(root: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict[str, Any], keep: int = 3, trainable_only: bool = False) -> Path:
    """Write step_N atomically under root (all ranks call this); returns the final directory.

    trainable_only: save only the parameters with requires_grad (and their optimizer state).
    """
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a stale half-written save of this step
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer, options=_options(trainable_only))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / STATE_FILE).write_text(json.dumps({**train_state, "step": step}, indent=1) + "\n")
        replace_folder(tmp, final)  # the commit point: one rename makes the checkpoint visible
        for old in state_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def check_compatible(state: dict[str, Any], model_args: ModelArgs, ckpt: Path) -> None:
    """HerdError when the checkpoint was written for a different model shape than this run builds."""
    saved = state.get("model_args", {})
    mine = model_args.to_dict()
    diff = [k for k in mine if k in saved and saved[k] != mine[k]]
    if diff:
        what = ", ".join(f"{k} {saved[k]} vs {mine[k]}" for k in diff[:4])
        raise HerdError(f"{ckpt} holds a {state.get('config', {}).get('preset', '?')} model that differs from this "
                        f"run's {what}; resume with the checkpoint's --preset or start a new run with a new --out.")


def load_train_state(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     trainable_only: bool = False) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from ckpt; returns its train_state.json.

    trainable_only: the checkpoint holds only the trainable parameters (save_train_state's flag);
    the frozen ones keep their current values.
    """
    state = read_state_info(ckpt)
    options = _options(trainable_only)
    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer, options=options)
    loaded = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(loaded, checkpoint_id=str(ckpt))
    except Exception as e:  # DCP raises CheckpointException with per-rank tracebacks
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise HerdError(f"cannot load {ckpt} ({first}); the checkpoint is incomplete or from another model, "
                        "resume from an older one or start a new --out.") from None
    set_state_dict(unwrap(model), optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=options)
    rng = ckpt / f"rng_rank{_rank()}.pt"
    if rng.is_file():  # a resume on another world size keeps the fresh RNG of the new ranks
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


@torch.no_grad()
def average_states(ckpts: list[Path], model: torch.nn.Module) -> None:
    """Load the mean of the model weights stored in `ckpts` into model (Polyak averaging)."""
    target = unwrap(model)
    avg = get_model_state_dict(target)
    avg = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in avg.items()}
    for ckpt in ckpts:
        sd = {k: torch.empty_like(v) for k, v in get_model_state_dict(target).items()}
        dcp.load({"model": sd}, checkpoint_id=str(ckpt))
        for k, v in sd.items():
            avg[k] += v.float() / len(ckpts)
    like = get_model_state_dict(target)
    set_model_state_dict(target, {k: avg[k].to(like[k].dtype) for k in avg})


def full_model(model: torch.nn.Module, args: ModelArgs) -> Transformer | None:
    """A plain single-device Transformer with the full weights on CPU, on rank 0 (None elsewhere)."""
    target = unwrap(model)
    if not tdist.is_initialized() and isinstance(target, Transformer):
        return target
    sd = get_model_state_dict(target, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        return None
    with torch.device("meta"):
        plain = Transformer(args)
    plain.load_state_dict(sd, assign=True)
    plain.reset_buffers()
    return plain
