"""`herd eval` end to end: results file, samples, summary table, reuse after an interrupted run, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from herd.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from herd.checkpoint import save_checkpoint
    from herd.model import ModelArgs, Transformer
    from tests.conftest import official_tokenizer_dir

    root = tmp_path_factory.mktemp("evalcli")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=128256, multiple_of=16, max_seq_len=128,
                                  tie_embeddings=True))
    model.init_weights(std=0.2)
    save_checkpoint(model, root / "ckpt", tokenizer_path=official_tokenizer_dir() / "tokenizer.model")
    rows = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), "seven"], "answer": 0}
            for i in range(8)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "text.txt").write_text("A short text to measure. " * 20)
    return root


def test_help():
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0


def test_list_tasks(capsys):
    assert main(["eval", "--list-tasks"]) == 0
    out = capsys.readouterr().out
    assert "arc_challenge" in out and "gsm8k_cot" in out and "mmlu_<subject>" in out and "ppl:PATH" in out


def test_eval_writes_results_and_reuses_finished_tasks(ckpt, capsys):
    out = ckpt / "out"
    args = ["eval", "--checkpoint", str(ckpt / "ckpt"), "--tasks", f"mc:{ckpt / 'mc.jsonl'},ppl:{ckpt / 'text.txt'}",
            "--out", str(out), "--samples"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "| mc:mc.jsonl" in captured.out and "bits_per_byte" in captured.out
    report = json.loads((out / "results.json").read_text())
    mc = report["tasks"]["mc:mc.jsonl"]
    assert mc["n"] == 8 and set(mc["metrics"]) >= {"acc", "acc_stderr", "acc_norm", "nll_per_char"}
    assert len(mc["prompt_sha256"]) == 64
    assert report["model"]["params"] > 0 and report["config"]["samples"] is True
    samples = [json.loads(line) for line in (out / "samples" / "mc_mc.jsonl.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and len(samples[0]["lls"]) == 3

    # a run killed after its first task left that task's file: the re-run reuses it and scores the rest
    (out / "results.json").unlink()
    (out / "tasks" / "ppl_text.txt.json").unlink()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "mc:mc.jsonl: reusing" in err and "ppl:text.txt: reusing" not in err
    again = json.loads((out / "results.json").read_text())
    assert again["tasks"] == report["tasks"] | {"ppl:text.txt": again["tasks"]["ppl:text.txt"]}
    assert again["tasks"]["ppl:text.txt"]["metrics"] == report["tasks"]["ppl:text.txt"]["metrics"]


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "arc_esay"], "unknown task 'arc_esay'"),
    (["--tasks", "mc:/nonexistent/file.jsonl"], "does not exist"),
    (["--tasks", "arc_easy", "--data", "arc_easy"], "not TASK=PATH"),
    (["--tasks", "arc_easy", "--limit", "-1"], "--limit -1"),
])
def test_bad_input_is_one_line(ckpt, capsys, extra, message):
    assert main(["eval", "--checkpoint", str(ckpt / "ckpt"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("herd: error: ") and message in err[0]


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--tasks", "arc_easy"]) == 2
    assert "does not exist" in capsys.readouterr().err
