"""`herd dpo` end to end on tiny checkpoints with the official Llama 3 tokenizer: with the Llama 3 extras off,
the loop's first logged loss (and reward metrics) equal TRL 1.16 DPOTrainer's on the same two checkpoints
and records; the cached reference log-probs equal transformers' forward of the reference checkpoint; a run
killed in its caching pass and again mid-training, then resumed, reproduces the uninterrupted curve and
weights exactly, recomputing only the cache chunks it had not written; with LoRA the reference is the base
with the adapters off; bad input is counted in the report or ends in one line, writing nothing."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import herd.posttrain.dpo as dpo_module
import herd.posttrain.reference_cache as cache_module
from herd.checkpoint import load_checkpoint
from herd.cli import main
from herd.posttrain.dpo import DPOTrainConfig, dpo
from herd.posttrain.preference_data import build_preference_data
from herd.posttrain.reference_cache import ReferenceCache
from herd.tokenizer import Tokenizer
from herd.train.metrics import read_log
from helpers import tiny_chat_checkpoint, write_jsonl

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic pairs in TRL's explicit-prompt form, some with a system turn and some as strings."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 99, 2))
        wrong = a + b + int(rng.integers(1, 9))
        if i % 3 == 0:
            out.append({"prompt": f"Add {a} and {b}.", "chosen": f"{a + b}.", "rejected": f"It is {wrong}, I think."})
        else:
            out.append({"prompt": [{"role": "system", "content": "Answer briefly."},
                                   {"role": "user", "content": f"What is {a} + {b}?"}],
                        "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}."}],
                        "rejected": [{"role": "assistant", "content": f"{a} + {b} = {wrong}."}]})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, official_tokenizer_model) -> Path:
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("base") / "policy-hf", official_tokenizer_model)


@pytest.fixture(scope="module")
def other(tmp_path_factory, official_tokenizer_model) -> Path:
    """A second tiny checkpoint (other weights): a --reference that is not the policy."""
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("other") / "ref-hf", official_tokenizer_model, seed=11)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", preference_records(24))


@pytest.fixture(scope="module")
def tok(official_tokenizer_model) -> Tokenizer:
    return Tokenizer.from_file(official_tokenizer_model)


def config(base: Path, prefs: Path, out: Path, **kw) -> DPOTrainConfig:
    values = dict(init_from=str(base), data=[str(prefs)], out=str(out), max_seq_len=128, batch_size=4, steps=6,
                  lr=1e-3, warmup_ratio=0.2, val_fraction=0.2, eval_every=3, eval_on_start=False, sample_prompts=1,
                  sample_tokens=4, checkpoint_every=2, log_every=100, tensorboard=False, peak_tflops=1.0, seed=3,
                  reference_chunk=5, threads=min(2, os.cpu_count() or 1))  # fixed: float sums depend on threads
    return DPOTrainConfig(**{**values, **kw})


def logged(out: Path, key: str = "loss", event: str = "train") -> list[float]:
    return [r[key] for r in read_log(out / "log.jsonl", event)]


# -- the loop's first loss against TRL's DPOTrainer -------------------------------------------------


@pytest.mark.parametrize("extras", ["plain", "nll"])
def test_first_logged_loss_equals_trl_dpo_trainer(extras, base, other, prefs, tmp_path, official_tokenizer_json):
    """Policy and reference are different checkpoints (else the first loss is log 2 whatever the code does);
    one batch holds every training pair, so batch order cannot matter."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl.chat_template_utils import llama3_1_chat_template

    herd_extra, trl_losses, trl_weights = ((dict(nll_weight=0.0), ["sigmoid"], [1.0]) if extras == "plain" else
                                           (dict(nll_weight=0.2), ["sigmoid", "sft"], [1.0, 0.2]))
    # message lists only: Arrow (TRL's datasets) cannot hold string and list records in one column
    records = [r for r in preference_records(36) if isinstance(r["chosen"], list)]
    prefs = write_jsonl(tmp_path / "conversational.jsonl", records)
    cfg = config(base, prefs, tmp_path / "run", reference=str(other), mask="completion", steps=1, val_fraction=0.0,
                 batch_size=len(records), eval_every=0, sample_prompts=0, **herd_extra)
    summary = dpo(cfg)
    first = read_log(tmp_path / "run" / "log.jsonl", "train")[0]

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(official_tokenizer_json),
                                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                                  pad_token="<|finetune_right_pad_id|>")
    hf_tok.backend_tokenizer.model.ignore_merges = True
    hf_tok.chat_template = llama3_1_chat_template
    policy = transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    ref = transformers.LlamaForCausalLM.from_pretrained(other, torch_dtype=torch.float32).eval()
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, report_to=[], use_cpu=True, max_length=None,
                         bf16=False)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=hf_tok)
    trainer.loss_types, trainer.loss_weights = trl_losses, trl_weights
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    with torch.no_grad():
        want = trainer.compute_loss(policy, dict(batch)).item()
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert abs(want - 0.6931) > 1e-3  # policy and reference differ: a test that could fail
    assert first["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert first["rewards_chosen"] == pytest.approx(metrics["rewards/chosen"][-1], rel=1e-4, abs=1e-6)
    assert first["margin"] == pytest.approx(metrics["rewards/margins"][-1], rel=1e-4, abs=1e-6)
    assert first["accuracy"] == pytest.approx(metrics["rewards/accuracies"][-1], abs=1e-6)
    assert summary["steps"] == 1 and Path(summary["final"]).is_dir()


# -- the reference cache ---------------------------------------------------------------------------


def _transformers_sums(checkpoint: Path, data) -> np.ndarray:
    """[n_responses, 2]: transformers' log-prob of every response summed over all its tokens and over the
    tokens the Llama 3 mask keeps, one full forward of prompt + response each."""
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    out = []
    for i in range(len(data)):
        p = data.prompt(i).tolist()
        for j in data.responses(i):
            r, fmt = data.response(j)
            with torch.no_grad():
                logits = hf(torch.tensor([p + r.tolist()])).logits[0]
            lp = F.log_softmax(logits[len(p) - 1:-1], -1).gather(1, torch.tensor(r.tolist())[:, None]).squeeze(1)
            out.append([float(lp.sum()), float(lp[~torch.from_numpy(fmt)].sum())])
    return np.array(out)


def _cache(out: Path, split: str) -> np.ndarray:
    parts = sorted((out / "reference_logps").glob(f"{split}_*.npy"))
    return np.concatenate([np.load(p) for p in parts])


@pytest.fixture(scope="module")
def uninterrupted(base, prefs, tmp_path_factory):
    """The full fine-tuning run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, dpo(config(base, prefs, out))


def test_cached_reference_equals_a_fresh_forward_and_training_learns(uninterrupted, base, prefs, tok):
    out, summary = uninterrupted
    data = build_preference_data(config(base, prefs, out).data_config(), tok, progress=False)
    for split, d in (("train", data.train), ("val", data.val)):
        np.testing.assert_allclose(_cache(out, split), _transformers_sums(base, d), rtol=1e-5, atol=2e-4)
    assert json.loads((out / "reference_logps" / "key.json").read_text())["key"] == summary["reference_key"]
    # lr 1e-3 on 6 steps: the pairs are learned; evaluated on held-out pairs at steps 3 and 6
    val = read_log(out / "log.jsonl", "val")
    assert [r["step"] for r in val] == [3, 6]
    assert val[-1]["margin"] > val[0]["margin"] > 0 and val[-1]["dpo_loss"] < 0.69
    assert summary["val_accuracy"] == val[-1]["accuracy"] and 0.5 <= summary["val_accuracy"] <= 1.0
    replies = read_log(out / "log.jsonl", "replies")
    assert replies and replies[0]["replies"][0]["question"]
    assert (out / "final" / "tokenizer.model").is_file() and (out / "loss.png").is_file()


def test_cache_of_other_data_or_reference_is_discarded(tmp_path, base, other, prefs, tok):
    from herd.posttrain.reference_cache import reference_key

    data = build_preference_data(config(base, prefs, tmp_path).data_config(), tok, progress=False)
    fewer = build_preference_data(config(base, write_jsonl(tmp_path / "fewer.jsonl", preference_records(20)),
                                         tmp_path).data_config(), tok, progress=False)
    key = reference_key({"train": data.train}, str(base))
    assert key != reference_key({"train": fewer.train}, str(base))
    assert key != reference_key({"train": data.train}, str(other))
    assert key != reference_key({"train": data.train}, str(base), precision="bf16")
    folder = tmp_path / "cache"
    cache = ReferenceCache(folder, key, chunk=4)
    cache.open()
    cache.compute("train", data.train, lambda b: torch.zeros(b.targets.shape[0]), progress=False)
    assert cache.missing("train", data.train) == 0 and not cache.discarded
    again = ReferenceCache(folder, key, chunk=4)
    again.open()
    assert not again.discarded and again.missing("train", data.train) == 0  # the same key: reused
    stale = ReferenceCache(folder, reference_key({"train": fewer.train}, str(base)), chunk=4)
    stale.open()
    assert stale.discarded and stale.missing("train", fewer.train) == len(range(0, len(fewer.train), 4))


def test_killed_in_cache_and_in_training_resumes_exactly(uninterrupted, base, prefs, tmp_path, monkeypatch):
    ref_out, _ = uninterrupted
    out = tmp_path / "run"
    real_sums, calls, kill = cache_module.batch_sums, [], {"at": 3}

    def sums(*a, **k):
        calls.append(1)
        if len(calls) == kill["at"]:
            raise KeyboardInterrupt("killed in the caching pass")
        return real_sums(*a, **k)

    monkeypatch.setattr(cache_module, "batch_sums", sums)
    with pytest.raises(KeyboardInterrupt):
        dpo(config(base, prefs, out))
    # chunks of 5 examples, forwards of 4 (the micro-batch): the third forward died in the second chunk
    assert sorted(p.name for p in (out / "reference_logps").glob("*.npy")) == ["train_000000000.npy"]
    assert not [p for p in (out / "reference_logps").iterdir() if ".tmp" in p.name]  # whole chunks only
    calls.clear()
    kill["at"] = 0
    real_step, steps = dpo_module.train_step, []

    def dying(*a, **k):
        steps.append(1)
        if len(steps) == 5:  # after the checkpoint at step 4
            raise KeyboardInterrupt("killed in training")
        return real_step(*a, **k)

    monkeypatch.setattr(dpo_module, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        dpo(config(base, prefs, out, resume=True))  # no checkpoint yet: a fresh start that continues the cache
    # only what the first pass had not written: of the 21 train examples chunks 5-9, 10-14, 15-19 (two
    # forwards each, 4 + 1) and 20 (one); the 3 val examples (one)
    assert len(calls) == 3 * 2 + 1 + 1
    monkeypatch.setattr(dpo_module, "train_step", real_step)
    dpo(config(base, prefs, out, resume=True))
    assert logged(out) == logged(ref_out)  # bit for bit, every step
    assert logged(out, "dpo_loss", "val") == logged(ref_out, "dpo_loss", "val")
    for split in ("train", "val"):
        assert np.array_equal(_cache(out, split), _cache(ref_out, split))
    a, b = load_checkpoint(ref_out / "final"), load_checkpoint(out / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


# -- LoRA: the reference is the base with the adapters off -----------------------------------------


def test_lora_reference_is_the_base_with_adapters_off(base, prefs, tmp_path, tok):
    from herd.posttrain.adapter import load_adapter
    from herd.posttrain.lora import adapters_disabled
    from herd.posttrain.pairs import collate_preferences, response_logprobs
    from herd.posttrain.reference_cache import batch_sums

    out = tmp_path / "lora"
    cfg = config(base, prefs, out, lora_rank=4, lora_alpha=8, lora_targets=["all-linear"], lr=2e-2, steps=4,
                 eval_every=0, sample_prompts=0)
    summary = dpo(cfg)
    assert Path(summary["adapter"]).is_dir() and not (out / "final").exists()
    val = read_log(out / "log.jsonl", "val")
    assert val[-1]["margin"] > 0 and val[-1]["accuracy"] >= 0.5
    data = build_preference_data(cfg.data_config(), tok, progress=False)
    cached = _cache(out, "train")
    np.testing.assert_allclose(cached, _transformers_sums(base, data.train), rtol=1e-5, atol=2e-4)
    # the trained policy with its adapters off computes the cache; with them on it does not
    model = load_checkpoint(base)
    load_adapter(model, out / "adapter")
    model.eval()
    batch = collate_preferences(data.train, list(range(len(data.train))), "concat", tok.pad_id)
    with torch.no_grad():
        with adapters_disabled(model) as n:
            off = batch_sums(response_logprobs(model, batch), batch).numpy()
        on = batch_sums(response_logprobs(model, batch), batch).numpy()
    assert n == 7 * 2
    np.testing.assert_allclose(off, cached, rtol=1e-5, atol=2e-4)
    assert np.abs(on - cached).max() > 1e-2


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_pairs_are_counted_and_reported(base, tmp_path, capsys):
    good = preference_records(12)
    long_prompt = "word " * 200
    bad = [{"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
           {"prompt": "Empty?", "chosen": "", "rejected": "No."},
           {"prompt": long_prompt, "chosen": "A.", "rejected": "B."},
           {"chosen": "only chosen"}]
    data = write_jsonl(tmp_path / "mixed.jsonl", good + bad, raw_lines=["{not json"])
    out = tmp_path / "run"
    rc = main(["dpo", "--init-from", str(base), "--data", str(data), "--out", str(out), "--steps", "1",
               "--batch-size", "2", "--max-seq-len", "128", "--eval-every", "0", "--sample-prompts", "0",
               "--tensorboard", "false", "--val-fraction", "0"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "identical_responses: 1" in captured.err and "empty_response: 1" in captured.err
    report = json.loads((out / "data_report.json").read_text())
    assert report["records"] == 17 and report["kept"] == 12 and report["pairs"] == 12
    assert report["dropped"] == {"identical_responses": 1, "empty_response": 1, "prompt_too_long": 1,
                                 "unknown_format": 1, "malformed_json": 1}
    assert json.loads(captured.out.strip().splitlines()[-1])["steps"] == 1


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("case,extra,want", [
    ("beta", ["--beta", "0"], "--beta must be positive"),
    ("loss", ["--loss-type", "hinge"], "unknown --loss-type"),
    ("mask", ["--mask", "none"], "unknown --mask"),
    ("layout", ["--layout", "rows"], "unknown --layout"),
    ("reference", ["--reference", "/nowhere/ckpt"], "--reference /nowhere/ckpt does not exist"),
    ("context", ["--max-seq-len", "4096"], "longer than the model's context"),
    ("smoothing", ["--loss-type", "ipo", "--label-smoothing", "0.1"], "sigmoid loss only"),
])
def test_bad_flags_are_one_line_and_write_nothing(case, extra, want, base, prefs, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["dpo", "--init-from", str(base), "--data", str(prefs), "--out", str(out), "--steps", "1",
            "--max-seq-len", "64", "--tensorboard", "false", *extra]
    assert want in _one_line_error(capsys, argv)
    assert not out.exists()


def test_dpo_help_lists_every_group(capsys):
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--init-from", "--data", "--beta", "--nll-weight", "--mask", "--loss-type", "--reference",
                 "--layout", "--lora-rank", "--resume", "--stop-at", "--export-format", "--edited"):
        assert flag in text
