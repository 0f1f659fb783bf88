"""End to end on the CPU (bench/dpo_e2e.py --quick): a tiny Llama SFT'd briefly on arithmetic (never on the
held-out questions), then trained with herd dpo on right-vs-wrong answers (Llama 3's recipe), puts more
log-prob on the right reply than on the wrong one for held-out questions than it did before DPO, and
answers at least as many held-out questions right (greedy replies scored by
herd.posttrain.arithmetic.reward). The quick model is too small and too briefly SFT'd to learn the sums
themselves (8% right before and after)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "dpo_e2e.py"


@pytest.mark.slow
def test_dpo_raises_the_held_out_margin_and_right_answers(tmp_path):
    out = tmp_path / "e2e"
    threads = str(min(2, os.cpu_count() or 1))  # fixed: the run is then the same run every time
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--threads", threads],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "e2e.json").read_text())
    before, after = r["before"], r["after"]
    assert r["held_out"] >= 10 and r["train_pairs"] >= 60
    # nats: the right reply gained on the wrong one (0.246 -> 0.439 on the 2-core dev machine, 2 threads)
    assert after["margin"] > before["margin"] + 0.05
    assert after["correct"] >= before["correct"]
    assert "right answers" in proc.stdout and "before" in proc.stdout  # the table the README quotes
