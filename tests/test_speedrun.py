"""`herd speedrun`, the main job, end to end as a user runs it: the real data pipeline (datatrove
executors, readers, filters, dedup, tokenizer training, shard writer) and the real trainer, on a
small corpus with a step budget, checking what the command promises: a validation loss below a
unigram model's on the same split, the files it lists, and a sample with no special tokens."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

STEPS = 200  # ~40 s on a quiet 2-core machine: the margin over the unigram baseline is ~0.6 nats by then
pytestmark = pytest.mark.slow


def _stdlib_corpus(folder: Path, max_chars: int = 500_000) -> Path:
    """Python standard library modules (code and docstrings), one jsonl document per module."""
    folder.mkdir(parents=True)
    total = 0
    with open(folder / "stdlib.jsonl", "w", encoding="utf-8") as f:
        for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            text = p.read_text(encoding="utf-8", errors="replace")[:5000]
            f.write(json.dumps({"id": p.name, "text": text, "domain": "code"}) + "\n")
            total += len(text)
            if total > max_chars:
                break
    return folder


def _tokens(data: Path, split: str) -> np.ndarray:
    """Every token of a split, read straight from the raw uint32 shard files."""
    manifest = json.loads((data / "manifest.json").read_text())
    return np.concatenate([np.fromfile(data / f"{s['name']}.tokens", dtype="<u4")
                           for s in manifest["splits"][split]["shards"]]).astype(np.int64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("speedrun")
    corpus = _stdlib_corpus(root / "corpus-in")
    out = root / "run"
    result = subprocess.run([sys.executable, "-m", "herd", "speedrun", "--out", str(out), "--corpus", str(corpus),
                             "--steps", str(STEPS)], capture_output=True, text=True, timeout=900, cwd=root)
    return out, result


def test_speedrun_learns_context(run):
    out, result = run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    summary = json.loads((out / "speedrun.json").read_text())
    assert summary["steps"] == STEPS
    # the unigram baseline by hand: validation tokens under add-one smoothed training frequencies
    train, val = _tokens(out / "data", "train"), _tokens(out / "data", "val")
    vocab = json.loads((out / "data" / "manifest.json").read_text())["tokenizer"]["n_words"]
    counts = np.bincount(train, minlength=vocab)
    baseline = float(-np.log((counts[val] + 1) / (train.size + vocab)).mean())
    assert summary["unigram_baseline"] == pytest.approx(baseline, rel=1e-9)
    assert summary["val_loss"] < baseline - 0.1, (summary["val_loss"], baseline)
    assert f"vs {baseline:.3f} for a unigram model" in result.stderr


def test_speedrun_writes_what_it_lists(run):
    out, result = run
    assert result.returncode == 0
    for name in ("data/manifest.json", "data/report/report.md", "data/tokenizer.model", "tokenizer.model",
                 "final/tokenizer.model", "log.jsonl", "speedrun.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())][-1] == f"step_{STEPS:08d}"
    assert " | INFO " not in result.stderr  # datatrove's log lines are in data/work/datatrove.log
    from herd.checkpoint import load_checkpoint

    model = load_checkpoint(out / "final")
    assert model.args.vocab_size == 4096 and model.args.n_layers == 4  # herd-1m


def test_speedrun_sample_is_text_without_special_tokens(run):
    out, result = run
    sample = json.loads((out / "speedrun.json").read_text())["sample"]
    assert sample.startswith("def ") and len(sample) > len("def ") + 10, sample
    assert "<|" not in sample, sample  # no <|begin_of_text|>, <|end_of_text|>, ... inside the text
    assert f"sample: {sample!r}" in result.stderr


def test_speedrun_rerun_reuses_every_stage(run):
    out, _ = run
    again = subprocess.run([sys.executable, "-m", "herd", "speedrun", "--out", str(out), "--corpus",
                            str(out.parent / "corpus-in"), "--steps", str(STEPS)], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in ("3/5 tokenizer: reusing", "4/5 shards: reusing", "5/5 pretrain: reusing the finished run"):
        assert stage in again.stderr
