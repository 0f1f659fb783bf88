"""`herd pretrain --resume` as a user types it: the run continues with the settings it was saved
with (not the flag defaults), explicit overrides are applied and named, impossible ones are one
line; a damaged newest checkpoint is skipped with a one-line warning for the newest intact one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from herd.cli import main
from herd.train import state as ckpt
from herd.train.loop import pretrain
from herd.train.metrics import read_log
from helpers import config, make_shards

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 8
# every setting differs from TrainConfig's default, as in the README's pretrain example
FLAGS = dict(preset="herd-1m", steps=STEPS, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4,
             eval_batches=1, checkpoint_every=2, keep_checkpoints=5, log_every=100, tensorboard=False,
             peak_tflops=1.0, seed=1, threads=1)


def argv(data: Path, out: Path, **flags) -> list[str]:
    return ["pretrain", f"--data={data}", f"--out={out}", *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out / "log.jsonl", "train")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards") / "d")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    pretrain(config(data, out, **FLAGS))
    return out


def test_bare_resume_continues_with_the_saved_settings(data, reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(data, out, **FLAGS, stop_at=4)) == 0
    capsys.readouterr()
    assert main(["pretrain", f"--data={data}", f"--out={out}", "--resume"]) == 0  # the README's resume line
    err = capsys.readouterr().err
    assert "with its saved settings (no flag overrides them)" in err
    train = read_log(out / "log.jsonl", "train")
    assert {(r["batch_size"], r["seq_len"]) for r in train} == {(4, 32)}  # not the defaults 16 x 256
    assert losses(out) == losses(reference)  # the same run, bit for bit


def test_explicit_overrides_apply_and_are_named(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(data, out, **FLAGS, stop_at=4)) == 0
    capsys.readouterr()
    assert main(["pretrain", f"--data={data}", f"--out={out}", "--resume", "--lr", "0.001", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "overridden: --lr 0.001 (was 0.003)" in err and "--batch-size" not in err  # same value: no override
    resumed = [r for r in read_log(out / "log.jsonl", "train") if r["step"] > 4]
    assert resumed and all(r["lr"] <= 1e-3 + 1e-12 for r in resumed)
    # a longer horizon given on resume is honoured
    assert main(["pretrain", f"--data={data}", f"--out={out}", "--resume", "--steps", str(STEPS + 2)]) == 0
    assert read_log(out / "log.jsonl", "train")[-1]["step"] == STEPS + 2


@pytest.mark.parametrize("flag,value,words", [
    ("--preset", "herd-15m", "cannot continue with herd-15m"),
    ("--seed", "7", "cannot continue with 7"),
    ("--steps", "2", "does not go past"),
])
def test_incompatible_override_is_one_line(data, tmp_path, capsys, flag, value, words):
    out = tmp_path / "run"
    assert main(argv(data, out, **FLAGS, stop_at=4)) == 0
    before = (out / "log.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["pretrain", f"--data={data}", f"--out={out}", "--resume", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("herd: error: ") and words in err, err
    assert (out / "log.jsonl").read_bytes() == before  # nothing touched


@pytest.mark.parametrize("damage", ["truncate", "no-metadata", "bad-state"])
def test_damaged_newest_checkpoint_falls_back(data, reference, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert main(argv(data, out, **FLAGS, stop_at=6)) == 0
    newest = ckpt.state_dirs(out / "checkpoints")[-1]
    assert newest.name == "step_00000006"
    if damage == "truncate":
        shard = next(newest.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "no-metadata":
        (newest / ".metadata").unlink()
    else:
        (newest / "train_state.json").write_text("{")
    assert ckpt.damage(newest) != ""
    assert ckpt.latest_state(out / "checkpoints", warn=lambda _: None).name == "step_00000004"
    capsys.readouterr()
    assert main(["pretrain", f"--data={data}", f"--out={out}", "--resume"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("herd: warning")]
    assert len(warnings) == 1 and "step_00000006" in warnings[0] and "Traceback" not in err, err
    assert "resuming" in err and "step_00000004" in err
    assert losses(out) == losses(reference)  # resumed from step 4: still the uninterrupted curve


def test_intact_checkpoints_report_no_damage(reference):
    for d in ckpt.state_dirs(reference / "checkpoints"):
        assert ckpt.damage(d) == ""
        assert json.loads((d / "train_state.json").read_text())["config"]["batch_size"] == 4
