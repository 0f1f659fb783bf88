"""PPOConfig: the flat settings of `herd ppo` (PPO with a value head, or GRPO), every field a flag.

Defaults and where they come from:
  algo grpo               what open recipes train reasoning models with today (DeepSeekMath,
                          arXiv:2402.03300, section 4.1): no value model, advantages from a group
                          of samples per prompt;
  group_size 4            samples per prompt (TRL GRPOConfig.num_generations is 8; 4 keeps the
                          CPU examples fast, raise it on a GPU);
  clip 0.2, vf_clip 0.2, vf_coef 0.1, gamma 1, lam 0.95, kl_coef 0.05:
                          TRL's PPOConfig (cliprange, cliprange_value, vf_coef, gamma, lam, kl_coef);
  KL                      PPO puts -kl_coef * k1 into the per-token rewards (TRL's PPOTrainer);
                          GRPO adds kl_coef * k3 to the loss (TRL's GRPOTrainer, beta);
  temperature 1, top_p 1  rollouts sample the policy itself, so the stored log-probs are those of
                          the distribution the samples came from.

One step is one iteration: rollouts for `batch_size` prompts (x group_size samples each), their
rewards, reference log-probs and advantages, then `ppo_epochs` passes over them in `minibatches`
optimizer updates each. The learning-rate schedule runs over iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from herd.errors import HerdError
from herd.posttrain.config import FinetuneConfig
from herd.posttrain.rl import AGGREGATIONS, GRPO_SCALES, KL_ESTIMATORS
from herd.tokenizer.chat import DEFAULT_DATE

ALGOS = ("grpo", "ppo")


@dataclass
class PPOConfig(FinetuneConfig):
    """`herd ppo`: reinforcement learning of a policy on prompts against a reward (every field is a flag)."""

    out: str = "runs/ppo"
    """Run directory: checkpoints/, log.jsonl, rollouts.jsonl, reward.png and the export go here."""
    steps: int = 0
    """Iterations (rollouts + their optimisation epochs); 0 = as many as --epochs passes over the prompts take."""
    batch_size: int = 8
    """Prompts per iteration (each sampled --group-size times)."""
    micro_batch_size: int = 0
    """Samples per forward/backward; 0 = a whole minibatch at once."""
    prompts: list[str] = field(default_factory=list)
    """Prompt data: jsonl(.gz/.zst), json or parquet files or folders of {"messages": [...]} (a trailing assistant turn is dropped) or {"prompt": "..." or [...]} records."""
    algo: str = "grpo"
    """grpo (group-normalized rewards, no value head) or ppo (value head + GAE)."""
    reward_model: str = ""
    """Reward model folder (herd reward / transformers LlamaForSequenceClassification) that scores each reply."""
    reward_fn: str = ""
    """Python reward instead: MODULE:FUNCTION or FILE.py:FUNCTION called as fn(prompt_messages, reply_text) -> float."""
    reward_on_error: float = 0.0
    """Reward of a reply the reward cannot score (the function raised or returned a non-number; too long for the reward model): counted and reported."""
    group_size: int = 4
    """Samples per prompt in each iteration (GRPO's group; PPO may use 1)."""
    max_new_tokens: int = 64
    """Longest sampled reply in tokens."""
    max_prompt_len: int = 512
    """Prompts longer than this (in tokens) are dropped and counted."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts (1 = off)."""
    ppo_epochs: int = 1
    """Passes over each iteration's samples."""
    minibatches: int = 1
    """Optimizer updates per pass (the samples are split into this many shuffled minibatches)."""
    clip: float = 0.2
    """PPO ratio clipping epsilon."""
    kl_coef: float = 0.05
    """Weight of the KL to the reference (PPO: in the per-token rewards; GRPO: in the loss); 0 = no reference model."""
    kl_estimator: str = ""
    """KL estimator k1, k2 or k3 (Schulman 2020); empty = k1 for PPO, k3 for GRPO."""
    loss_aggregation: str = "token"
    """Mean of the policy loss over every token of a minibatch (token) or per sequence, then over sequences (sequence)."""
    scale_rewards: str = "group"
    """GRPO: divide rewards minus the group mean by the std of the group, of the batch, or none."""
    vf_coef: float = 0.1
    """PPO: weight of the value loss."""
    vf_clip: float = 0.2
    """PPO: value clipping around the rollout's values."""
    gamma: float = 1.0
    """PPO: discount of GAE."""
    lam: float = 0.95
    """PPO: lambda of GAE."""
    whiten_advantages: bool = True
    """PPO: normalize advantages over the samples of the iteration (TRL's PPOTrainer does)."""
    val_fraction: float = 0.1
    """Fraction of prompts held out for the held-out reward (stable hash of each record)."""
    eval_prompts: int = 32
    """Held-out prompts answered greedily at each evaluation; 0 = no held-out reward."""
    eval_every: int = 10
    """Held-out reward every N iterations (and at the end); 0 = only at the end."""
    checkpoint_every: int = 20
    """Save a resumable checkpoint every N iterations (and at the end); 0 = only at the end."""
    log_every: int = 1
    """Console progress line every N iterations (log.jsonl gets every one)."""
    chat_style: str = "hf"
    """Chat format of the prompts: hf (Llama 3.1 Instruct's template) or meta."""
    date_string: str = DEFAULT_DATE
    """'Today Date' of the hf chat style's system header."""
    reward_batch_size: int = 16
    """Replies per reward-model forward."""
    rollout_batch_size: int = 64
    """Most samples the inference engine decodes at once."""
    log_samples: int = 4
    """Sampled replies (prompt and reply ids, text, reward) written to log.jsonl per iteration; 0 = none."""

    @property
    def estimator(self) -> str:
        return self.kl_estimator or ("k1" if self.algo == "ppo" else "k3")

    def samples_per_step(self) -> int:
        return self.batch_size * self.group_size

    def total_steps(self, prompts: int) -> int:  # type: ignore[override]
        """--steps, or the iterations --epochs passes over `prompts` training prompts take."""
        return self.steps or max(1, math.ceil(self.epochs * prompts / self.batch_size))

    def validate(self) -> None:
        FinetuneConfig.validate(self)
        if self.algo not in ALGOS:
            raise HerdError(f"unknown --algo '{self.algo}'; use one of: {', '.join(ALGOS)}.")
        if not self.prompts:
            raise HerdError("no prompts given; pass --prompts with jsonl/parquet files or folders of chat prompts.")
        if bool(self.reward_model) == bool(self.reward_fn):
            raise HerdError("pass exactly one reward: --reward-model FOLDER or --reward-fn MODULE:FUNCTION "
                            "(or FILE.py:FUNCTION).")
        for name, value, allowed in (("kl-estimator", self.kl_estimator, ("",) + KL_ESTIMATORS),
                                     ("loss-aggregation", self.loss_aggregation, AGGREGATIONS),
                                     ("scale-rewards", self.scale_rewards, GRPO_SCALES),
                                     ("chat-style", self.chat_style, ("hf", "meta"))):
            if value not in allowed:
                raise HerdError(f"unknown --{name} '{value}'; use one of: {', '.join(a for a in allowed if a)}.")
        if self.group_size < 1 or (self.algo == "grpo" and self.group_size < 2):
            raise HerdError(f"--group-size {self.group_size}: GRPO compares samples of one prompt, so it needs at "
                            "least 2 (PPO at least 1).")
        if self.samples_per_step() % self.minibatches:
            raise HerdError(f"{self.samples_per_step()} samples per iteration (--batch-size x --group-size) do not "
                            f"split into --minibatches {self.minibatches}; choose a divisor.")
        mini = self.samples_per_step() // self.minibatches
        if self.micro_batch_size and mini % self.micro_batch_size:
            raise HerdError(f"a minibatch of {mini} samples does not split into micro-batches of "
                            f"{self.micro_batch_size}; choose a --micro-batch-size that divides it.")
        if min(self.max_new_tokens, self.max_prompt_len, self.ppo_epochs, self.minibatches,
               self.rollout_batch_size, self.reward_batch_size) < 1:
            raise HerdError("--max-new-tokens, --max-prompt-len, --ppo-epochs, --minibatches, --rollout-batch-size "
                            "and --reward-batch-size must be positive.")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise HerdError(f"--temperature must be > 0 and --top-p in (0, 1], got {self.temperature} and "
                            f"{self.top_p}.")
        if self.clip <= 0 or self.vf_clip <= 0 or self.kl_coef < 0 or self.vf_coef < 0:
            raise HerdError("--clip and --vf-clip must be positive, --kl-coef and --vf-coef >= 0.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise HerdError(f"--val-fraction must be in [0, 1), got {self.val_fraction}.")
        if self.dp > 1 or self.tp > 1:
            raise HerdError("herd ppo runs in one process (the inference engine samples from the training "
                            "model's own weights); drop --dp / --tp.")


def ppo_config_fields() -> tuple[str, ...]:
    """Names of the fields PPOConfig adds to FinetuneConfig (the 'reinforcement learning' flag group)."""
    base = {f.name for f in fields(FinetuneConfig)}
    return tuple(f.name for f in fields(PPOConfig) if f.name not in base)
