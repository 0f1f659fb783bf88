"""Rejection sampling: the engine's shared prefill (Engine.add_forked_request) gives exactly the tokens K
separate requests with the same seeds give, with one prefill per prompt (counted); `herd rejection-sample`
end to end on a tiny chat checkpoint with the official tokenizer: its stats equal a hand computation from
the same samples, a killed run resumed gives the same file as an uninterrupted one, --no-shared-prefill
gives the same file with K prefills, a reward model scores as RewardScorer does (and one with another
tokenizer is refused), the arithmetic reward function runs end to end, and bad reward functions / prompt
files are counted or end in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import herd.posttrain.rejection as rejection
from herd.cli import main
from herd.inference.engine import Engine
from herd.inference.sampling import SamplingParams
from herd.model import ModelArgs, Transformer
from herd.posttrain.arithmetic import prompt_records
from herd.posttrain.rejection import RejectionConfig, rejection_sample
from helpers import tiny_chat_checkpoint, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
THREADS = min(2, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def small() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                                  max_seq_len=256))
    model.init_weights(std=0.2)  # peaked enough that a wrong cache shows in the tokens
    return model.eval()


def _params(k: int, n: int = 12) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=n, seed=1000 + k)


def _run(engine: Engine, groups: dict[int, tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    out: dict[tuple[int, int], list[int]] = {key: [] for key in groups.values()}
    while engine.has_work():
        for e in engine.step():
            if e.finish_reason != "stop":
                out[groups[e.index]].append(e.token)
    return out


@pytest.mark.parametrize("k, max_batch", [(6, 8), (10, 4)])
def test_shared_prefill_equals_separate_requests_with_one_prefill(small, k, max_batch):
    # a prompt ending inside a block (its partial block is copied per sample), one of exactly two
    # blocks (all shared), one shorter than a block; K above the batch size still runs
    prompts = [list(range(1, 38)), list(range(50, 82)), list(range(100, 107))]
    separate = Engine(small, max_batch_size=max_batch, block_size=16)
    want = {}
    for i, p in enumerate(prompts):
        for j, r in enumerate(separate.generate([p] * k, [_params(j) for j in range(k)])):
            want[i, j] = r.tokens
    computed = separate.stats()["prompt_tokens_computed"]
    if k <= max_batch:  # K prefills per prompt (admitted together: nothing is in the prefix cache yet)
        assert computed == k * sum(map(len, prompts))
    else:  # requests admitted later find the full blocks cached and compute only the rest
        assert computed > 2 * sum(map(len, prompts))

    shared = Engine(small, max_batch_size=max_batch, block_size=16)
    groups = {}
    for i, p in enumerate(prompts):
        groups.update({rid: (i, j) for j, rid in enumerate(shared.add_forked_request(p, [_params(j) for j in range(k)]))})
    got = _run(shared, groups)
    assert got == want  # token for token
    assert len({tuple(v) for v in got.values()}) == len(got)  # the K samples do differ
    assert shared.stats()["prompt_tokens_computed"] == sum(map(len, prompts))  # one prefill per prompt
    assert shared.blocks.leaked() == 0


def test_fork_groups_under_memory_pressure_still_give_the_same_samples(small):
    # a KV pool too small for every sample at once: forks that find no block for their copy queue as
    # requests of their own, running ones get preempted and recomputed; the samples must not change
    prompts = [list(range(1, 38)), list(range(50, 71))]
    k, n = 6, 20
    want = {}
    for i, p in enumerate(prompts):
        for j, r in enumerate(Engine(small, max_batch_size=8).generate([p] * k, [_params(j, n) for j in range(k)])):
            want[i, j] = r.tokens
    engine = Engine(small, max_batch_size=8, block_size=16, cache_tokens=7 * 16, max_seq_len=64)
    groups = {}
    for i, p in enumerate(prompts):
        groups.update({rid: (i, j) for j, rid in enumerate(engine.add_forked_request(p, [_params(j, n) for j in range(k)]))})
    assert _run(engine, groups) == want
    assert engine.stats()["preemptions"] > 0 and engine.blocks.leaked() == 0


def test_aborting_fork_groups_frees_everything(small):
    engine = Engine(small, max_batch_size=8, block_size=16, prefill_chunk=16)
    ids = engine.add_forked_request(list(range(1, 40)), [_params(j) for j in range(4)])
    engine.step()  # the first chunk of the prompt: the forks have not started
    assert engine.abort(ids[0]) and not engine.abort(ids[2])  # the group went as a whole
    assert not engine.has_work() and engine.blocks.leaked() == 0
    ids = engine.add_forked_request(list(range(1, 40)), [_params(j) for j in range(4)])
    counts = dict.fromkeys(ids, 0)
    for _ in range(5):
        for e in engine.step():
            counts[e.index] += 1
    assert engine.abort(ids[1]) and counts[ids[1]] > 0  # one running sample; the others go on
    while engine.has_work():
        for e in engine.step():
            counts[e.index] += 1
    assert [counts[i] for i in ids if i != ids[1]] == [12] * 3 and engine.blocks.leaked() == 0


# -- the command ---------------------------------------------------------------------------------

REWARD_PY = '''
def length(messages, reply):
    """Deterministic, varied rewards; fails on replies whose length is a multiple of 5."""
    assert messages[-1]["role"] == "user"
    if len(reply) % 5 == 0:
        raise ValueError("no reward for this one")
    return float(len(reply) % 7) + 0.25 * len(messages)
'''


@pytest.fixture(scope="module")
def policy(tmp_path_factory, official_tokenizer_model) -> Path:
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("policy") / "tiny-hf", official_tokenizer_model)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rs")
    prompts = prompt_records(4, seed=2, max_operand=9)
    prompts.insert(2, {"prompt": "Say something."})  # prompt-only, string form
    prompts.insert(4, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    (root / "rewards.py").write_text(REWARD_PY)
    return {"prompts": write_jsonl(root / "prompts.jsonl", prompts), "reward": root / "rewards.py",
            "bad": write_jsonl(root / "bad.jsonl", [{"text": "not a prompt"}] + prompts[:2], raw_lines=["{oops"])}


def cfg(policy: Path, files: dict[str, Path], out: Path, **kw) -> RejectionConfig:
    values = dict(policy=str(policy), prompts=[str(files["prompts"])], out=str(out),
                  reward_fn=f"{files['reward']}:length", k=4, max_new_tokens=4, temperature=1.0, top_p=1.0,
                  keep_truncated=True, chunk=2, seed=11, threads=THREADS)
    return RejectionConfig(**{**values, **kw})


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(policy, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "rs.jsonl"
    return out, rejection_sample(cfg(policy, files, out))


def test_stats_equal_a_hand_computation(reference, policy, files):
    from herd.posttrain.reward_fn import load_reward_fn

    out, summary = reference
    c = cfg(policy, files, out)
    fn = load_reward_fn(c.reward_fn)
    records = [json.loads(x) for x in files["prompts"].read_text().splitlines()]
    got = lines(out)
    assert len(got) == len(records) == summary["written"] == summary["prompts_done"]
    rewards_all, best, first, differs, errors = [], [], [], 0, 0
    for record, line in zip(records, got):
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        assert line["messages"][:-1] == messages and line.get("id") == record.get("id")
        rewards = line["rewards"]
        assert len(rewards) == c.k
        valid = [r for r in rewards if r is not None]
        errors += c.k - len(valid)
        b = rewards.index(max(valid))  # the first of the best
        assert line["best"] == b and line["reward"] == rewards[b] == fn(messages, line["messages"][-1]["content"])
        rewards_all += valid
        best.append(rewards[b])
        if rewards[0] is not None:
            first.append(rewards[0])
        differs += b != 0
    assert summary["mean_reward"] == pytest.approx(sum(rewards_all) / len(rewards_all))
    assert summary["mean_best_reward"] == pytest.approx(sum(best) / len(best))
    assert summary["max_reward"] == max(best)
    assert summary["mean_first_reward"] == pytest.approx(sum(first) / len(first))
    assert summary["best_differs_from_first"] == pytest.approx(differs / len(got))
    assert 0 < differs < len(got) and len(set(best)) > 1  # a small run that can tell the stats apart
    assert summary["score_errors"] == {"not_a_number": errors} and errors > 0  # ValueError: counted, no crash
    assert summary["scored"] == len(rewards_all) and summary["samples"] == c.k * len(records)
    assert summary["prefill_tokens"] <= summary["prompt_tokens"]  # at most one prefill per prompt
    assert json.loads(Path(f"{out}.stats.json").read_text())["written"] == len(got)


def test_killed_run_resumes_to_the_same_file(reference, policy, files, tmp_path, monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "rs.jsonl"
    real, calls = rejection._commit, []

    def dying(c, stats, chunk_lines):  # the second chunk's lines half written, then the process dies
        calls.append(1)
        if len(calls) == 2:
            with open(c.out, "a") as f:
                f.write("".join(x + "\n" for x in chunk_lines)[:50])
            raise KeyboardInterrupt("killed")
        return real(c, stats, chunk_lines)

    monkeypatch.setattr(rejection, "_commit", dying)
    with pytest.raises(KeyboardInterrupt):
        rejection_sample(cfg(policy, files, out))
    monkeypatch.setattr(rejection, "_commit", real)
    assert len(out.read_text().splitlines()) == 3  # two whole lines + a torn one
    with pytest.raises(Exception, match="--resume"):
        rejection_sample(cfg(policy, files, out))  # never clobbers a run
    summary = rejection_sample(cfg(policy, files, out, resume=True, chunk=3))  # the chunk size may change
    assert out.read_bytes() == ref_out.read_bytes()
    assert summary["prompts_done"] == 6 and summary["written"] == 6


def test_separate_prefills_give_the_same_file_with_k_prefills(reference, policy, files, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "rs.jsonl"
    summary = rejection_sample(cfg(policy, files, out, shared_prefill=False))
    assert out.read_bytes() == ref_out.read_bytes()
    # K separate prefills per prompt (the prefix cache spares some of the shared system header), one shared
    assert summary["prefill_tokens"] > 2 * ref["prefill_tokens"] and ref["prefills_per_prompt"] <= 1.0


def test_truncated_replies_are_not_scored_by_default(policy, files, tmp_path):
    summary = rejection_sample(cfg(policy, files, tmp_path / "rs.jsonl", keep_truncated=False, max_new_tokens=2))
    # a random model rarely ends its turn within 2 tokens: nothing to keep, every prompt counted
    assert summary["truncated"] == summary["samples"] - summary["scored"] - sum(summary["score_errors"].values())
    assert summary["written"] + summary["skipped"].get("unscored", 0) == 6


def test_reward_model_scores_and_another_tokenizer_is_refused(policy, files, tmp_path, official_tokenizer_model,
                                                              capsys):
    from herd.posttrain.reward import RewardScorer, load_reward_model, reward_model_from_checkpoint, save_reward_model
    from herd.tokenizer import Tokenizer

    rm = reward_model_from_checkpoint(policy, seed=1)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    save_reward_model(rm, tmp_path / "rm", tokenizer_path=official_tokenizer_model)
    out = tmp_path / "rs.jsonl"
    summary = rejection_sample(cfg(policy, files, out, reward_fn="", reward_model=str(tmp_path / "rm"), limit=3, k=2))
    got = lines(out)
    assert summary["prompts_done"] == 3 and len(got) == 3
    scorer = RewardScorer(load_reward_model(tmp_path / "rm"), Tokenizer.from_file(official_tokenizer_model))
    want = scorer.score_conversations([line["messages"] for line in got])
    assert [line["reward"] for line in got] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert all(line["reward"] == max(line["rewards"]) for line in got)
    # a reward model with another tokenizer: one line, nothing written
    text = official_tokenizer_model.read_text().splitlines()
    a, b = text[1000].split(), text[1001].split()
    text[1000], text[1001] = f"{a[0]} {b[1]}", f"{b[0]} {a[1]}"  # two tokens' ids swapped
    (tmp_path / "other.model").write_text("\n".join(text) + "\n")
    save_reward_model(rm, tmp_path / "rm2", tokenizer_path=tmp_path / "other.model")
    argv = ["rejection-sample", "--policy", str(policy), "--prompts", str(files["prompts"]), "--out",
            str(tmp_path / "x.jsonl"), "--reward-model", str(tmp_path / "rm2")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd: error:") and "\n" not in err and "tokenizer differs from the policy's" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_arithmetic_reward_end_to_end_on_the_cli(policy, files, tmp_path, capsys):
    out = tmp_path / "rs.jsonl"
    assert main(["rejection-sample", "--policy", str(policy), "--prompts", str(files["bad"]), "--out", str(out),
                 "--reward-fn", "herd.posttrain.arithmetic:reward", "--k", "3", "--max-new-tokens", "4",
                 "--keep-truncated", "--threads", str(THREADS)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    got = lines(out)
    assert summary["prompts_done"] == 3 and summary["written"] == 2 and len(got) == 2
    assert all(line["rewards"] == [0.0] * 3 or 1.0 in line["rewards"] for line in got)
    assert "1 bad_record" in captured.err and "1 malformed lines" in captured.err
    # the output is SFT data: `herd sft`'s reader renders every line
    from herd.posttrain.render import to_conversation

    assert all(to_conversation(line).messages[-1]["role"] == "assistant" for line in got)
    # the arithmetic reward raises on a prompt without a question: counted per prompt, never a crash
    capsys.readouterr()
    out2 = tmp_path / "rs2.jsonl"
    assert main(["rejection-sample", "--policy", str(policy), "--prompts", str(files["prompts"]), "--out", str(out2),
                 "--reward-fn", "herd.posttrain.arithmetic:reward", "--k", "2", "--max-new-tokens", "2", "--limit", "3",
                 "--keep-truncated", "--threads", str(THREADS)]) == 0
    err = capsys.readouterr().err
    assert "replies not scored on 1 prompts (HerdError=2)" in err and "skipped 1 unscored" in err


@pytest.mark.parametrize("extra, message", [
    (["--reward-fn", "nosuchmodule:f"], "cannot import"),
    (["--reward-fn", "herd.posttrain.arithmetic:reward", "--reward-model", "x"], "exactly one"),
    (["--reward-fn", "herd.posttrain.arithmetic"], "MODULE:FUNCTION"),
    (["--reward-fn", "herd.posttrain.arithmetic:reward", "--prompts", "missing.jsonl"], "does not exist"),
    (["--reward-fn", "herd.posttrain.arithmetic:reward", "--k", "0"], "--k"),
])
def test_bad_input_is_one_line(extra, message, policy, files, tmp_path, capsys):
    argv = ["rejection-sample", "--policy", str(policy), "--prompts", str(files["prompts"]),
            "--out", str(tmp_path / "o.jsonl")] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd: error:") and "\n" not in err and message in err
    assert not (tmp_path / "o.jsonl").exists()


def test_pairs_make_the_output_preference_data_too(reference, policy, files, tmp_path):
    """--pairs: best reply chosen, the worst-scored one rejected (when it scores lower); the same samples."""
    from herd.posttrain.preference import to_preference
    from herd.posttrain.render import to_conversation

    ref_out, _ = reference
    out = tmp_path / "rs.jsonl"
    rejection_sample(cfg(policy, files, out, pairs=True))
    with_pairs, plain = lines(out), lines(ref_out)
    assert [x["messages"] for x in with_pairs] == [x["messages"] for x in plain]  # the SFT side is unchanged
    n_pairs = 0
    for line in with_pairs:
        valid = [(r, k) for k, r in enumerate(line["rewards"]) if r is not None]
        worst = min(valid)[1]  # the first of the worst
        if line["rewards"][worst] < line["reward"]:
            pref = to_preference(line)
            assert pref.prompt == line["messages"][:-1] and line["worst"] == worst
            assert pref.responses[0] == line["messages"][-1:]  # chosen: the best reply
            n_pairs += 1
        else:
            assert "rejected" not in line
        assert to_conversation(line).messages == line["messages"]  # still SFT data
    assert n_pairs > 0
