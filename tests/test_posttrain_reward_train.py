"""`herd reward` end to end on a tiny checkpoint with the official Llama 3 tokenizer: the first logged loss
equals the Bradley-Terry loss (no margin, ranked triples giving all three pairs) computed from transformers'
LlamaForSequenceClassification rewards on the same starting weights, in both row layouts; a run stopped
(or killed) mid-way and resumed reproduces the uninterrupted run exactly; the exported model loads in
transformers and its rewards reproduce the held-out accuracy and margin the run reported (full and LoRA,
whose score head trains too); held-out accuracy rises on the arithmetic preference task; bad pairs are
counted in the report; bad input is one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import herd.posttrain.reward_train as reward_train_module
from herd.cli import main
from herd.posttrain.arithmetic import preference_records
from herd.posttrain.preference_data import build_preference_data
from herd.posttrain.reward import RewardModel, load_reward_model, save_reward_model
from herd.posttrain.reward_train import RewardTrainConfig, reward_args, reward_weights, train_reward
from herd.tokenizer import Tokenizer
from herd.train.metrics import read_log
from helpers import tiny_chat_checkpoint, write_jsonl

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _msg(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


@pytest.fixture(scope="module")
def base(tmp_path_factory, official_tokenizer_model) -> Path:
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("base") / "tiny-hf", official_tokenizer_model)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Arithmetic pairs, two of them ranked triples (an edited reply above chosen), plus bad records."""
    records = preference_records(40, seed=5, max_operand=20)
    for r in records[:2]:
        r["edited"] = _msg("assistant", "Exactly: " + r["chosen"][0]["content"])
    bad = [{"prompt": _msg("user", "What is 1 + 1?"), "chosen": _msg("assistant", "1 + 1 = 2."),
            "rejected": _msg("assistant", "1 + 1 = 2.")},  # identical
           {"prompt": _msg("user", "What is 2 + 2?"), "chosen": _msg("assistant", ""),
            "rejected": _msg("assistant", "2 + 2 = 5.")},  # empty
           {"prompt": _msg("user", "What is 3 + 3?"), "chosen": _msg("assistant", "3 + 3 = 6. " * 40),
            "rejected": _msg("assistant", "3 + 3 = 7.")}]  # too long (with --overlong drop)
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", records + bad, raw_lines=["{not json"])


def config(base: Path, pairs: Path, out: Path, **kw) -> RewardTrainConfig:
    values = dict(init_from=str(base), data=[str(pairs)], out=str(out), max_seq_len=64, overlong="drop",
                  batch_size=4, steps=6, lr=3e-3, warmup_ratio=0.2, val_fraction=0.2, eval_every=3,
                  eval_on_start=False, checkpoint_every=2, log_every=100, tensorboard=False, seed=3,
                  threads=min(2, os.cpu_count() or 1))  # fixed: float sums depend on the thread count
    return RewardTrainConfig(**{**values, **kw})


def losses(out: Path, event: str = "train", key: str = "loss") -> list[float]:
    return [r[key] for r in read_log(out / "log.jsonl", event)]


def _hf_rewards(folder: Path, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """transformers' rewards of token sequences (right-padded with the pad id, read at the last non-pad token)."""
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder, torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=(ids != pad_id).long()).logits.squeeze(-1)


def _pairs_of(dataset, pad_id) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Every response as prompt + response ids, and every ranked (better, worse) pair of flat indices."""
    seqs, pairs = [], []
    for i in range(len(dataset)):
        first = len(seqs)
        rs = list(dataset.responses(i))
        seqs += [dataset.prompt(i).tolist() + dataset.response(j)[0].tolist() for j in rs]
        pairs += [(first + a, first + b) for a in range(len(rs)) for b in range(a + 1, len(rs))]
    return seqs, pairs


@pytest.mark.parametrize("layout", ["shared", "concat"])
def test_first_loss_equals_bradley_terry_on_transformers_rewards(layout, base, pairs, tmp_path,
                                                                 official_tokenizer_model):
    tok = Tokenizer.from_file(official_tokenizer_model)
    cfg = config(base, pairs, tmp_path / "run", steps=1, val_fraction=0.0, layout=layout, eval_every=0)
    data = build_preference_data(cfg.data_config(), tok, progress=False)
    assert data.report.ranked == 2
    cfg.batch_size = len(data.train)  # the first batch is then the whole training split, in some order
    train_reward(cfg)
    first = losses(tmp_path / "run")[0]
    # the starting reward model (the body of --init-from + the seeded head) as transformers loads it
    start = RewardModel(reward_args(base))
    start.load_state_dict(reward_weights(base, reward_args(base), cfg.seed), strict=True)
    save_reward_model(start, tmp_path / "start", tokenizer_path=official_tokenizer_model)
    seqs, ranked = _pairs_of(data.train, tok.pad_id)
    assert len(ranked) == len(data.train) + 2 * 2  # a triple gives three pairs
    r = _hf_rewards(tmp_path / "start", seqs, tok.pad_id)
    want = torch.stack([-F.logsigmoid(r[a] - r[b]) for a, b in ranked]).mean().item()  # Llama 3: no margin
    assert first == pytest.approx(want, rel=1e-5, abs=1e-6)
    step = read_log(tmp_path / "run" / "log.jsonl", "train")[0]
    assert step["pairs"] == len(ranked)
    assert step["accuracy"] == pytest.approx(sum(bool(r[a] > r[b]) for a, b in ranked) / len(ranked), abs=1e-6)


@pytest.fixture(scope="module")
def reference(base, pairs, tmp_path_factory):
    """The uninterrupted full run every resume is compared with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, train_reward(config(base, pairs, out))


def test_export_loads_in_transformers_and_reproduces_the_reported_accuracy(reference, base, pairs,
                                                                           official_tokenizer_model):
    out, summary = reference
    assert summary["steps"] == 6 and (out / "loss.png").is_file() and (out / "final" / "tokenizer.model").is_file()
    cfg_json = json.loads((out / "final" / "config.json").read_text())
    assert cfg_json["architectures"] == ["LlamaForSequenceClassification"] and cfg_json["herd_reward"]["chat_style"] == "hf"
    tok = Tokenizer.from_file(official_tokenizer_model)
    data = build_preference_data(config(base, pairs, out).data_config(), tok, progress=False)
    seqs, ranked = _pairs_of(data.val, tok.pad_id)
    r = _hf_rewards(out / "final", seqs, tok.pad_id)
    acc = sum(bool(r[a] > r[b]) for a, b in ranked) / len(ranked)
    margin = sum(float(r[a] - r[b]) for a, b in ranked) / len(ranked)
    assert summary["val_pairs"] == len(ranked) and summary["val_accuracy"] == pytest.approx(acc, abs=1e-9)
    assert summary["val_margin"] == pytest.approx(margin, rel=1e-4, abs=1e-5)
    # herd reads the same rewards from the same folder
    from herd.posttrain.reward import score_sequences

    ours = torch.tensor(score_sequences(load_reward_model(out / "final"), seqs, pad_id=tok.pad_id))
    torch.testing.assert_close(ours, r, rtol=1e-4, atol=1e-5)
    assert losses(out, "val", "accuracy")[-1] == pytest.approx(acc, abs=1e-9)


def test_stop_and_resume_reproduces_the_run_exactly(reference, base, pairs, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    assert train_reward(config(base, pairs, out, stop_at=4))["stopped_at"] == 4
    # the CLI picks the saved settings up again
    assert main(["reward", "--out", str(out), "--resume"]) == 0
    assert losses(out) == losses(ref_out)  # bit for bit, every step
    assert losses(out, "val") == losses(ref_out, "val")
    a, b = load_reward_model(ref_out / "final"), load_reward_model(out / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_killed_lora_run_resumes_exactly_and_its_head_trains(base, pairs, tmp_path, monkeypatch,
                                                            official_tokenizer_model):
    lora = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.1, lora_targets=["all-linear"], lr=1e-2)
    ref = tmp_path / "ref"
    train_reward(config(base, pairs, ref, **lora))
    real, calls = reward_train_module.train_step, []

    def dying(*args, **kwargs):  # dies inside step 5, after the step-4 checkpoint, as a killed process would
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(reward_train_module, "train_step", dying)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_reward(config(base, pairs, out, **lora))
    monkeypatch.setattr(reward_train_module, "train_step", real)
    train_reward(config(base, pairs, out, resume=True, **lora))
    assert losses(out) == losses(ref)
    # the checkpoints hold only what trains: adapters and the score head
    from herd.train import state

    ckpt = state.latest_state(out / "checkpoints")
    import torch.distributed.checkpoint as dcp

    keys = {k for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("model.")}
    assert "model.score.weight" in keys and all(".lora_" in k or k == "model.score.weight" for k in keys)
    final = load_reward_model(out / "final")
    start = reward_weights(base, reward_args(base), 3)
    assert not torch.equal(final.score.weight, start["score.weight"])  # the head trained with the adapters
    assert not torch.equal(final.layers[0].attention.wq.weight, start["layers.0.attention.wq.weight"])  # merged
    tok = Tokenizer.from_file(official_tokenizer_model)
    data = build_preference_data(config(base, pairs, out).data_config(), tok, progress=False)
    seqs, ranked = _pairs_of(data.val, tok.pad_id)
    r = _hf_rewards(out / "final", seqs, tok.pad_id)
    acc = sum(bool(r[a] > r[b]) for a, b in ranked) / len(ranked)
    assert losses(out, "val", "accuracy")[-1] == pytest.approx(acc, abs=1e-9)  # the merged export = the trained model


def test_bad_pairs_are_counted_in_the_report(reference):
    out, _ = reference
    report = json.loads((out / "data_report.json").read_text())
    assert report["dropped"] == {"identical_responses": 1, "empty_response": 1, "too_long": 1, "malformed_json": 1}
    assert report["kept"] == 40 and report["pairs"] == 38 + 2 * 3


def test_heldout_accuracy_rises_on_arithmetic(base, tmp_path):
    # Each question comes with several wrong results (one record per (question, wrong result), ids made
    # distinct so the hash split sees them apart): the held-out pairs are mostly questions seen in training
    # with a wrong result that was not, and a few new questions. A reward model that learned which result
    # is right (and that a small task's right results tend to be the smaller ones) ranks them correctly;
    # a tiny model from random weights cannot learn addition itself in a few hundred steps.
    records = []
    for seed in range(6):
        for r in preference_records(100, seed=seed, max_operand=9):
            records.append({**r, "id": f"{r['id']}/{seed}"})
    data = write_jsonl(tmp_path / "arith.jsonl", records)
    # Meta's plain chat style: no system header, so the reply is a larger share of each row
    summary = train_reward(config(base, data, tmp_path / "run", steps=300, batch_size=16, lr=3e-3, eval_every=0,
                                  eval_on_start=True, checkpoint_every=0, val_fraction=0.2, chat_style="meta",
                                  threads=1))
    start = summary["start_eval"]
    assert start["val_pairs"] > 100 and start["val_accuracy"] < 0.5 and abs(start["val_margin"]) < 0.01
    # measured: accuracy 0.468 -> 0.556, margin -0.0002 -> +0.54, loss 0.693 -> 0.648 (124 held-out pairs)
    assert summary["val_accuracy"] > start["val_accuracy"] + 0.05 and summary["val_margin"] > 0.3
    assert summary["val_loss"] < start["val_loss"] - 0.03


@pytest.mark.parametrize("argv, message", [
    (["reward", "--data", "x.jsonl"], "--init-from"),
    (["reward", "--init-from", "{base}", "--data", "{pairs}", "--layout", "diagonal"], "--layout"),
    (["reward", "--init-from", "{base}", "--data", "{pairs}", "--max-seq-len", "4096"], "context"),
    (["reward", "--init-from", "{base}"], "--data"),
])
def test_bad_input_is_one_line(argv, message, base, pairs, tmp_path, capsys):
    argv = [a.format(base=base, pairs=pairs) for a in argv] + ["--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd: error:") and "\n" not in err and message in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_reward_help_lists_the_groups(capsys):
    with pytest.raises(SystemExit):
        main(["reward", "--help"])
    text = capsys.readouterr().out
    for flag in ("--init-from", "--data", "--layout", "--lora-rank", "--resume", "--eval-every", "--overlong"):
        assert flag in text
    assert "--sample-prompts" not in text and "--export-format" not in text
