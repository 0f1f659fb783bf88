"""End to end on the CPU (bench/ppo_e2e.py --quick): a tiny Llama SFT'd here on arithmetic chats in two reply
forms ("23 + 58 = 81." or "The answer is 81.") answers held-out questions greedily in the short form; `herd ppo`
with a verifiable format reward (a FILE.py:FUNCTION --reward-fn) on other arithmetic prompts makes it answer
most of them in the rewarded form, while the KL to the SFT model stays bounded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "ppo_e2e.py"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ppo_e2e")  # shared: the second run reuses the first one's SFT model


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_raises_the_heldout_reward_with_bounded_kl(algo, out):
    threads = "1"  # fixed: the run is then the same run every time (and 2 threads on a busy 2-core CPU crawl)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--algo", algo, "--out", str(out),
                           "--threads", threads], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / f"e2e_{algo}.json").read_text())
    assert r["before"] <= 0.2  # greedy, the SFT model answers in the short form
    assert r["after"] >= 0.6 and r["after"] >= r["before"] + 0.5
    assert r["rollout_reward_last"] > r["rollout_reward_first"]
    assert 0.0 < r["kl_max"] < 20.0  # nats per reply of ~9 tokens: it moved, within bounds
    assert len(r["per_step"]) == r["sizes"]["iterations"] and Path(r["plot"]).is_file()
    assert "held-out reward" in proc.stdout
