"""`herd dpo` under torchrun on 2 gloo CPU processes trains exactly like one process: FSDP2 data parallel
(full fine-tuning, and LoRA whose reference is the base with adapters off) logs the same losses and
held-out DPO losses and exports the same weights / adapter (within float tolerance); the ranks share out
the reference pass and rank 0 writes the same cache."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from herd.checkpoint import load_args, load_checkpoint
from herd.posttrain.adapter import read_adapter
from herd.posttrain.dpo import DPOTrainConfig, dpo
from herd.train.metrics import read_log
from helpers import tiny_chat_checkpoint, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

RUN = dict(max_seq_len=128, batch_size=4, steps=4, warmup_ratio=0.25, val_fraction=0.2, eval_every=2,
           eval_on_start=False, sample_prompts=0, checkpoint_every=0, log_every=100, tensorboard=False,
           peak_tflops=1.0, seed=2, threads=1, reference_chunk=8)  # torchrun ranks run 1 thread each
LAYOUTS = {
    "fsdp_full": dict(lr=3e-3),
    "fsdp_lora": dict(lr=2e-2, lora_rank=4, lora_alpha=8, lora_targets=["all-linear"]),
}


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k.replace('_', '-')}", ",".join(v) if isinstance(v, list) else str(v).lower()
                if isinstance(v, bool) else str(v)]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, official_tokenizer_model):
    from herd.posttrain.arithmetic import preference_records

    root = tmp_path_factory.mktemp("dpo_parallel")
    base = tiny_chat_checkpoint(root / "base", official_tokenizer_model)
    prefs = write_jsonl(root / "prefs.jsonl", preference_records(30, seed=4))
    return root, base, prefs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_processes_train_like_one(layout, setup):
    root, base, prefs = setup
    settings = {**RUN, **LAYOUTS[layout], "init_from": str(base), "data": [str(prefs)]}
    one = root / f"{layout}_one"
    dpo(DPOTrainConfig(**settings, out=str(one)))
    two = root / f"{layout}_two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "herd", "dpo",
           *_flags(settings), "--out", str(two), "--dp", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for event, key in (("train", "loss"), ("train", "accuracy"), ("val", "dpo_loss"), ("val", "margin")):
        a = [r[key] for r in read_log(one / "log.jsonl", event)]
        b = [r[key] for r in read_log(two / "log.jsonl", event)]
        assert len(a) == len(b) > 1
        assert b == pytest.approx(a, abs=1e-5, rel=1e-5), (event, key)
    for part in sorted((one / "reference_logps").glob("*.npy")):
        np.testing.assert_allclose(np.load(two / "reference_logps" / part.name), np.load(part), rtol=1e-6, atol=1e-5)
    if LAYOUTS[layout].get("lora_rank"):
        args = load_args(base)
        (_, got), (_, want) = read_adapter(two / "adapter", args), read_adapter(one / "adapter", args)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-3)  # Adam: sign-like steps on tiny grads
        return
    a, b = load_checkpoint(one / "final").state_dict(), load_checkpoint(two / "final").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)
