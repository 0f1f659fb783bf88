"""herd compare: judges, both-order averaging, rates with Wilson intervals by hand, the command end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from herd.cli import main
from herd.eval.compare import CompareConfig, outcome, run_comparison, summarize
from herd.eval.judge import Judge, LLMJudge, RewardModelJudge


def test_rates_and_wilson_intervals_by_hand():
    pairs = ([{"category": "code", "outcome": "win", "consistent": True}] * 7
             + [{"category": "code", "outcome": "tie", "consistent": False}] * 2
             + [{"category": "chat", "outcome": "loss", "consistent": True}])
    s = summarize(pairs)
    overall = s["overall"]
    assert (overall["n"], overall["win"], overall["tie"], overall["loss"]) == (10, 0.7, 0.2, 0.1)
    # Wilson, 7 of 10: centre (0.7 + 1.96^2 / 20) / (1 + 1.96^2 / 10) = 0.64450, half-width 0.24770
    assert overall["win_ci95"] == [pytest.approx(0.3968, abs=1e-4), pytest.approx(0.8922, abs=1e-4)]
    assert overall["win_rate_ties_half"] == pytest.approx(0.8)
    assert overall["position_consistency"] == pytest.approx(0.8)
    assert s["code"]["n"] == 9 and s["chat"]["loss"] == 1.0


class BiasedJudge(Judge):
    """Prefers the first position by `bias` and the longer reply by `skill`."""

    def __init__(self, bias: float, skill: float):
        self.bias, self.skill = bias, skill

    def prob_first_better(self, prompts, firsts, seconds):
        return [0.5 + self.bias + (self.skill if len(a) > len(b) else -self.skill if len(a) < len(b) else 0.0)
                for a, b in zip(firsts, seconds)]


def _run(tmp_path, judge, replies_a, replies_b, monkeypatch):
    import herd.eval.compare as compare

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}", "category": "c"}) + "\n" for i in range(len(replies_a))))
    answers = {"A": replies_a, "B": replies_b}
    monkeypatch.setattr(compare, "cached_replies", lambda path, ckpt, *a, **k: answers[ckpt])
    return run_comparison("A", "B", CompareConfig(prompts=str(prompts), out=str(tmp_path / "out")), judge=judge)


def test_both_orders_cancel_a_position_bias(tmp_path, monkeypatch):
    # a judge that only ever prefers the first position: every pair is a tie, and inconsistent
    r = _run(tmp_path, BiasedJudge(bias=0.3, skill=0.0), ["x", "yy"], ["zz", "w"], monkeypatch)
    assert r["categories"]["overall"]["tie"] == 1.0
    assert r["categories"]["overall"]["position_consistency"] == 0.0
    # position bias 0.2 plus a real preference for longer replies of 0.2: A wins where A is longer
    r = _run(tmp_path, BiasedJudge(bias=0.2, skill=0.2), ["long reply", "s"], ["s", "long reply"], monkeypatch)
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert [p["outcome"] for p in pairs] == ["win", "loss"]
    assert pairs[0]["p_a_better"] == pytest.approx((0.9 + 1 - 0.5) / 2)


def test_reward_model_judge_is_bradley_terry(tmp_path, monkeypatch):
    judge = RewardModelJudge(lambda prompts, replies: [float(len(r)) for r in replies])
    assert judge.prob_first_better(["q"], ["abc"], ["a"]) == [pytest.approx(1 / (1 + math.exp(-2)))]
    r = _run(tmp_path, judge, ["abc", "a", "ab"], ["a", "abc", "ab"], monkeypatch)
    overall = r["categories"]["overall"]
    assert (overall["win"], overall["loss"], overall["tie"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3),
                                                                 pytest.approx(1 / 3))
    assert overall["position_consistency"] is None  # asked in one order only


def test_outcome_margin():
    assert [outcome(p, 0.1) for p in (0.61, 0.6, 0.5, 0.4, 0.39)] == ["win", "tie", "tie", "tie", "loss"]


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    from herd.checkpoint import save_checkpoint
    from herd.model import ModelArgs, Transformer
    from tests.conftest import official_tokenizer_dir

    root = tmp_path_factory.mktemp("compare")
    tok = official_tokenizer_dir() / "tokenizer.model"
    for seed, name in ((0, "a"), (1, "b"), (2, "judge")):
        torch.manual_seed(seed)
        m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=128256, multiple_of=16, max_seq_len=512,
                                  tie_embeddings=True))
        m.init_weights(std=0.5)
        save_checkpoint(m, root / name, tokenizer_path=tok)
    return root


def test_llm_judge_reads_the_answer_letter_probabilities(tiny_ckpts):
    from herd.eval.loading import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(tiny_ckpts / "judge")
    judge = LLMJudge(model, tok)
    (p,) = judge.prob_first_better(["Say hi."], ["Hi!"], ["Go away."])
    ids = judge.prompt_ids("Say hi.", "Hi!", "Go away.")
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1]
    a, b = tok.encode("A")[0], tok.encode("B")[0]
    assert p == pytest.approx(float(torch.softmax(logits[[a, b]], dim=0)[0]), abs=1e-5)
    assert ids[-4:] == [tok.start_header_id, *tok.encode("assistant"), tok.end_header_id, *tok.encode("\n\n")][-4:]


def test_compare_command_end_to_end(tiny_ckpts, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Write a haiku about the sea.", "category": "creative"},
            {"prompt": "What is 2 + 2?", "category": "math"},
            {"messages": [{"role": "user", "content": "Name a colour."}], "category": "creative"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["compare", str(tiny_ckpts / "a"), str(tiny_ckpts / "b"), "--prompts", str(prompts), "--judge",
            str(tiny_ckpts / "judge"), "--max-new-tokens", "6", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| overall | 3 |" in out and "| creative | 2 |" in out and "| math | 1 |" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    overall = results["categories"]["overall"]
    assert overall["win"] + overall["tie"] + overall["loss"] == pytest.approx(1.0)
    assert main(args) == 0  # replies are reused, the verdicts are the same
    assert "reusing" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["categories"] == results["categories"]


def test_compare_bad_input_is_one_line(tiny_ckpts, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no prompt field"}) + "\n")
    base = ["compare", str(tiny_ckpts / "a"), str(tiny_ckpts / "b"), "--judge", str(tiny_ckpts / "judge")]
    for extra, message in ((["--prompts", str(bad)], "has no 'prompt' string"),
                           (["--prompts", str(tmp_path / "none.jsonl")], "does not exist"),
                           (["--prompts", str(bad), "--judge-kind", "oracle"], "unknown --judge-kind")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]


def test_reward_model_judge_from_a_reward_checkpoint(tiny_ckpts, tmp_path, capsys):
    """--judge-kind auto recognises a reward model (LlamaForSequenceClassification, as herd.posttrain
    saves it) and judges by sigmoid(r_A - r_B), with herd.posttrain's own scorer giving r."""
    from herd.checkpoint import load_checkpoint
    from herd.posttrain.reward import RewardModel, load_reward_scorer, save_reward_model
    from tests.conftest import official_tokenizer_dir

    rm = RewardModel.from_transformer(load_checkpoint(tiny_ckpts / "judge"), std=1.0)
    save_reward_model(rm, tmp_path / "rm", tokenizer_path=official_tokenizer_dir() / "tokenizer.model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in
                               (("Say hello.", "chat"), ("Add 2 and 3.", "math"), ("Name a fruit.", "chat"))))
    out = tmp_path / "out"
    assert main(["compare", str(tiny_ckpts / "a"), str(tiny_ckpts / "b"), "--prompts", str(prompts), "--judge",
                 str(tmp_path / "rm"), "--max-new-tokens", "5", "--out", str(out), "--tie-margin", "0"]) == 0
    assert "judge consistent" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["judge_kind"] == "reward" and results["categories"]["overall"]["position_consistency"] is None
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    score = load_reward_scorer(tmp_path / "rm")
    ra = score([p["prompt"] for p in pairs], [p["reply_a"] for p in pairs])
    rb = score([p["prompt"] for p in pairs], [p["reply_b"] for p in pairs])
    for p, a, b in zip(pairs, ra, rb):
        assert p["p_a_better"] == pytest.approx(1 / (1 + math.exp(-(a - b))), abs=1e-6)
        assert p["outcome"] == ("win" if a > b else "loss" if a < b else "tie")
