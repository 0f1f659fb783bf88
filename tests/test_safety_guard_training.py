"""Training a guard end to end with herd's own commands: the synthetic labelled set (`herd guard
--write-synthetic`) rendered into SFT records (`herd guard --write-sft`), `herd sft` fine-tuning a small
random Llama with the official tokenizer into a Llama Guard 3 format classifier, and `herd guard --eval`
scoring it on held-out conversations (none of them in the training set).

The slow test states the bar: held-out unsafe-vs-safe F1 >= 0.95 and per-category micro F1 >= 0.9, with
the precision and recall of the unsafe score at the 0.5 threshold (measured: 0.990 and 0.992 after
320 steps, ~80 s on one thread of the shared 2-core machine)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from herd.checkpoint import save_checkpoint
from herd.cli import main
from herd.model import ModelArgs, Transformer
from herd.train.metrics import read_log

# The synthetic set uses five Llama Guard 3 categories; the others are left out of the prompt (their
# codes kept), which keeps the prompts short and exercises --exclude end to end.
EXCLUDE = "S3,S4,S5,S6,S7,S8,S12,S13,S14"


def base_model(path, tokenizer_model):
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                              max_seq_len=512, tie_embeddings=True))
    m.init_weights(std=0.02)
    return save_checkpoint(m, path, tokenizer_path=tokenizer_model)


def train_guard(tmp_path, tokenizer_model, n_train: int, n_test: int, steps: int, capsys) -> dict:
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["guard", "--write-synthetic", str(data), "--synthetic-size", f"{n_train},{n_test}"]) == 0
    assert main(["guard", "--write-sft", str(data / "sft.jsonl"), str(data / "train.jsonl"), "--exclude", EXCLUDE]) == 0
    train = {json.dumps(json.loads(x)["messages"]) for x in (data / "train.jsonl").read_text().splitlines()}
    test = {json.dumps(json.loads(x)["messages"]) for x in (data / "test.jsonl").read_text().splitlines()}
    assert not train & test  # held out: no test conversation is in the training set
    base = base_model(tmp_path / "base", tokenizer_model)
    threads = os.environ.get("HERD_TEST_THREADS", "1")
    assert main(["sft", "--init-from", str(base), "--data", str(data / "sft.jsonl"), "--chat-style", "meta",
                 "--steps", str(steps), "--batch-size", "8", "--lr", "5e-3", "--max-seq-len", "512",
                 "--val-fraction", "0", "--out", str(run), "--threads", threads, "--eval-every", "0",
                 "--sample-prompts", "0", "--checkpoint-every", "0", "--tensorboard", "false", "--log-every", "1000",
                 "--peak-tflops", "1", "--eval-on-start", "false"]) == 0
    capsys.readouterr()
    assert main(["guard", "--checkpoint", str(run / "final"), "--eval", str(data / "test.jsonl"), "--exclude", EXCLUDE,
                 "--report", str(tmp_path / "metrics.json"), "--output", str(tmp_path / "preds.jsonl"),
                 "--threads", threads]) == 0
    table = capsys.readouterr().out
    print(table)
    losses = [r["loss"] for r in read_log(run / "log.jsonl", "train")]
    return {"metrics": json.loads((tmp_path / "metrics.json").read_text()), "losses": losses, "table": table,
            "preds": [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]}


def test_guard_training_pipeline(tmp_path, official_tokenizer_model, capsys):
    """The commands fit together (fast): the guard learns the answer format and is read back by herd guard."""
    out = train_guard(tmp_path, official_tokenizer_model, 240, 40, 60, capsys)
    assert out["losses"][-1] < 0.3 * out["losses"][0]
    assert len(out["preds"]) == 40 and all("score" in p for p in out["preds"])
    m = out["metrics"]
    assert m["unsafe"]["tp"] + m["unsafe"]["fp"] + m["unsafe"]["fn"] + m["unsafe"]["tn"] == 40
    assert set(m["categories"]) == {"S1", "S2", "S9", "S10", "S11"}  # the excluded codes are not the guard's
    # the format and the verdict are learned early (the categories take more steps: the slow test below)
    assert sum(p["verdict"] != "unparseable" for p in out["preds"]) >= 36
    assert m["unsafe"]["f1"] >= 0.8 and m["unsafe"]["average_precision"] >= 0.9, out["table"]  # measured 0.963, 1.0


@pytest.mark.slow
def test_trained_guard_reaches_held_out_f1(tmp_path, official_tokenizer_model, capsys):
    out = train_guard(tmp_path, official_tokenizer_model, 1200, 300, 320, capsys)
    m = out["metrics"]
    assert m["unsafe"]["f1"] >= 0.95, out["table"]
    assert m["unsafe"]["precision"] >= 0.9 and m["unsafe"]["recall"] >= 0.9, out["table"]
    assert m["micro"]["f1"] >= 0.9, out["table"]
    assert m["unsafe"]["average_precision"] >= 0.95
