"""Preference losses as pure functions of per-response rewards or log-probs: Bradley-Terry, DPO, NLL.

Bradley-Terry (reward models). Llama 2 trained its reward model with -log sigma(r_c - r_r - m(r))
(Touvron et al. 2023, §3.2.2, eq. 2); Llama 3 §4.1.2 keeps the objective "except that we remove the margin
term in the loss". TRL's RewardTrainer (trl/trainer/reward_trainer.py, compute_loss) adds the
margin when the data has a "margin" column; so does `bradley_terry_loss` when given one.

DPO (Rafailov et al. 2023), as TRL 1.16's DPOTrainer computes it (trl/trainer/dpo_trainer.py,
_compute_loss): with s = log pi(y|x) - log pi_ref(y|x) summed over a response's tokens,
    sigmoid  -log sigma(beta (s_c - s_r))                              (loss_type "sigmoid")
    + label smoothing e: -(1 - e) log sigma(beta d) - e log sigma(-beta d)   (conservative DPO, the
             form TRL's sigmoid loss had with label_smoothing up to 0.x)
    ipo      ((s_c / n_c - s_r / n_r) - 1 / (2 beta))^2, s divided by the response's token count n
             (TRL: "confirmed with the IPO authors")
    length_normalize: sigmoid on s / n (TRL's "sigmoid_norm")
    reference_free: log pi_ref = 0.
Llama 3 §4.1.4 adds an NLL term "with a scaling coefficient of 0.2 on the chosen sequences" (Pang
et al. 2024), a token-level mean as TRL's "sft" loss (-chosen_per_token_logps[chosen_mask].mean()),
and masks the formatting tokens out of the sums (herd.posttrain.pairs MASKS).

Every function returns per-pair (or summed) values so a training loop can normalize over a global
batch under gradient accumulation and data parallelism; `dpo_objective` does that for one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from herd.errors import HerdError
from herd.posttrain.pairs import MASKS, PreferenceBatch, sequence_sums

DPO_LOSSES = ("sigmoid", "ipo")


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Per-pair -log sigma(r_c - r_r - margin) = softplus(-(r_c - r_r - margin)): float32 [P]."""
    delta = chosen.float() - rejected.float()
    if margin is not None:
        delta = delta - margin.float()
    return -F.logsigmoid(delta)


def reward_pair_rewards(rewards: Tensor, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) rewards [P] of every pair of a batch (ranked triples give all three pairs)."""
    return rewards.index_select(0, batch.chosen), rewards.index_select(0, batch.rejected)


def pair_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """Sums over pairs (divide by the pair count): accuracy (chosen strictly higher) and margin."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum()}


@dataclass
class DPOConfig:
    """The DPO loss and its switches (flags of `herd dpo`); the defaults are Llama 3's recipe (§4.1.4)."""

    beta: float = 0.1
    """Strength of the KL constraint to the reference (Llama 3: 0.1)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo (squared loss on length-normalized log-ratios)."""
    label_smoothing: float = 0.0
    """Probability that a pair's label is flipped (conservative DPO); sigmoid loss only."""
    reference_free: bool = False
    """Compare the policy's log-probs alone (the reference's are taken as 0)."""
    length_normalize: bool = False
    """Divide each response's log-ratio by its token count before the sigmoid (TRL's sigmoid_norm)."""
    nll_weight: float = 0.2
    """Weight of the token-mean negative log-likelihood of the chosen responses (Llama 3: 0.2; 0 = off)."""
    mask: str = "llama3"
    """Tokens the log-prob sums count: llama3 (no header / end-of-turn tokens) or completion (every response token, TRL)."""

    def validate(self) -> None:
        if self.loss_type not in DPO_LOSSES:
            raise HerdError(f"unknown --loss-type '{self.loss_type}'; use one of: {', '.join(DPO_LOSSES)}.")
        if self.mask not in MASKS:
            raise HerdError(f"unknown --mask '{self.mask}'; use one of: {', '.join(MASKS)}.")
        if not self.beta > 0:
            raise HerdError(f"--beta must be positive, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise HerdError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise HerdError("--label-smoothing applies to the sigmoid loss only.")
        if self.nll_weight < 0:
            raise HerdError(f"--nll-weight must be >= 0, got {self.nll_weight}.")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None,
             length_normalize: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO losses [P] and the implicit rewards beta * (log pi - log pi_ref) of chosen and rejected [P].

    policy_* / ref_*: summed log-probs of each pair's responses; ref None = reference-free.
    chosen_tokens / rejected_tokens: the token counts of those sums (ipo and length_normalize need them).
    """
    if loss_type not in DPO_LOSSES:
        raise HerdError(f"unknown DPO loss '{loss_type}'; use one of: {', '.join(DPO_LOSSES)}.")
    chosen_ratio = policy_chosen.float() - (0.0 if ref_chosen is None else ref_chosen.float())
    rejected_ratio = policy_rejected.float() - (0.0 if ref_rejected is None else ref_rejected.float())
    if loss_type == "ipo" or length_normalize:
        if chosen_tokens is None or rejected_tokens is None:
            raise HerdError("the ipo loss and length normalization need the token counts of each response.")
        chosen_score = chosen_ratio / chosen_tokens.float().clamp(min=1.0)
        rejected_score = rejected_ratio / rejected_tokens.float().clamp(min=1.0)
    else:
        chosen_score, rejected_score = chosen_ratio, rejected_ratio
    delta = chosen_score - rejected_score
    if loss_type == "ipo":
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def nll_sum(token_logprobs: Tensor, batch: PreferenceBatch, responses: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sum of -log p over the tokens of `responses`, their count) under the token mask `keep` (None: all).

    The NLL term is this sum over a (global) batch divided by the count: a token-level mean.
    """
    chosen = torch.zeros(batch.n_responses, dtype=torch.bool, device=token_logprobs.device)
    chosen[responses] = True
    sel = chosen.index_select(0, batch.owner)
    if keep is not None:
        sel = sel & keep
    return -(token_logprobs * sel.to(token_logprobs.dtype)).sum(), sel.sum().float()


def winners(batch: PreferenceBatch) -> Tensor:
    """Responses preferred in at least one pair (chosen of a pair; edited and chosen of a ranked triple)."""
    return torch.unique(batch.chosen)


def dpo_objective(token_logprobs: Tensor, ref_logps: Tensor | None, batch: PreferenceBatch, cfg: DPOConfig,
                  pair_norm: float | None = None, token_norm: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO loss of a batch: sum over its pairs / pair_norm + nll_weight * NLL sum / token_norm.

    token_logprobs: the policy's log-prob of every response token [N] (herd.posttrain.pairs.response_logprobs);
    ref_logps: the reference's per-response sums [n_responses] under cfg.mask (None when reference_free).
    pair_norm / token_norm: the pair count and the chosen-token count to divide by (default: this
    batch's; a loop with gradient accumulation passes the global batch's). Returns the loss and
    metric sums over the pairs (rewards, accuracy, margin, log-probs) and the NLL.
    """
    keep = batch.keep(cfg.mask)
    sums = sequence_sums(token_logprobs, batch, keep)
    counts = batch.token_counts(cfg.mask)
    c, r = batch.chosen, batch.rejected
    ref_c = ref_r = None
    if not cfg.reference_free:
        if ref_logps is None:
            raise HerdError("DPO needs the reference log-probs (or reference_free=True).")
        ref_c, ref_r = ref_logps.index_select(0, c), ref_logps.index_select(0, r)
    losses, reward_c, reward_r = dpo_loss(sums.index_select(0, c), sums.index_select(0, r), ref_c, ref_r,
                                          cfg.beta, cfg.loss_type, cfg.label_smoothing, counts.index_select(0, c),
                                          counts.index_select(0, r), cfg.length_normalize)
    pairs = float(batch.n_pairs) if pair_norm is None else pair_norm
    loss = losses.sum() / pairs
    nll, n_tokens = nll_sum(token_logprobs, batch, winners(batch), keep)
    if cfg.nll_weight:
        tokens = n_tokens.clamp(min=1.0) if token_norm is None else token_norm
        loss = loss + cfg.nll_weight * nll / tokens
    metrics = {"dpo_loss": losses.detach().sum(), "rewards_chosen": reward_c.sum(), "rewards_rejected": reward_r.sum(),
               **pair_metrics(reward_c, reward_r),
               "logps_chosen": sums.detach().index_select(0, c).sum(),
               "logps_rejected": sums.detach().index_select(0, r).sum()}
    return loss, {k: v.detach() for k, v in metrics.items()} | {"nll_sum": nll.detach(), "nll_tokens": n_tokens}

