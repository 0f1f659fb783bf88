"""Rollouts for on-policy RL: sampling replies with herd's inference Engine, scoring them, and the
tensors the PPO / GRPO losses read (per-token log-probs, values, masks).

    samples = sample_replies(policy.policy, prompts, seeds, sampling, tokenizer)   # Engine on the training model
    scores, failed = score_replies(samples, reward)                                # reward model or function
    batch = RolloutBatch.build(samples, pad_id)                                     # [B, S] rows
    logprobs, values = policy(batch.tokens, batch.targets)                          # one forward, both heads

Weight sync: the Engine runs directly on the training model's module (its KV pool is separate,
its forward is the model's own), so every iteration samples from the current weights with no copy.
A new Engine is built per iteration: its prefix cache holds keys/values of the previous weights.
The G samples of one prompt are one fork group (Engine.add_forked_request): one prefill of the
prompt, then G samplers, each with its own seed.

Each row is prompt + reply (+ the stop token when the reply ended with one: the policy learns to
stop), right-padded; inputs are row[:-1], targets row[1:], and `mask` is True on the reply's
targets. Causal attention keeps every real token blind to the padding after it, so no attention
mask is needed. The value of target t is read from the hidden state that predicts it (the state
before that action), as TRL's value head does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from herd.inference.engine import Engine
from herd.inference.sampling import SamplingParams
from herd.posttrain.prompts import Prompt
from herd.train.loss import IGNORE, token_logprobs


class PolicyWithValue(nn.Module):
    """The policy (a herd Transformer, possibly with LoRA) plus an optional scalar value head on its final
    normed hidden states (PPO's critic sharing the policy's body; None for GRPO).

    forward(tokens, targets) -> (log p(targets) float32 [B, S] (0 at IGNORE targets), values [B, S] or None)
    """

    def __init__(self, policy: nn.Module, value_head: bool, seed: int = 0, std: float = 0.02) -> None:
        super().__init__()
        self.policy = policy
        self.value_head: nn.Linear | None = None
        if value_head:
            ref = policy.tok_embeddings.weight
            # reward.py's scalar head init: Normal(0, std) from a seeded generator (transformers' initializer_range)
            g = torch.Generator(device="cpu").manual_seed(seed)
            head = nn.Linear(policy.args.dim, 1, bias=False, device=ref.device, dtype=torch.float32)
            with torch.no_grad():
                head.weight.copy_(torch.randn(1, policy.args.dim, generator=g) * std)
            self.value_head = head

    def forward(self, tokens: Tensor, targets: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor | None]:
        keep = targets != IGNORE

        def head(h: Tensor, weight: Tensor) -> tuple[Tensor, Tensor | None]:
            # only the reply positions go through the vocabulary (the prompt is most of a row)
            lp = token_logprobs(h[keep], weight, targets[keep], chunk)
            lp = torch.zeros(targets.shape, dtype=lp.dtype, device=lp.device).masked_scatter(keep, lp)
            v = self.value_head(h.float()).squeeze(-1) if self.value_head is not None else None
            return lp, v

        return self.policy(tokens, head=head)


@dataclass
class Sample:
    """One sampled reply to one prompt."""

    prompt: int
    """Index of the prompt in the iteration's list."""
    prompt_ids: list[int]
    reply_ids: list[int]
    """The generated ids, ending with the stop token when the reply ended with one."""
    text: str
    """The decoded reply without its stop token (what the reward sees)."""
    stopped: bool
    """Whether the reply ended with a stop token (else it ran out of --max-new-tokens)."""
    engine_logprobs: list[float] = field(default_factory=list)
    """log p of each generated token as the Engine sampled it (the stop token's is not reported)."""
    reward: float = 0.0
    reward_ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "engine_logprobs"}


def sample_replies(model: nn.Module, prompts: Sequence[Prompt], seeds: Sequence[int], params: SamplingParams,
                   tokenizer: Any, max_batch_size: int = 64) -> list[Sample]:
    """One reply per (prompt, seed) from `model` through the inference Engine; the model is left in train mode.

    prompts[i] is answered with seeds[i]. Consecutive repeats of one prompt (a GRPO group) are one
    fork group of the Engine: the prompt is prefilled once and each reply samples on from it with its
    own seed, exactly as a request of its own would. So the samples depend only on the weights and
    the seeds, never on the batch they ran in.
    """
    was_training = model.training
    longest = max(len(p.ids) for p in prompts) + params.max_new_tokens
    engine = Engine(model, max_batch_size=max_batch_size, max_seq_len=longest)  # sets eval mode: no dropout
    plist = [SamplingParams(**{**params.__dict__, "seed": int(s), "logprobs": True}) for s in seeds]
    owner: dict[int, int] = {}
    i = 0
    while i < len(prompts):
        j = i + 1
        while j < len(prompts) and prompts[j].ids == prompts[i].ids:
            j += 1
        rids = engine.add_forked_request(prompts[i].ids, plist[i:j])
        owner.update({rid: i + k for k, rid in enumerate(rids)})
        i = j
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    stops: list[int | None] = [None] * len(prompts)
    try:
        with torch.no_grad():
            while engine.has_work():
                for e in engine.step():
                    n = owner[e.index]
                    if e.finish_reason == "stop":
                        stops[n] = e.token
                    else:
                        tokens[n].append(e.token)
                        if e.logprob is not None:
                            logprobs[n].append(e.logprob)
    finally:  # an interrupted rollout must not leave requests holding the KV cache
        for rid in owner:
            engine.abort(rid)
        model.train(was_training)
    out = []
    for n, p in enumerate(prompts):
        stopped = stops[n] is not None
        out.append(Sample(prompt=n, prompt_ids=list(p.ids), reply_ids=tokens[n] + ([stops[n]] if stopped else []),
                          text=tokenizer.decode(tokens[n]), stopped=stopped, engine_logprobs=logprobs[n]))
    return out


RewardSource = Callable[[list[list[dict[str, Any]]], list[str]], list["float | None"]]


def function_reward(fn: Callable[[list[dict[str, Any]], str], "float | None"]) -> RewardSource:
    """A batch reward from a per-reply function (herd.posttrain.reward_fn.RewardFunction: None on failure)."""
    return lambda prompts, replies: [fn(p, r) for p, r in zip(prompts, replies)]


def model_reward(scorer: Any) -> RewardSource:
    """A batch reward from a RewardScorer: the conversation prompt + reply, scored at its last token."""
    def score(prompts: list[list[dict[str, Any]]], replies: list[str]) -> list[float | None]:
        return scorer.score_conversations([list(p) + [{"role": "assistant", "content": r}]
                                           for p, r in zip(prompts, replies)])
    return score


def score_replies(samples: list[Sample], prompts: Sequence[Prompt], reward: RewardSource,
                  on_error: float = 0.0) -> tuple[Tensor, int]:
    """Rewards float32 [N] of the samples (also stored on each), and how many could not be scored
    (those get `on_error` and reward_ok False)."""
    scores = reward([prompts[s.prompt].messages for s in samples], [s.text for s in samples])
    failed = 0
    for s, v in zip(samples, scores):
        s.reward_ok = v is not None
        s.reward = float(v) if v is not None else float(on_error)
        failed += not s.reward_ok
    return torch.tensor([s.reward for s in samples], dtype=torch.float32), failed


@dataclass
class RolloutBatch:
    """Rows of prompt + reply as tensors, plus what the losses need per token ([B, S]) or per sample ([B])."""

    tokens: Tensor
    """Inputs: int64 [B, S] (row[:-1], right-padded)."""
    targets: Tensor
    """Next tokens: int64 [B, S], IGNORE off the reply."""
    mask: Tensor
    """bool [B, S]: True where the target is a reply token."""
    scores: Tensor
    """Rewards float32 [B]."""
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    old_values: Tensor | None = None
    advantages: Tensor | None = None
    """[B, S] (PPO) or [B] (GRPO)."""
    returns: Tensor | None = None

    @classmethod
    def build(cls, samples: Sequence[Sample], pad_id: int) -> "RolloutBatch":
        rows = [s.prompt_ids + s.reply_ids for s in samples]
        width = max(len(r) for r in rows) - 1
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (s, row) in enumerate(zip(samples, rows)):
            r = torch.as_tensor(row, dtype=torch.long)
            tokens[b, :len(row) - 1] = r[:-1]
            start = len(s.prompt_ids) - 1  # target index of the first reply token
            targets[b, start:len(row) - 1] = r[start + 1:]
            mask[b, start:len(row) - 1] = True
        scores = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        return cls(tokens, targets, mask, scores)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def select(self, idx: Tensor | Sequence[int]) -> "RolloutBatch":
        """The rows `idx`, cut to the longest of them."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        used = self.targets[idx] != IGNORE
        width = int(torch.nonzero(used.any(0)).max()) + 1 if used.any() else 1
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
                continue
            v = v[idx]
            out[f.name] = v[:, :width] if v.ndim == 2 else v
        return RolloutBatch(**out)

    def split(self, size: int) -> list["RolloutBatch"]:
        """Consecutive chunks of `size` rows."""
        return [self.select(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]

    def to(self, device: torch.device) -> "RolloutBatch":
        return RolloutBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                               for f in fields(self)})


@torch.no_grad()
def batch_logprobs(model: nn.Module, batch: RolloutBatch, micro: int, chunk: int = 4096,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs [B, S] (0 off the mask) and values [B, S] (or None) of `model` (a PolicyWithValue)
    over the rows of `batch`, `micro` rows per forward, on CPU."""
    lps, vals = [], []
    for mb in batch.split(micro):
        mb = mb.to(torch.device(device))
        lp, v = model(mb.tokens, mb.targets, chunk)
        width = batch.tokens.shape[1]
        pad = width - lp.shape[1]
        lps.append(nn.functional.pad(lp.float().cpu() * mb.mask.cpu(), (0, pad)))
        if v is not None:
            vals.append(nn.functional.pad(v.float().cpu() * mb.mask.cpu(), (0, pad)))
    return torch.cat(lps), (torch.cat(vals) if vals else None)
