"""`herd sft` under torchrun on 2 gloo CPU processes trains exactly like one process: FSDP2 data parallel
(full fine-tuning and LoRA) and tensor parallel (full fine-tuning) log the same losses, validation
losses and greedy replies, and export the same weights / adapter (within float tolerance)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from herd.checkpoint import load_args, load_checkpoint
from herd.posttrain.adapter import read_adapter
from herd.posttrain.config import SFTConfig
from herd.posttrain.sft import sft
from herd.train.metrics import read_log
from helpers import arithmetic_chats, tiny_chat_checkpoint, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

RUN = dict(max_seq_len=128, batch_size=4, steps=4, warmup_ratio=0.25, val_fraction=0.15, eval_every=2,
           eval_on_start=False, sample_prompts=2, sample_tokens=6, checkpoint_every=0, log_every=100,
           tensorboard=False, peak_tflops=1.0, seed=2, threads=1)  # torchrun ranks run 1 thread each
LAYOUTS = {  # name -> (extra settings, torchrun layout flags)
    "fsdp_full": (dict(lr=3e-3), ["--dp", "2"]),
    "fsdp_lora": (dict(lr=2e-2, lora_rank=4, lora_alpha=8, lora_targets=["all-linear"], merge=True), ["--dp", "2"]),
    "tp_full": (dict(lr=3e-3), ["--tp", "2"]),
}


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k.replace('_', '-')}", ",".join(v) if isinstance(v, list) else str(v).lower()
                if isinstance(v, bool) else str(v)]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, official_tokenizer_model):
    root = tmp_path_factory.mktemp("sft_parallel")
    base = tiny_chat_checkpoint(root / "base", official_tokenizer_model)
    chats = write_jsonl(root / "chats.jsonl", arithmetic_chats(40, seed=4))
    return root, base, chats


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_processes_train_like_one(layout, setup):
    root, base, chats = setup
    extra, dist_flags = LAYOUTS[layout]
    settings = {**RUN, **extra, "init_from": str(base), "data": [str(chats)]}
    one = root / f"{layout}_one"
    sft(SFTConfig(**settings, out=str(one)))
    two = root / f"{layout}_two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "herd", "sft",
           *_flags(settings), "--out", str(two), *dist_flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for event in ("train", "val"):
        a = [r["loss"] for r in read_log(one / "log.jsonl", event)]
        b = [r["loss"] for r in read_log(two / "log.jsonl", event)]
        assert len(a) == len(b) > 1 and len(set(round(x, 3) for x in a)) > 1  # the loss moves
        assert b == pytest.approx(a, abs=1e-5, rel=1e-5), event
    replies = [[x["text"] for x in r["replies"]] for r in read_log(one / "log.jsonl", "replies")]
    assert replies == [[x["text"] for x in r["replies"]] for r in read_log(two / "log.jsonl", "replies")]
    if extra.get("lora_rank"):
        args = load_args(base)
        (_, got), (_, want) = read_adapter(two / "adapter", args), read_adapter(one / "adapter", args)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-3)  # Adam: sign-like steps on tiny grads
    a, b = load_checkpoint(one / "final").state_dict(), load_checkpoint(two / "final").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)
