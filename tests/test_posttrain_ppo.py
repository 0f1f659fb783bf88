"""`herd ppo` on a tiny checkpoint with the official Llama 3 tokenizer: rollouts sampled by the inference
Engine carry the log-probs transformers gives the same tokens; the first update's GRPO / PPO losses equal
herd.posttrain.rl's functions applied to transformers' log-probs and hidden states (and the seeded value
head); rewards from a reward model equal transformers' LlamaForSequenceClassification scores; a run killed
and resumed equals the uninterrupted one (LoRA with dropout, several epochs and minibatches); a failing
reward function is counted, never fatal; bad input ends in one line and writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from herd.cli import main
from herd.posttrain import arithmetic
from herd.posttrain.ppo import ppo
from herd.posttrain.ppo_config import PPOConfig
from herd.posttrain.rl import gae, grpo_advantages, ppo_policy_loss, ppo_value_loss, token_rewards
from herd.train.metrics import read_log
from helpers import tiny_chat_checkpoint, write_jsonl

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

REWARD_FILE = '''
from dataclasses import dataclass


@dataclass
class Weights:  # a dataclass: the file must be importable as a registered module
    digit: float = 1.0
    char: float = 0.1


W = Weights()


def reward(messages, reply):
    assert messages[-1]["role"] == "user"
    return W.digit * sum(c.isdigit() for c in reply) + W.char * len(reply)


def flaky(messages, reply):
    if len(reply) % 2:
        raise ValueError("odd")
    return float(len(reply))
'''


@pytest.fixture(scope="module")
def base(tmp_path_factory, official_tokenizer_model) -> Path:
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("base") / "tiny-hf", official_tokenizer_model)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", arithmetic.prompt_records(40, seed=2))


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reward") / "rewards.py"
    path.write_text(REWARD_FILE)
    return path


def config(base: Path, prompts: Path, out: Path, **kw) -> PPOConfig:
    values = dict(init_from=str(base), prompts=[str(prompts)], out=str(out), steps=1, batch_size=2, group_size=3,
                  max_new_tokens=5, lr=1e-3, warmup_ratio=0.0, schedule="constant", eval_on_start=False,
                  eval_prompts=0, checkpoint_every=0, tensorboard=False, log_samples=100, seed=3,
                  threads=min(2, os.cpu_count() or 1))  # fixed: float sums depend on the thread count
    return PPOConfig(**{**values, **kw})


def hf_model(base: Path):
    return transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()


def reply_logprobs_hf(model, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' log p of every reply token, its final normed hidden states, the reply mask: [B, T] each
    ([B, T, D] for the states), one sequence at a time (no padding)."""
    T = max(len(s["reply_ids"]) for s in samples)
    D = model.config.hidden_size
    lp, hs, mask = torch.zeros(len(samples), T), torch.zeros(len(samples), T, D), torch.zeros(len(samples), T, dtype=torch.bool)
    with torch.no_grad():
        for b, s in enumerate(samples):
            ids = torch.tensor([s["prompt_ids"] + s["reply_ids"]])
            outp = model(ids, output_hidden_states=True)
            n, P = len(s["reply_ids"]), len(s["prompt_ids"])
            logp = torch.log_softmax(outp.logits[0].float(), -1)
            lp[b, :n] = logp[P - 1:P - 1 + n].gather(-1, ids[0, P:, None]).squeeze(-1)
            hs[b, :n] = outp.hidden_states[-1][0, P - 1:P - 1 + n]
            mask[b, :n] = True
    return lp, hs, mask


def samples_of(out: Path, step: int = 1) -> list[dict]:
    return [s for r in read_log(out / "log.jsonl", "samples") if r["step"] == step for s in r["samples"]]


def test_engine_rollouts_carry_the_logprobs_transformers_gives(base, prompts):
    from herd.checkpoint import load_checkpoint
    from herd.inference.sampling import SamplingParams
    from herd.posttrain.prompts import build_prompts
    from herd.posttrain.rollout import PolicyWithValue, RolloutBatch, batch_logprobs, sample_replies
    from herd.tokenizer import Tokenizer
    from herd.tokenizer.chat import ChatFormat

    tok = Tokenizer.from_file(base / "tokenizer.model")
    ps = build_prompts([str(prompts)], ChatFormat(tok), 512, 0.0).train[:3]
    model = load_checkpoint(base).train()
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=6, stop_tokens=sorted(tok.stop_tokens))
    group = [p for p in ps for _ in range(2)]
    samples = sample_replies(model, group, [11, 12, 13, 14, 15, 16], params, tok)
    assert model.training  # handed back in train mode
    for i in (2, 3):  # alone, not in a fork group, with the same seed: the same reply
        alone = sample_replies(model, group[i:i + 1], [11 + i], params, tok)
        assert alone[0].reply_ids == samples[i].reply_ids
        assert alone[0].engine_logprobs == pytest.approx(samples[i].engine_logprobs, abs=1e-5)  # other batch shapes
    hf_lp, _, mask = reply_logprobs_hf(hf_model(base), [s.to_dict() for s in samples])
    for b, s in enumerate(samples):
        n = len(s.engine_logprobs)
        assert n == len(s.reply_ids) - s.stopped
        torch.testing.assert_close(torch.tensor(s.engine_logprobs), hf_lp[b, :n], atol=2e-4, rtol=0)
    # herd's padded training forward gives them too
    batch = RolloutBatch.build(samples, tok.pad_id)
    lp, values = batch_logprobs(PolicyWithValue(model, value_head=False), batch, micro=4)
    assert values is None
    got = torch.stack([torch.nn.functional.pad(lp[b][batch.mask[b]], (0, hf_lp.shape[1] - int(batch.mask[b].sum())))
                       for b in range(len(samples))])
    torch.testing.assert_close(got, hf_lp * mask, atol=2e-4, rtol=0)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_first_update_losses_equal_rl_functions_on_transformers(algo, base, prompts, reward_file, tmp_path):
    cfg = config(base, prompts, tmp_path / "run", algo=algo, reward_fn=f"{reward_file}:reward", kl_coef=0.05,
                 whiten_advantages=False, vf_coef=0.5)
    summary = ppo(cfg)
    assert Path(summary["final"]).is_dir() and Path(summary["plot"]).is_file()
    train = read_log(tmp_path / "run" / "log.jsonl", "train")[0]
    samples = samples_of(tmp_path / "run")
    assert len(samples) == cfg.batch_size * cfg.group_size
    from herd.tokenizer import Tokenizer

    tok = Tokenizer.from_file(base / "tokenizer.model")
    eot = tok.stop_tokens
    texts = [tok.decode([t for t in s["reply_ids"] if t not in eot]) for s in samples]
    scores = torch.tensor([sum(c.isdigit() for c in t) + 0.1 * len(t) for t in texts])
    assert scores.std() > 0  # the check below is not a check of zeros
    torch.testing.assert_close(torch.tensor([s["reward"] for s in samples]), scores)
    assert train["reward"] == pytest.approx(float(scores.mean()), rel=1e-6)

    lp, hidden, mask = reply_logprobs_hf(hf_model(base), samples)
    assert train["kl"] == pytest.approx(0.0, abs=1e-4)  # the reference is the starting policy
    if algo == "grpo":
        adv = grpo_advantages(scores, cfg.group_size)
        pg, _ = ppo_policy_loss(lp, lp, adv, mask)
        assert train["first_pg_loss"] == pytest.approx(float(pg), abs=1e-4)
        assert train["first_loss"] == pytest.approx(float(pg), abs=1e-4)  # + kl_coef * KL(k3) = 0 at the start
    else:
        g = torch.Generator().manual_seed(cfg.seed)  # the value head's init: Normal(0, 0.02), seeded
        head = torch.randn(1, hidden.shape[-1], generator=g) * 0.02
        values = (hidden @ head.T).squeeze(-1) * mask
        rewards, _ = token_rewards(scores, lp, lp, mask, cfg.kl_coef)
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        pg, _ = ppo_policy_loss(lp, lp, adv, mask)
        vf, _ = ppo_value_loss(values, values, returns, mask, cfg.vf_clip)
        assert abs(float(pg)) > 1e-3 and float(vf) > 1e-3
        assert train["first_pg_loss"] == pytest.approx(float(pg), rel=1e-4, abs=1e-5)
        assert train["first_vf_loss"] == pytest.approx(float(vf), rel=1e-4, abs=1e-5)
        assert train["first_loss"] == pytest.approx(float(pg + cfg.vf_coef * vf), rel=1e-4, abs=1e-5)


def test_kill_and_resume_equals_the_uninterrupted_run(base, prompts, reward_file, tmp_path, monkeypatch):
    """LoRA with dropout (the global RNG), the reference as the adapters switched off, two epochs of two
    shuffled minibatches: the resumed run logs the very same numbers."""
    kw = dict(reward_fn=f"{reward_file}:reward", steps=4, lora_rank=4, lora_dropout=0.1, ppo_epochs=2,
              minibatches=2, group_size=2, kl_coef=0.1, lr=2e-2, checkpoint_every=2)
    ppo(config(base, prompts, tmp_path / "full", **kw))
    import herd.posttrain.ppo as ppo_module

    real = ppo_module.optimize
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # iteration 3: after the checkpoint of iteration 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo_module, "optimize", dying)
    with pytest.raises(KeyboardInterrupt):
        ppo(config(base, prompts, tmp_path / "split", **kw))
    monkeypatch.setattr(ppo_module, "optimize", real)
    ppo(config(base, prompts, tmp_path / "split", resume=True, **kw))
    keys = ("reward", "kl", "loss", "pg_loss", "grad_norm", "clipfrac", "approx_kl", "kl_loss")
    full = read_log(tmp_path / "full" / "log.jsonl", "train")
    split = read_log(tmp_path / "split" / "log.jsonl", "train")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert [[r[k] for k in keys] for r in split] == [[r[k] for k in keys] for r in full]
    assert full[-1]["kl"] != 0.0 and full[-1]["clipfrac"] >= 0.0  # the adapters moved away from the reference
    assert (tmp_path / "split" / "adapter" / "adapter_config.json").is_file()


def test_a_failing_reward_function_is_counted_not_fatal(base, prompts, reward_file, tmp_path):
    summary = ppo(config(base, prompts, tmp_path / "run", reward_fn=f"{reward_file}:flaky", reward_on_error=-1.0,
                         group_size=4))
    samples = samples_of(tmp_path / "run")
    failed = [s for s in samples if not s["reward_ok"]]
    assert failed and all(s["reward"] == -1.0 for s in failed)
    assert read_log(tmp_path / "run" / "log.jsonl", "train")[0]["reward_failures"] == len(failed)
    assert summary["reward_fn_errors"] == {"not_a_number": len(failed)}  # ValueError counts as not_a_number


def test_reward_model_rewards_equal_transformers_scores(base, prompts, tmp_path, official_tokenizer_model):
    from herd.checkpoint import load_checkpoint
    from herd.posttrain.reward import RewardModel, save_reward_model
    from herd.tokenizer import Tokenizer
    from herd.tokenizer.chat import ChatFormat

    rm_dir = tmp_path / "rm"
    save_reward_model(RewardModel.from_transformer(load_checkpoint(base), seed=1), rm_dir,
                      tokenizer_path=official_tokenizer_model)
    ppo(config(base, prompts, tmp_path / "run", reward_model=str(rm_dir)))
    samples = samples_of(tmp_path / "run")
    tok = Tokenizer.from_file(official_tokenizer_model)
    chat = ChatFormat(tok)
    hf = transformers.LlamaForSequenceClassification.from_pretrained(rm_dir, torch_dtype=torch.float32).eval()
    for s in samples[:4]:
        question = tok.decode(s["prompt_ids"]).split("<|end_header_id|>\n\n")[-2].split("<|eot_id|>")[0]
        ids = chat.encode_dialog_prompt([{"role": "user", "content": question},
                                         {"role": "assistant", "content": s["text"]}], add_generation_prompt=False)
        with torch.no_grad():
            want = float(hf(torch.tensor([ids])).logits[0, 0])
        assert s["reward"] == pytest.approx(want, abs=1e-4)


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", ["no_reward", "two_rewards", "bad_spec", "no_module", "algo", "group",
                                  "no_prompts", "missing_init", "other_tokenizer", "dp"])
def test_bad_input_is_one_line_and_writes_nothing(case, base, prompts, reward_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["ppo", "--init-from", str(base), "--prompts", str(prompts), "--out", str(out), "--tensorboard", "false"]
    reward = ["--reward-fn", f"{reward_file}:reward"]
    extra, want = {
        "no_reward": ([], "exactly one reward"),
        "two_rewards": (reward + ["--reward-model", str(base)], "exactly one reward"),
        "bad_spec": (["--reward-fn", "not a spec"], "MODULE:FUNCTION"),
        "no_module": (["--reward-fn", "no_such_module_xyz:reward"], "cannot import"),
        "algo": (reward + ["--algo", "dqn"], "unknown --algo"),
        "group": (reward + ["--group-size", "1"], "at least 2"),
        "no_prompts": (reward, "no usable prompt"),
        "missing_init": (reward, "does not exist"),
        "other_tokenizer": ([], "another tokenizer"),
        "dp": (reward + ["--dp", "2"], "one process"),
    }[case]
    if case == "no_prompts":
        argv[4] = str(write_jsonl(tmp_path / "bad.jsonl", [{"text": "no prompt here"}, {"messages": []}]))
    if case == "missing_init":
        argv[2] = str(tmp_path / "nowhere")
    if case == "other_tokenizer":
        from herd.checkpoint import load_checkpoint
        from herd.posttrain.reward import RewardModel, save_reward_model
        from herd.tokenizer import train_bpe

        other = tmp_path / "other.model"
        train_bpe(["the quick brown fox jumps over the lazy dog " * 50], 520, other, show_progress=False)
        save_reward_model(RewardModel.from_transformer(load_checkpoint(base)), tmp_path / "rm", tokenizer_path=other,
                          pad_id=0)
        extra = ["--reward-model", str(tmp_path / "rm")]
    err = _one_line_error(capsys, argv + extra)
    assert want in err, err
    assert not out.exists()


def test_ppo_help_lists_every_group(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--algo", "--reward-fn", "--reward-model", "--group-size", "--kl-coef", "--vf-coef", "--ppo-epochs",
                 "--init-from", "--lora-rank", "--resume", "--prompts"):
        assert flag in text
    assert "prompts, reward and RL" in text and "LoRA" in text


def test_prompt_records_in_every_form():
    from herd.posttrain.prompts import prompt_messages
    from herd.posttrain.render import RecordError

    assert prompt_messages({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert prompt_messages({"messages": chat}) == chat[:2]  # SFT data doubles as prompts
    assert prompt_messages({"prompt": chat[:2]}) == chat[:2]
    for bad in ({"prompt": ""}, {"messages": [{"role": "assistant", "content": "a"}]}, {"text": "x"},
                {"prompt": [{"role": "narrator", "content": "x"}]}, [1, 2]):
        with pytest.raises(RecordError):
            prompt_messages(bad)


def test_adapters_off_gives_the_base_exactly(base):
    from herd.checkpoint import load_checkpoint
    from herd.posttrain.lora import LoRAConfig, apply_lora
    from herd.posttrain.lora import adapters_disabled

    plain = load_checkpoint(base).eval()
    model = load_checkpoint(base)
    apply_lora(model, LoRAConfig(lora_rank=4, lora_targets=["all-linear", "output"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.eval()
    tokens = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert not torch.equal(model(tokens), plain(tokens))
        with adapters_disabled(model):
            assert torch.equal(model(tokens), plain(tokens))
        assert not torch.equal(model(tokens), plain(tokens))  # switched back on



@pytest.mark.parametrize("algo,aggregation", [("grpo", "sequence"), ("ppo", "token"), ("ppo", "sequence")])
def test_micro_batches_give_the_one_forward_update(algo, aggregation, base):
    """Gradient accumulation over micro-batches of uneven reply lengths: each micro-batch's losses are weighted
    by its share of the minibatch's tokens (token means, the value loss) or sequences (sequence means), so two
    epochs of updates one sample at a time equal those of one forward over all of them."""
    import contextlib

    from herd.checkpoint import load_checkpoint
    from herd.posttrain.ppo import advantages, optimize
    from herd.posttrain.rollout import PolicyWithValue, RolloutBatch, Sample, batch_logprobs
    from herd.train.optim import build_optimizer, set_lr
    from herd.train.step import SpikeGuard

    g = torch.Generator().manual_seed(0)
    samples = [Sample(prompt=i, prompt_ids=torch.randint(0, 5000, (3 + i,), generator=g).tolist(),
                      reply_ids=torch.randint(0, 5000, (n,), generator=g).tolist(), text="", stopped=False,
                      reward=float(n % 3)) for i, n in enumerate([1, 7, 3, 5])]
    runs = []
    for micro in (0, 1):
        cfg = PPOConfig(init_from=str(base), prompts=["p"], reward_fn="m:f", algo=algo, group_size=2, batch_size=2,
                        micro_batch_size=micro, loss_aggregation=aggregation, kl_coef=0.1, ppo_epochs=2)
        policy = PolicyWithValue(load_checkpoint(base), value_head=algo == "ppo", seed=0).train()
        reference = PolicyWithValue(load_checkpoint(base).requires_grad_(False), value_head=False).eval()
        with torch.no_grad():  # a policy that differs from the reference: the KL terms are not zero
            policy.policy.norm.weight.mul_(1.5)
        batch = RolloutBatch.build(samples, pad_id=0)
        stats = advantages(cfg, policy, reference, batch, lambda m, b: batch_logprobs(m, b, 4))
        optimizer = build_optimizer(policy, cfg)
        set_lr(optimizer, 1e-2)
        metrics = optimize(cfg, policy, optimizer, batch, SpikeGuard(), 0, contextlib.nullcontext(), torch.device("cpu"))
        runs.append((stats, metrics, [p.detach().clone() for p in policy.parameters()]))
    (s0, m0, p0), (s1, m1, p1) = runs
    assert s0["kl"] != 0.0 and m0["updates"] == 2
    for k in ("loss", "pg_loss", "grad_norm", "first_loss") + (("vf_loss",) if algo == "ppo" else ("kl_loss",)):
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-7), k
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-5)  # Adam divides near-zero gradients by their size
