"""Reinforcement-learning losses on sampled responses: PPO (with a value head) and GRPO (without).

All tensors are per token of the sampled responses, [B, T], with a bool `mask` [B, T] that is
True on the response tokens (padding after a response's end False); reductions are masked means.
The formulas are TRL's classic PPOTrainer (trl/experimental/ppo/ppo_trainer.py, removed in TRL
1.13) and TRL 1.16's GRPOTrainer (trl/trainer/grpo_trainer.py):

  per-token reward   r_t = -kl_coef * KL_t, plus the reward model's score on the last token
  KL estimators      (Schulman, "Approximating KL divergence", 2020), with log r = log pi_ref - log pi:
                     k1 = -log r,  k2 = (log r)^2 / 2,  k3 = (r - 1) - log r
  GAE                delta_t = r_t + gamma V_{t+1} - V_t (V after the last token = 0),
                     A_t = delta_t + gamma lambda A_{t+1}; returns R_t = A_t + V_t
  policy loss        max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), ratio = exp(log pi - log pi_old)
  value loss         0.5 max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)
  GRPO advantages    (r - mean over the prompt's group) / (std + 1e-4), std over the group
                     ("group"), the whole batch ("batch") or no division ("none"); std unbiased
                     (TRL's nanstd applies Bessel's correction)
"""

from __future__ import annotations

import torch
from torch import Tensor

from herd.errors import HerdError

KL_ESTIMATORS = ("k1", "k2", "k3")
GRPO_SCALES = ("group", "batch", "none")
AGGREGATIONS = ("token", "sequence")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the positions mask keeps (all dims, or along `dim`); 0 where nothing is kept."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the kept positions (variance with Bessel's correction, as TRL);
    shift_mean=False adds the mean back (scales only). Masked positions come out 0."""
    mean = masked_mean(x, mask)
    n = mask.sum().float()
    var = masked_mean((x - mean) ** 2, mask) * (n / (n - 1).clamp(min=1.0))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi: k1, k2 or k3 (see module doc)."""
    log_ratio = ref_logprobs.float() - logprobs.float()  # log (pi_ref / pi)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise HerdError(f"unknown KL estimator '{estimator}'; use one of: {', '.join(KL_ESTIMATORS)}.")


def last_positions(mask: Tensor) -> Tensor:
    """Index of the last True of each row of mask [B, T] (0 for an empty row): int64 [B]."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.zeros_like(idx)).amax(dim=1)


def token_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float = 0.05,
                  estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """PPO's per-token rewards [B, T]: -kl_coef * KL on every response token, plus each sequence's score [B]
    on its last token. Also returns the KL [B, T] (0 off the mask)."""
    m = mask.to(torch.float32)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * m
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_positions(mask)] += scores.float()
    return rewards * m, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation: (advantages, returns), each [B, T], 0 off the mask.

    The value after a sequence's last kept token is 0 (the episode ends there).
    """
    m = mask.to(torch.float32)
    rewards, values = rewards.float() * m, values.float() * m
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        nxt = m[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_value = values[:, t + 1] * nxt if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * nxt
        adv[:, t] = running
    adv = adv * m
    return adv, (adv + values) * m


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2,
                    aggregate: str = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate loss and metrics (clip fraction, approximate KL to the old policy).

    advantages: [B, T] (PPO) or [B] (GRPO: one per sequence, broadcast over its tokens).
    aggregate: "token" = mean over every kept token of the batch (TRL PPO; GRPO's dapo),
    "sequence" = mean over each sequence's tokens, then over sequences (GRPO's original).
    """
    if aggregate not in AGGREGATIONS:
        raise HerdError(f"unknown aggregation '{aggregate}'; use one of: {', '.join(AGGREGATIONS)}.")
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    losses = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))
    if aggregate == "token":
        loss = masked_mean(losses, mask)
    else:
        loss = masked_mean(losses, mask, dim=1).mean()
    with torch.no_grad():
        clipped = ((ratio - 1.0).abs() > clip).float()
        metrics = {"clipfrac": masked_mean(clipped, mask), "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask)}
    return loss, metrics


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                   clip: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss 0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2) and its clip fraction."""
    values = values.float()
    clipped = old_values.float() + (values - old_values.float()).clamp(-clip, clip)
    loss_a, loss_b = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_a, loss_b), mask)
    return loss, {"vf_clipfrac": masked_mean((loss_b > loss_a).float(), mask).detach()}


def grpo_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO's advantages [N] for rewards [N] laid out as consecutive groups of `group_size` samples per prompt."""
    if scale not in GRPO_SCALES:
        raise HerdError(f"unknown reward scaling '{scale}'; use one of: {', '.join(GRPO_SCALES)}.")
    if group_size < 1 or rewards.numel() % group_size:
        raise HerdError(f"{rewards.numel()} rewards do not form groups of {group_size} samples.")
    r = rewards.float()
    groups = r.view(-1, group_size)
    adv = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return adv
    if scale == "group":
        std = groups.std(dim=1, keepdim=True).expand_as(groups).reshape(-1) if group_size > 1 else torch.zeros_like(r)
    else:
        std = r.std().expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    return adv / (std + eps)
