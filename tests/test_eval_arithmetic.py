"""`herd eval --tasks arithmetic:PATH`: chat prompts rendered in the chosen chat style, answered greedily,
checked exactly. A tiny byte-level model is taught four replies (two right, one wrong, one without a
result) in the meta style, so the scores are known in advance; in the other style it sees prompts it
was not taught, which must show."""

from __future__ import annotations

import json

import pytest
import torch

from herd.errors import HerdError
from herd.eval.runner import EvalConfig, evaluate
from herd.tokenizer import ChatFormat
from tests.safety_fixtures import _fit
from tests.server_fixtures import byte_tokenizer, tiny_model

TAUGHT = [("What is 2 + 3?", "2 + 3 = 5."), ("What is 9 - 4?", "9 - 4 = 5."),
          ("What is 7 + 7?", "7 + 7 = 15."), ("What is 6 - 1?", "I am not sure.")]


@pytest.fixture(scope="module")
def taught():
    torch.set_num_threads(1)
    tok = byte_tokenizer()
    model = tiny_model(tok.n_words, seed=3, max_seq_len=256)
    chat = ChatFormat(tok, style="meta")
    seqs = [chat.encode_dialog_with_mask([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in TAUGHT]
    assert _fit(model, seqs, steps=600, lr=1e-2) < 0.01
    return model, tok


def test_scores_of_taught_replies(taught, tmp_path):
    model, tok = taught
    prompts = tmp_path / "test.jsonl"
    # an SFT record (its answer dropped) and prompt-only records both work
    rows = [{"id": "a", "messages": [{"role": "user", "content": TAUGHT[0][0]}, {"role": "assistant", "content": "x"}]}]
    rows += [{"id": str(i), "messages": [{"role": "user", "content": q}]} for i, (q, _) in enumerate(TAUGHT[1:])]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = evaluate(model, tok, EvalConfig(tasks=f"arithmetic:{prompts}", chat_style="meta", samples=True,
                                             out=str(tmp_path / "meta")))
    scores = report["tasks"]["arithmetic:test.jsonl"]["metrics"]
    assert scores["correct"] == pytest.approx(0.5) and scores["formatted"] == pytest.approx(0.75)
    samples = [json.loads(x) for x in next((tmp_path / "meta" / "samples").iterdir()).read_text().splitlines()]
    assert [s["completion"] for s in samples] == [a for _, a in TAUGHT]
    other = evaluate(model, tok, EvalConfig(tasks=f"arithmetic:{prompts}", chat_style="hf", samples=True,
                                            out=str(tmp_path / "hf")))
    hf = [json.loads(x)["completion"] for x in next((tmp_path / "hf" / "samples").iterdir()).read_text().splitlines()]
    assert hf != [a for _, a in TAUGHT] and other["config"]["chat_style"] == "hf"


def test_bad_prompt_files(tmp_path):
    from herd.eval.tasks import TaskOptions, build_tasks

    with pytest.raises(HerdError, match="does not exist"):
        build_tasks(f"arithmetic:{tmp_path}/none.jsonl", TaskOptions())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    with pytest.raises(HerdError, match="not a 'What is A \\+ B\\?' question"):
        build_tasks(f"arithmetic:{bad}", TaskOptions())
