"""bench/gpu.sh --dry-run: the GPU check script runs end to end on a CPU (tiny shapes) and prints its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"


def test_gpu_script_dry_run_prints_every_check():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("check"))
    rows = table[header + 1:]
    for what in ("gpu tests", "train mfu", "flex document mask", "decode", "fsdp2 nccl"):
        assert any(r.startswith(what) and " yes " in r for r in rows), (what, proc.stdout)
    flex = next(r for r in rows if r.startswith("flex"))
    assert float(flex.split("max_abs_err ")[1]) < 1e-4  # the document mask really equals per-document attention
