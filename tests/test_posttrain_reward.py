"""Reward models: herd's reward equals transformers' LlamaForSequenceClassification on the same weights
(herd-saved folders load in transformers, with right or left padding; transformers-saved ones load in
herd), the body comes from any checkpoint without copying, Bradley-Terry training through the shared
training step learns a preference, and `herd score` (files, stdin, preference records, bad lines,
one-line errors, a tokenizer that is not the reward model's refused)."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from herd.checkpoint import load_checkpoint, save_checkpoint
from herd.cli import main
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer
from herd.posttrain import (PreferenceDataConfig, RewardModel, RewardScorer, bradley_terry_loss,
                            build_preference_data, collate_preferences, load_reward_model, load_reward_scorer,
                            reward_model_from_checkpoint, save_reward_model)
from herd.posttrain.losses import pair_metrics, reward_pair_rewards
from herd.tokenizer import ChatFormat, Tokenizer
from herd.train.step import train_step

transformers = pytest.importorskip("transformers")

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=96)
CONVS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help you today?"}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
]


@pytest.fixture(scope="module")
def tok(official_tokenizer_model) -> Tokenizer:
    return Tokenizer.from_file(official_tokenizer_model)


@pytest.fixture(scope="module")
def rm() -> RewardModel:
    torch.manual_seed(0)
    body = Transformer(ARGS)
    body.init_weights(std=0.1)
    return RewardModel.from_transformer(body, seed=1, std=0.5).eval()


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, rm, official_tokenizer_model) -> Path:
    return save_reward_model(rm, tmp_path_factory.mktemp("rm") / "rm", tokenizer_path=official_tokenizer_model)


def _padded(seqs, pad, left=False):
    width = max(map(len, seqs))
    rows = [([pad] * (width - len(s)) + s) if left else (s + [pad] * (width - len(s))) for s in seqs]
    return torch.tensor(rows)


def test_reward_equals_transformers_sequence_classification(rm, rm_dir, tok):
    cfg = json.loads((rm_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["pad_token_id"] == tok.pad_id
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    seqs = [ChatFormat(tok).encode_dialog_prompt(c, add_generation_prompt=False) for c in CONVS]
    ours = RewardScorer(rm, tok).score_ids(seqs)
    assert len({len(s) for s in seqs}) == 3 and all(s[-1] == tok.eot_id for s in seqs)
    for left in (False, True):
        with torch.no_grad():
            ids = _padded(seqs, tok.pad_id, left)
            # transformers reads the rightmost non-pad token either way; left padding also needs the mask
            want = hf(ids, attention_mask=(ids != tok.pad_id).long()).logits.squeeze(-1)
        torch.testing.assert_close(torch.tensor(ours), want, rtol=1e-4, atol=1e-5)
    assert max(ours) - min(ours) > 1e-2  # the rewards differ: a test that could fail
    back = load_reward_model(rm_dir)
    assert back.reward_config.pad_id == tok.pad_id and back.reward_config.chat_style == "hf"
    torch.testing.assert_close(torch.tensor(RewardScorer(back, tok).score_ids(seqs)), torch.tensor(ours))


def test_transformers_saved_reward_model_loads_in_herd(tmp_path, tok):
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_id,
                                   max_position_embeddings=128)
    torch.manual_seed(3)
    hf = transformers.LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf-rm")
    ours = load_reward_model(tmp_path / "hf-rm")
    seqs = [ChatFormat(tok).encode_dialog_prompt(c, add_generation_prompt=False) for c in CONVS]
    with torch.no_grad():
        want = hf(_padded(seqs, tok.pad_id)).logits.squeeze(-1)
    torch.testing.assert_close(torch.tensor(RewardScorer(ours, tok).score_ids(seqs)), want, rtol=1e-4, atol=1e-5)


def test_body_from_any_checkpoint_without_copy(tmp_path, official_tokenizer_model):
    torch.manual_seed(0)
    base = Transformer(ARGS)
    base.init_weights()
    rm = RewardModel.from_transformer(base)
    assert rm.output is None and "output.weight" not in rm.state_dict()
    assert rm.tok_embeddings.weight.data_ptr() == base.tok_embeddings.weight.data_ptr()
    assert rm.num_params() == sum(p.numel() for p in rm.parameters()) == base.num_params() - ARGS.vocab_size * ARGS.dim + ARGS.dim
    x = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        want = rm.score(base.features(x)[:, -1]).squeeze(-1)
        torch.testing.assert_close(rm(x), want)
    with pytest.raises(HerdError, match="no vocabulary head"):
        rm.logits(base.features(x))
    for fmt in ("herd", "hf", "meta"):
        save_checkpoint(base, tmp_path / fmt, format=fmt, tokenizer_path=official_tokenizer_model)
        got = reward_model_from_checkpoint(tmp_path / fmt, seed=0)
        with torch.no_grad():
            torch.testing.assert_close(got(x), rm(x), rtol=1e-5, atol=1e-6)
    save_reward_model(rm, tmp_path / "rm", tokenizer_path=official_tokenizer_model)
    assert isinstance(reward_model_from_checkpoint(tmp_path / "rm"), RewardModel)
    with pytest.raises(HerdError, match="is a reward model") as e:
        load_checkpoint(tmp_path / "rm")
    assert "\n" not in str(e.value)


def test_scorer_is_compare_judge_function(rm, tok):
    scorer = RewardScorer(rm, tok, batch_size=2)
    prompts, replies = ["What is 2+2?", "Name a color."], ["4", "Blue."]
    assert scorer(prompts, replies) == pytest.approx(scorer.score_conversations([CONVS[0], CONVS[2]]), abs=1e-6)
    long = "word " * 200
    assert scorer([long, "Hi"], ["x", "y"])[0] is None  # longer than the model's context: no score
    with pytest.raises(HerdError):
        scorer(["a"], ["b", "c"])


@pytest.fixture
def one_thread():
    """Tiny ops on a loaded 2-core machine run faster on one thread than waiting on two (herd.threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bradley_terry_training_learns_a_preference(tmp_path, tok, one_thread):
    """A reward model trained with herd's shared training step on pairs where the reply with a positive
    word wins (words drawn at random, so an untrained model is near chance) ranks held-out pairs correctly."""
    rnd = random.Random(0)
    good, bad = ["yes", "great", "right", "correct", "sure", "good"], ["no", "wrong", "bad", "never", "awful", "nope"]
    recs = []
    for i in range(64):
        n = rnd.randint(0, 99)
        g, b = f"{rnd.choice(good)} {n}", f"{rnd.choice(bad)} {n}"
        recs.append({"id": i, "prompt": f"Is {n} fine?", "chosen": g, "rejected": b})
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    data = build_preference_data(PreferenceDataConfig(data=[str(path)], val_fraction=0.3, seed=1), tok, False)
    torch.manual_seed(0)
    body = Transformer(ARGS)
    body.init_weights()
    model = RewardModel.from_transformer(body).train()
    model.tok_embeddings.weight.requires_grad_(False)  # 128K x 32 dense gradients would dominate the test's time
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    val = collate_preferences(data.val, list(range(len(data.val))), "shared", tok.pad_id)

    def loss_fn(batch):
        rc, rr = reward_pair_rewards(model(batch.tokens, positions=batch.positions, mask=batch.mask, last=batch.last),
                                     batch)
        return bradley_terry_loss(rc, rr).sum(), pair_metrics(rc, rr)

    def accuracy():
        with torch.no_grad():
            rc, rr = reward_pair_rewards(model(val.tokens, positions=val.positions, mask=val.mask, last=val.last), val)
        return float((rc > rr).float().mean())

    before = accuracy()
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        idx = torch.randperm(len(data.train), generator=g)[:8].tolist()
        batch = collate_preferences(data.train, idx, "shared", tok.pad_id)
        result = train_step(model, opt, [batch], loss_fn, denominator=batch.n_pairs)
    after = accuracy()
    print(f"held-out accuracy {before:.2f} -> {after:.2f} on {len(data.val)} pairs")
    assert after >= 0.9 and after > before
    assert result.metrics["accuracy"] > 0.5 and len(data.val) >= 6


# --- herd score ---------------------------------------------------------------------------------


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_score_cli_files_stdin_and_errors(tmp_path, rm, rm_dir, tok, capsys, monkeypatch):
    records = [{"id": "a", "messages": CONVS[0]}, "this is not json",
               {"prompt": "What is 2+2?", "completion": "4"},
               {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": "4", "rejected": "5"},
               {"messages": [{"role": "robot", "content": "beep"}]},
               {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]},
               {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "ok"}]}]
    data = tmp_path / "convs.jsonl"
    data.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    assert main(["score", "--reward-model", str(rm_dir), str(data), "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    lines = _lines(out)
    assert len(lines) == len(records)
    scorer = RewardScorer(rm, tok)
    want = scorer.score_conversations([CONVS[0], CONVS[0]])
    assert lines[0]["id"] == "a" and lines[0]["reward"] == pytest.approx(want[0], abs=1e-5)
    assert lines[1]["error"].startswith("malformed_json")
    assert lines[2]["reward"] == pytest.approx(want[1], abs=1e-5)  # a string pair is a user turn + reply
    pair = scorer.score_conversations([CONVS[0], [CONVS[0][0], {"role": "assistant", "content": "5"}]])
    assert lines[3]["chosen"] == pytest.approx(pair[0], abs=1e-5) and lines[3]["rejected"] == pytest.approx(pair[1], abs=1e-5)
    assert lines[3]["correct"] == (pair[0] > pair[1])
    assert lines[4]["error"].startswith("unknown_role") and lines[5]["error"].startswith("too_long")
    assert lines[6]["error"].startswith("bad_messages") and lines[6]["where"] == f"{data}:7"
    assert "scored 2 conversations" in err and "1 preference records" in err and "1 malformed_json" in err

    # stdin and --output (written whole)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"messages": CONVS[2]}) + "\n"))
    assert main(["score", "--reward-model", str(rm_dir), "-", "--output", str(tmp_path / "out.jsonl")]) == 0
    (line,) = _lines((tmp_path / "out.jsonl").read_text())
    assert line["reward"] == pytest.approx(scorer.score_conversations([CONVS[2]])[0], abs=1e-5)


def test_score_cli_one_line_errors(tmp_path, rm_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "plain"}\n')
    assert main(["score", "--reward-model", str(rm_dir), str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd: error: no record could be scored") and "\n" not in err
    assert main(["score", "--reward-model", str(tmp_path / "missing"), str(data)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a tokenizer that is not the reward model's: refused (its ids would mean other text to the model)
    lines = (rm_dir / "tokenizer.model").read_text().splitlines()
    other = tmp_path / "other.model"
    other.write_text("\n".join(lines[:5000]) + "\n")
    assert main(["score", "--reward-model", str(rm_dir), "--tokenizer", str(other), str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "differs from the checkpoint's own" in err and "\n" not in err
    with pytest.raises(HerdError):
        load_reward_scorer(rm_dir, other)


def test_score_and_average_help(capsys):
    for cmd in ("score", "average"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: herd " + cmd in capsys.readouterr().out
