"""The on-policy RL loop (`herd ppo`): PPO with a value head, or GRPO, on prompts against a reward.

    setup:     tokenizer (the checkpoint's) -> reward (a reward model with the same tokenizer, or a
               Python function) -> prompts rendered, split train / held-out -> the policy from
               --init-from (optional LoRA) [+ a value head for PPO] -> the frozen reference (a copy
               of --init-from; with LoRA the same model with its adapters off) -> AdamW -> resume
    iteration: next --batch-size prompts -> --group-size replies each, sampled by the inference
               Engine running on the training model (herd.posttrain.rollout) -> rewards ->
               log-probs and values of the sampled tokens before the update (one forward), the
               reference's log-probs -> advantages:
                 PPO   per-token rewards (-kl_coef * KL, plus the score on the last token), GAE on
                       the value head's estimates, whitened over the iteration
                 GRPO  (score - group mean) / group std, one per reply; kl_coef * KL(k3) joins the loss
               -> --ppo-epochs passes, each --minibatches shuffled optimizer updates on train_step:
                 loss = clipped policy loss [+ vf_coef * clipped value loss (PPO)] [+ kl_coef * KL (GRPO)]
               -> log (reward, KL, losses, clip fraction, reply length, tokens/s) / held-out reward /
               checkpoint
    end:       checkpoint -> held-out reward -> export (OUT/final, or OUT/adapter [+ merged]) -> reward.png

The losses are herd.posttrain.rl's (TRL's formulas). Rewards a function cannot compute (it raised,
or returned a non-number) and replies too long for a reward model get --reward-on-error and are
counted ("reward_failures" in the log, and one line at the end): a bad reply never stops a run.

Reproducibility: each reply is sampled with its own seed drawn from (seed, iteration), the prompt
order from (seed, epoch) and the minibatch order from (seed, iteration, epoch), so a run depends
only on its settings; checkpoints hold the weights, optimizer, prompt position and RNG (LoRA
dropout), and a resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.errors import HerdError
from herd.fileio import atomic_path, atomic_write
from herd.inference.sampling import SamplingParams
from herd.posttrain import resume
from herd.posttrain.dataset import load_tokenizer_for
from herd.posttrain.export import export_policy
from herd.posttrain.policy import load_policy, policy_args, trainable_parameters
from herd.posttrain.ppo_config import PPOConfig
from herd.posttrain.prompts import build_prompts
from herd.posttrain.rl import (gae, grpo_advantages, kl_penalty, masked_mean, masked_whiten, ppo_policy_loss,
                               ppo_value_loss, token_rewards)
from herd.posttrain.lora import adapters_disabled
from herd.posttrain.rollout import (PolicyWithValue, RolloutBatch, batch_logprobs, function_reward,
                                    model_reward, sample_replies, score_replies)
from herd.threads import apply_threads
from herd.tokenizer.chat import ChatFormat
from herd.train.metrics import MetricsLogger, memory_mb, read_log
from herd.train.optim import build_optimizer, set_lr
from herd.train.step import SpikeGuard, train_step


class PromptOrder:
    """Shuffled prompt indices, epoch after epoch; (epoch, cursor) is saved so a resumed run reads the same prompts."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.cursor = n, seed, 0, 0

    def next(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            take = min(count - len(out), self.n - self.cursor)
            out.extend(int(i) for i in perm[self.cursor:self.cursor + take])
            self.cursor += take
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def epochs(self) -> float:
        return self.epoch + self.cursor / self.n

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def reply_seeds(seed: int, step: int, n: int) -> list[int]:
    """The sampling seed of each reply of iteration `step` (independent of batching and of the global RNG)."""
    return [int(s) for s in np.random.default_rng([seed, step, 1]).integers(0, 2 ** 62, size=n)]


def load_reward(cfg: PPOConfig, tokenizer: Any, device: torch.device):
    """(batch reward, RewardFunction or None): the reward model's scorer, refused if its tokenizer is not the
    policy's; or the --reward-fn function."""
    if cfg.reward_fn:
        from herd.posttrain.reward_fn import RewardFunction

        fn = RewardFunction(cfg.reward_fn)
        return function_reward(fn), fn
    from herd.checkpoint import find_tokenizer
    from herd.posttrain.reward import is_reward_model, load_reward_scorer
    from herd.tokenizer import Tokenizer

    if not is_reward_model(cfg.reward_model):
        raise HerdError(f"--reward-model {cfg.reward_model} is not a reward model (no config.json with a "
                        "...ForSequenceClassification architecture); pass the folder `herd reward` wrote.")
    theirs = find_tokenizer(cfg.reward_model)
    if theirs is not None and Tokenizer.from_file(theirs).sha256 != tokenizer.sha256:
        raise HerdError(f"the reward model {cfg.reward_model} uses another tokenizer than the policy "
                        f"{cfg.init_from} (sha256 {Tokenizer.from_file(theirs).sha256[:12]}... vs "
                        f"{tokenizer.sha256[:12]}...); train the reward model from the same base as the policy.")
    scorer = load_reward_scorer(cfg.reward_model, device=device, batch_size=cfg.reward_batch_size)
    return model_reward(scorer), None


def ppo(cfg: PPOConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (rewards, KL, paths). One process (see PPOConfig.validate)."""
    cfg.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise HerdError("herd ppo runs in one process; start it without torchrun.")
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    apply_threads(cfg.threads, device)
    out = Path(cfg.out)

    # Everything that can be wrong with the input is checked before anything is built or written.
    args = policy_args(cfg.init_from)
    tokenizer = load_tokenizer_for(cfg.init_from, cfg.tokenizer or None, args.vocab_size)
    tokenizer_path = cfg.tokenizer or _stored_tokenizer(cfg.init_from)
    resume_from = resume.resume_point(cfg)
    saved = resume.check_resumable(resume_from, cfg, args, tokenizer_sha256=tokenizer.sha256)
    if saved and saved.get("config", {}).get("algo", cfg.algo) != cfg.algo:
        raise HerdError(f"{resume_from} was trained with --algo {saved['config']['algo']}; resume with it or start "
                        "a new --out.")
    reward, reward_fn = load_reward(cfg, tokenizer, device)
    chat = ChatFormat(tokenizer, style=cfg.chat_style, date_string=cfg.date_string)
    prompts = build_prompts(cfg.prompts, chat, cfg.max_prompt_len, cfg.val_fraction, cfg.seed)
    fingerprint = prompts.fingerprint()
    resume.check_fingerprints(saved, resume_from, prompts_sha256=fingerprint)
    longest = max(len(p.ids) for p in prompts.train + prompts.heldout)
    if longest + cfg.max_new_tokens > args.max_seq_len:
        raise HerdError(f"the longest prompt ({longest} tokens) plus --max-new-tokens {cfg.max_new_tokens} exceeds the "
                        f"model's context of {args.max_seq_len}; lower --max-prompt-len or --max-new-tokens.")
    total = int(saved.get("total_steps", 0)) or cfg.total_steps(len(prompts.train))
    if cfg.steps and saved and cfg.steps != saved.get("config", {}).get("steps", cfg.steps):
        total = cfg.steps

    lora = cfg.lora_config() if cfg.lora else None
    model = load_policy(cfg.init_from, args, None, device, lora=lora, seed=cfg.seed)
    policy = PolicyWithValue(model, value_head=cfg.algo == "ppo", seed=cfg.seed)
    policy.train()
    reference = None
    if cfg.kl_coef > 0 and not cfg.lora:  # LoRA: the reference is the same model with its adapters off
        reference = PolicyWithValue(load_policy(cfg.init_from, args, None, device, trainable=False), False).eval()
    torch.manual_seed(cfg.seed)  # LoRA dropout masks: the same run twice (a resume restores the state)
    optimizer = build_optimizer(policy, cfg)
    order = PromptOrder(len(prompts.train), cfg.seed)
    guard = SpikeGuard(cfg.spike_factor, cfg.nan_policy, cfg.max_skips)
    start_step = 0
    if resume_from is not None:
        saved = resume.restore(resume_from, policy, optimizer, cfg)
        start_step = int(saved["step"])
        order.load_state_dict(saved["prompt_order"])
        guard.load_state_dict(saved.get("guard", {}))

    log = MetricsLogger(out, tensorboard=cfg.tensorboard, resume_step=start_step)
    atomic_write(out / "data_report.json", json.dumps(prompts.report.to_dict(), indent=1) + "\n")
    log.print(prompts.report.format())
    if resume_from is not None:
        log.print(f"resuming {resume_from} at iteration {start_step} of {total}")
    what = f"LoRA rank {cfg.lora_rank}" if cfg.lora else "full fine-tuning"
    log.print(f"{cfg.algo.upper()} on {cfg.init_from}: {args.num_params() / 1e6:.2f}M parameters, "
              f"{trainable_parameters(policy) / 1e6:.3g}M trained ({what}) on {device}; {total} iterations of "
              f"{cfg.batch_size} prompts x {cfg.group_size} replies, reward "
              f"{cfg.reward_fn or cfg.reward_model}, KL coef {cfg.kl_coef:g} ({cfg.estimator})")
    log.log("config", start_step, **cfg.to_dict(), model_args=args.to_dict(), data_report=prompts.report.to_dict())

    precision = "bf16" if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda") else "fp32"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              stop_tokens=sorted(tokenizer.stop_tokens))
    heldout = prompts.heldout[:cfg.eval_prompts]

    def forward(model: torch.nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast:
            return batch_logprobs(model, batch, cfg.micro_batch_size or len(batch), cfg.loss_chunk, device)

    def evaluate(step: int) -> dict[str, Any]:
        """Mean reward of greedy replies to the held-out prompts."""
        if not heldout:
            return {}
        greedy = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens, stop_tokens=sampling.stop_tokens)
        samples = sample_replies(model, heldout, [0] * len(heldout), greedy, tokenizer, cfg.rollout_batch_size)
        scores, failed = score_replies(samples, heldout, reward, cfg.reward_on_error)
        result = {"heldout_reward": float(scores.mean()), "heldout_failures": failed,
                  "heldout_stopped": sum(s.stopped for s in samples) / len(samples)}
        log.log("eval", step, **result, replies=[{"prompt": p.messages[-1]["content"], "reply": s.text,
                                                  "reward": s.reward} for p, s in zip(heldout[:4], samples)])
        log.print(f"iter {step:>5}/{total} | held-out reward {result['heldout_reward']:.4f} over {len(heldout)} prompts"
                  f" (greedy) | e.g. {heldout[0].messages[-1]['content'][:40]!r} -> {samples[0].text[:60]!r}")
        return result

    def save(step: int) -> None:
        path = resume.save(cfg, step, policy, optimizer, {
            "total_steps": total, "prompt_order": order.state_dict(), "guard": guard.state_dict(),
            "model_args": args.to_dict(), "tokenizer_sha256": tokenizer.sha256, "prompts_sha256": fingerprint})
        log.log("checkpoint", step, path=str(path))

    summary: dict[str, Any] = {"start_step": start_step}
    if resume_from is None and cfg.eval_on_start:
        summary["start_eval"] = evaluate(0)
    step = start_step
    while step < total:
        lr = cfg.lr_at(step, total)
        set_lr(optimizer, lr)
        t0 = time.perf_counter()
        chosen = [prompts.train[i] for i in order.next(cfg.batch_size)]
        group = [p for p in chosen for _ in range(cfg.group_size)]  # groups are consecutive
        samples = sample_replies(model, group, reply_seeds(cfg.seed, step, len(group)), sampling, tokenizer,
                                 cfg.rollout_batch_size)
        t_gen = time.perf_counter() - t0
        scores, failed = score_replies(samples, group, reward, cfg.reward_on_error)
        batch = RolloutBatch.build(samples, tokenizer.pad_id)
        stats = advantages(cfg, policy, reference, batch, forward)
        metrics = optimize(cfg, policy, optimizer, batch, guard, step, autocast, device)
        if metrics.pop("_stop", False):
            log.close()
            raise HerdError(f"{metrics['skipped']} at iteration {step + 1}; lower --lr, then resume from the last "
                            "checkpoint with --resume.")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step += 1
        generated = sum(len(s.reply_ids) for s in samples)
        record = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                  **stats, **metrics, "lr": lr, "response_len": generated / len(samples),
                  "stopped": sum(s.stopped for s in samples) / len(samples), "reward_failures": failed,
                  "tokens_per_s": generated / max(t_gen, 1e-9), "step_s": dt, "memory_mb": memory_mb(device),
                  "epochs": order.epochs()}
        log.log("train", step, **record)
        if cfg.log_samples:
            log.log("samples", step, samples=[s.to_dict() for s in samples[:cfg.log_samples]])
        if step % cfg.log_every == 0 or step == total or step == start_step + 1:
            log.print(f"iter {step:>5}/{total} | reward {record['reward']:7.4f} | kl {record['kl']:7.4f} | "
                      f"pg {record['pg_loss']:8.4f}" + (f" | vf {record['vf_loss']:7.4f}" if cfg.algo == "ppo" else "")
                      + f" | clip {record['clipfrac']:.3f} | len {record['response_len']:5.1f} | "
                      f"{record['tokens_per_s']:>7,.0f} gen tok/s | {dt:5.1f} s")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            evaluate(step)
        if cfg.stop_at and step == cfg.stop_at and step < total:
            save(step)
            log.print(f"stopped at iteration {step} as asked (--stop-at); continue with --resume")
            log.close()
            return {**summary, "stopped_at": step, "total_steps": total}
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            save(step)

    if step > start_step or resume_from is None:
        save(step)
    summary.update(steps=step, total_steps=total)
    summary.update(evaluate(step))
    summary.update(export_policy(model, args, out, init_from=cfg.init_from, export_format=cfg.export_format,
                                 tokenizer_path=tokenizer_path, lora=lora, merge=cfg.merge))
    if reward_fn is not None and reward_fn.report():
        log.print(reward_fn.report())
        summary["reward_fn_errors"] = dict(reward_fn.errors)
    log.close()
    summary["plot"] = str(plot_rewards(out / "log.jsonl", out / "reward.png"))
    train = read_log(out / "log.jsonl", "train")
    if train:
        summary.update(reward=train[-1]["reward"], kl=train[-1]["kl"])
    log.print("wrote " + ", ".join(f"{k} {v}" for k, v in summary.items() if k in ("final", "adapter", "plot")))
    return summary


@torch.no_grad()
def advantages(cfg: PPOConfig, policy: PolicyWithValue, reference: PolicyWithValue | None, batch: RolloutBatch,
               forward) -> dict[str, float]:
    """Fill batch.old_logprobs / ref_logprobs / old_values / advantages / returns; returns the KL metrics.

    kl: the mean over replies of the summed per-token log-ratio log pi - log pi_ref (k1: an unbiased
    estimate of each reply's KL to the reference); what the PPO reward penalizes (TRL's objective/kl).
    """
    was_training = policy.training
    policy.eval()  # no dropout: the log-probs of the policy the samples came from
    batch.old_logprobs, batch.old_values = forward(policy, batch)
    if cfg.kl_coef > 0:
        if reference is None:
            with adapters_disabled(policy):
                batch.ref_logprobs, _ = forward(policy, batch)
        else:
            batch.ref_logprobs, _ = forward(reference, batch)
    else:
        batch.ref_logprobs = batch.old_logprobs
    policy.train(was_training)
    mask = batch.mask
    seq_kl = ((batch.old_logprobs - batch.ref_logprobs) * mask).sum(1)
    stats = {"kl": float(seq_kl.mean()),
             "kl_token": float(masked_mean(kl_penalty(batch.old_logprobs, batch.ref_logprobs, cfg.estimator), mask))}
    if cfg.algo == "ppo":
        rewards, _ = token_rewards(batch.scores, batch.old_logprobs, batch.ref_logprobs, mask, cfg.kl_coef,
                                   cfg.estimator)
        adv, batch.returns = gae(rewards, batch.old_values, mask, cfg.gamma, cfg.lam)
        batch.advantages = masked_whiten(adv, mask) if cfg.whiten_advantages else adv
        stats["value"] = float(masked_mean(batch.old_values, mask))
        stats["non_score_reward"] = float((rewards.sum(1) - batch.scores).mean())
    else:
        batch.advantages = grpo_advantages(batch.scores, cfg.group_size, cfg.scale_rewards)
        groups = batch.scores.view(-1, cfg.group_size)
        stats["frac_reward_zero_std"] = float((groups.std(1) == 0).float().mean())  # groups that teach nothing (TRL's name)
    return stats


def optimize(cfg: PPOConfig, policy: PolicyWithValue, optimizer: torch.optim.Optimizer, batch: RolloutBatch,
             guard: SpikeGuard, step: int, autocast: Any, device: torch.device) -> dict[str, Any]:
    """--ppo-epochs passes of --minibatches updates over the iteration's samples; mean metrics of the updates."""
    n = len(batch)
    mini = n // cfg.minibatches
    micro = cfg.micro_batch_size or mini
    per_token = cfg.loss_aggregation == "token"
    totals: dict[str, float] = {}
    updates = 0
    for epoch in range(cfg.ppo_epochs):
        perm = (torch.arange(n) if cfg.minibatches == 1 else
                torch.randperm(n, generator=torch.Generator().manual_seed(
                    int(np.random.default_rng([cfg.seed, step, 2, epoch]).integers(2 ** 62)))))
        for m in range(cfg.minibatches):
            mb_all = batch.select(perm[m * mini:(m + 1) * mini])
            n_tok, n_seq = max(mb_all.n_tokens, 1), len(mb_all)

            def loss_fn(mb: RolloutBatch):
                """This micro-batch's share of the minibatch's losses (the means' weights), with metric shares."""
                mb = mb.to(device)
                tok_w, seq_w = mb.n_tokens / n_tok, len(mb) / n_seq
                with autocast:
                    lp, values = policy(mb.tokens, mb.targets, cfg.loss_chunk)
                pg, pm = ppo_policy_loss(lp, mb.old_logprobs, mb.advantages, mb.mask, cfg.clip, cfg.loss_aggregation)
                w = tok_w if per_token else seq_w
                loss = pg * w
                metrics = {"pg_loss": pg.detach() * w, "clipfrac": pm["clipfrac"] * tok_w,
                           "approx_kl": pm["approx_kl"] * tok_w}
                if cfg.algo == "grpo" and cfg.kl_coef > 0:
                    kl = kl_penalty(lp, mb.ref_logprobs, cfg.estimator)
                    kl_term = masked_mean(kl, mb.mask) if per_token else masked_mean(kl, mb.mask, dim=1).mean()
                    loss = loss + cfg.kl_coef * kl_term * w
                    metrics["kl_loss"] = kl_term.detach() * w
                if values is not None:
                    vf, vm = ppo_value_loss(values, mb.old_values, mb.returns, mb.mask, cfg.vf_clip)
                    loss = loss + cfg.vf_coef * vf * tok_w
                    metrics.update(vf_loss=vf.detach() * tok_w, vf_clipfrac=vm["vf_clipfrac"] * tok_w)
                return loss, metrics

            hint = (f"a micro-batch of {micro} samples at iteration {step + 1} is too large: lower --micro-batch-size "
                    "or --max-new-tokens")
            result = train_step(policy, optimizer, mb_all.split(micro), loss_fn, denominator=1.0,
                                grad_clip=cfg.grad_clip, guard=guard, oom_hint=hint)
            if result.skipped and guard.must_stop():
                return {"_stop": True, "skipped": result.skipped}
            updates += 1
            for k, v in {"loss": result.loss, "grad_norm": result.grad_norm, **result.metrics,
                         "skipped": float(bool(result.skipped))}.items():
                totals[k] = totals.get(k, 0.0) + v
            if updates == 1:  # the first update's losses: on the rollout policy itself (ratio 1)
                totals["first_loss"] = result.loss
                totals["first_pg_loss"] = result.metrics.get("pg_loss", 0.0)
                if "vf_loss" in result.metrics:
                    totals["first_vf_loss"] = result.metrics["vf_loss"]
    firsts = {k: totals.pop(k) for k in list(totals) if k.startswith("first_")}
    return {**{k: v / updates for k, v in totals.items()}, **firsts, "updates": updates}


def plot_rewards(log_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Mean reward (and held-out reward) and KL to the reference per iteration, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_log(log_path, "train"), read_log(log_path, "eval")
    fig, (ax_r, ax_k) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if train:
        ax_r.plot([r["step"] for r in train], [r["reward"] for r in train], lw=1, label="rollout reward")
        ax_k.plot([r["step"] for r in train], [r["kl"] for r in train], lw=1, color="C3")
    if evals:
        ax_r.plot([r["step"] for r in evals], [r["heldout_reward"] for r in evals], "o-", label="held-out (greedy)")
    ax_r.set_ylabel("mean reward")
    ax_r.grid(alpha=0.3)
    ax_r.legend()
    ax_k.set_ylabel("KL to reference (nats / reply)")
    ax_k.set_xlabel("iteration")
    ax_k.grid(alpha=0.3)
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png_path


def _stored_tokenizer(init_from: str) -> str | None:
    from herd.checkpoint import find_tokenizer

    found = find_tokenizer(init_from)
    return str(found) if found is not None else None

