"""`herd pretrain` as a user runs it: a process killed with SIGKILL mid-run resumes to the exact loss
curve of an uninterrupted run; and the speedrun's unigram entropy against a hand count."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from herd.data.shards import ShardWriter
from herd.train.state import state_dirs
from herd.train.loop import pretrain
from herd.train.metrics import read_log
from herd.train.speedrun import unigram_entropy
from helpers import config, make_shards

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 60
FLAGS = dict(preset="herd-1m", steps=STEPS, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0,
             eval_batches=1, checkpoint_every=2, log_every=100, tensorboard=False, peak_tflops=1.0, seed=1,
             threads=2)


def cli(data: Path, out: Path, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    return [sys.executable, "-c", "import sys; from herd.cli import main; sys.exit(main())", "pretrain",
            f"--data={data}", f"--out={out}", *flags, *extra]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    data = make_shards(tmp_path / "d")
    ref = tmp_path / "ref"
    pretrain(config(data, ref, **FLAGS))
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(state_dirs(out / "checkpoints")) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stderr = proc.stderr.read().decode()
    logged = len(read_log(out / "log.jsonl", "train"))
    assert proc.returncode == -signal.SIGKILL, stderr
    assert 0 < logged < STEPS, "the run was not killed mid-way"
    resumed = subprocess.run(cli(data, out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    want = [r["loss"] for r in read_log(ref / "log.jsonl", "train")]
    got = [r["loss"] for r in read_log(out / "log.jsonl", "train")]
    assert got == want


def test_cli_bad_input_is_one_line(tmp_path):
    result = subprocess.run(cli(tmp_path / "missing", tmp_path / "out"), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("herd: error: --data ")
    assert not (tmp_path / "out").exists()


def test_unigram_entropy_by_hand(tmp_path):
    info = {"path": "", "sha256": "", "n_words": 8, "bos_id": 6, "eos_id": 7}
    with ShardWriter(tmp_path, "train", info) as w:
        w.add([0, 0, 1])  # stored as 6 0 0 1 7
        w.add([1, 2])  # stored as 6 1 2 7
    counts = [2, 2, 1, 2, 2]  # tokens 0, 1, 2, 6 (bos), 7 (eos): 9 tokens
    expected = -sum(c / 9 * math.log(c / 9) for c in counts)
    assert unigram_entropy(tmp_path) == pytest.approx(expected, rel=1e-12)
