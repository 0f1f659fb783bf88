"""`herd scaling sweep|fit|plot` on a tiny real grid (seconds): plan, runs through herd.train.pretrain,
resume run by run, fit and plot files."""

from __future__ import annotations

import json

import pytest

from herd.cli import main
from herd.errors import HerdError
from herd.eval.scaling.sweep import SweepConfig, plan_sweep
from tests.helpers import make_shards

SWEEP = ["--budgets", "2e8,6e8", "--depths", "1,2,3,4", "--sizes-per-budget", "3", "--aspect", "16",
         "--head-dim", "16", "--seq-len", "16", "--batch-size", "4", "--min-steps", "4", "--eval-batches", "1",
         "--threads", "1", "--tokens-per-param", "2"]


def test_plan_centres_sizes_on_the_expected_optimum():
    cfg = SweepConfig(budgets="1e12", depths="1,2,3,4,5,6", aspect=16, head_dim=16, seq_len=64, batch_size=16)
    plan = plan_sweep(cfg, 1024)
    assert [r["depth"] for r in plan] == [1, 2, 3, 4]  # D/N 360, 37, 6.5, 1.6: centred next to 20
    for r in plan:
        assert r["tokens"] == r["steps"] * 16 * 64
        assert r["flops"] == pytest.approx(1e12, rel=0.01)  # steps are rounded, so compute is within 1%
    bigger = plan_sweep(SweepConfig(budgets="1e13", depths="1,2,3,4,5,6", aspect=16, head_dim=16, seq_len=64,
                                    batch_size=16), 1024)
    assert min(r["depth"] for r in bigger) > 1 and len(bigger) == 4  # a larger budget moves the sizes up
    with pytest.raises(HerdError, match="only 0 shape"):
        plan_sweep(SweepConfig(budgets="1e3"), 1024)
    with pytest.raises(HerdError, match="comma-separated list of numbers"):
        plan_sweep(SweepConfig(budgets="lots"), 1024)


def test_tiny_sweep_runs_resumes_fits_and_plots(tmp_path, capsys):
    data = make_shards(tmp_path / "data", n_docs=60)
    out = tmp_path / "sweep"
    args = ["scaling", "sweep", "--data", str(data), "--out", str(out), *SWEEP]
    assert main(args) == 0
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 6 and {r["budget"] for r in runs} == {2e8, 6e8}
    for r in runs:
        assert r["loss"] > 0 and r["steps"] >= 4
        log = [json.loads(line) for line in (out / "runs" / r["name"] / "log.jsonl").read_text().splitlines()]
        train = [e for e in log if e.get("event") == "train"]
        assert len(train) == r["steps"]  # trained exactly the planned steps through herd.train.pretrain
        assert max(e["lr"] for e in train) == pytest.approx(r["lr"], rel=1e-6)

    # a sweep killed during its last run: that run starts again, the finished ones are kept
    last = runs[-1]["name"]
    (out / "runs" / last / "result.json").unlink()
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count(": done (val loss") == 5 and f"{last}: val loss" in err

    assert main(["scaling", "fit", str(out)]) == 0
    fit_out = capsys.readouterr().out
    assert "| budget (FLOPs) |" in fit_out and (out / "fit.json").is_file()
    assert main(["scaling", "plot", str(out)]) == 0
    png = out / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_refuses_another_plan_in_the_same_folder(tmp_path, capsys):
    data = make_shards(tmp_path / "data", n_docs=30)
    out = tmp_path / "sweep"
    base = ["scaling", "sweep", "--data", str(data), "--out", str(out), *SWEEP]
    (out).mkdir()
    (out / "plan.json").write_text(json.dumps({"settings": {"seq_len": 4096}, "runs": []}))
    assert main(base) == 2
    assert "planned with other settings" in capsys.readouterr().err
    assert main(["scaling", "sweep", "--data", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "is not a shard folder" in capsys.readouterr().err


def test_fit_reads_a_runs_file_and_predicts(tmp_path, capsys):
    from tests.test_scaling_fit import synthetic_runs

    runs = synthetic_runs(0)
    for r in runs:  # a downstream eval per run: NLL falls with compute, accuracy follows a sigmoid of it
        import math

        nll = 3.0 - 0.4 * (math.log10(r["budget"]) - 18) + 0.5 * (r["loss"] - 2.0)
        r["eval"] = {"arc_easy": {"nll_per_char": nll, "acc": 0.25 + 0.75 / (1 + math.exp(4 * (nll - 2.0)))}}
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert main(["scaling", "fit", str(path), "--predict", "3.8e25"]) == 0
    out = capsys.readouterr().out
    assert "N*(C) params" in out and "at C = 3.8e+25" in out and "predicted arc_easy acc" in out
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert abs(fit["fit"]["params"]["alpha"] - 0.28 / 0.62) < 0.02
    assert main(["scaling", "plot", str(path), "--predict", "1e23"]) == 0
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.distributed
def test_sweep_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 herd scaling sweep` (FSDP, dp 2) gives the one-process val losses."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = make_shards(tmp_path / "data", n_docs=60)
    small = [a if a != "2e8,6e8" else "2e8" for a in SWEEP]
    assert main(["scaling", "sweep", "--data", str(data), "--out", str(tmp_path / "one"), *small]) == 0
    herd = Path(sys.executable).with_name("herd")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python",
           str(herd if herd.exists() else "herd"), "scaling", "sweep", "--data", str(data), "--out",
           str(tmp_path / "two"), *small]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("[sweep] run 1/3") == 2  # rank 0 only: start and finish lines of run 1
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "runs.jsonl").read_text().splitlines()]
    for a, b in zip(read("one"), read("two")):
        assert a["name"] == b["name"] and a["loss"] == pytest.approx(b["loss"], abs=2e-5)
