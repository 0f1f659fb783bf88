"""End to end on the CPU (bench/sft_e2e.py --quick): a tiny Llama pre-trained here on standard-library
source, then fine-tuned with herd sft on questions about standard-library functions, ends its replies to
held-out questions (functions it never saw answered) with <|eot_id|> and answers in the trained form
("`name`: one sentence.") far more often than before, when it never did either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sft_e2e.py"


@pytest.mark.slow
def test_fine_tuned_model_answers_in_the_trained_form(tmp_path):
    out = tmp_path / "e2e"
    threads = str(min(2, os.cpu_count() or 1))  # fixed: the run is then the same run every time
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--threads", threads],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "e2e.json").read_text())
    before, after = r["before"], r["after"]
    assert r["held_out"] > 50  # whole functions held out by the hash split
    assert before["ended_with_eot"] <= 0.05 and before["trained_form"] == 0.0  # a base model never learned the turn end
    assert after["ended_with_eot"] >= 0.7 and after["trained_form"] >= 0.6
    assert after["trained_form"] >= before["trained_form"] + 0.6
    assert "ended with eot" in proc.stdout and "before" in proc.stdout  # the table the README quotes
