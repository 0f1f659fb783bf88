"""Sampling: the per-request SamplingParams and the pure functions that turn logits into a token.

Order of the filters (as in Hugging Face's logits warpers): temperature, top-k, top-p, min-p,
then a draw from the renormalized distribution with the request's own torch.Generator, so a
seeded request gives the same tokens whatever else is in its batch. The engine's draw
(sample_token) applies the same filters to the few hundred most likely tokens instead of sorting
the whole 128K vocabulary, whenever those provably hold every token the filters keep. Temperature 0 is greedy
(argmax of the raw logits; the first index wins ties, as in transformers).

The filters work on logits and return logits with removed tokens set to -inf, so they compose
and the final softmax renormalizes in one place. Presence and frequency penalties (OpenAI's
definition: logit -= frequency_penalty * count + presence_penalty * [count > 0], over the tokens
generated so far) come before everything else, greedy included. A TokenConstraint (JSON mode)
restricts the choice to the tokens it allows: the sampler tries the likely tokens first and
builds the constraint's full mask only when they are all refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from herd.errors import HerdError


@dataclass
class SamplingParams:
    """How one request is decoded. Defaults follow Meta's reference (temperature 0.6, top-p 0.9)."""

    temperature: float = 0.6
    """Softmax temperature; 0 means greedy (always the most likely token)."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability mass exceeds p (1 = off)."""
    top_k: int | None = None
    """Keep only the k most likely tokens (unset = off)."""
    min_p: float | None = None
    """Keep tokens whose probability is at least min_p times the top token's (unset = off)."""
    seed: int | None = None
    """Random seed of this request's sampler, for reproducible samples (unset = nondeterministic)."""
    max_new_tokens: int = 256
    """Stop after this many generated tokens."""
    stop_tokens: list[int] = field(default_factory=list)
    """Token ids that end the generation (not included in the returned tokens)."""
    logprobs: bool = False
    """Also return the log-probability of each generated token under the unmodified distribution."""
    top_logprobs: int = 0
    """With logprobs: also return this many most likely alternatives (id, log-prob) at each step."""
    prompt_logprobs: bool = False
    """Also return log p(prompt[t] | prompt[:t]) for every prompt token (the prefix cache is then bypassed)."""
    presence_penalty: float = 0.0
    """Subtract this from the logit of every token already generated (OpenAI's presence_penalty, -2..2)."""
    frequency_penalty: float = 0.0
    """Subtract this times its count from the logit of every generated token (OpenAI's frequency_penalty, -2..2)."""
    watch_tokens: list[int] = field(default_factory=list)
    """Token ids whose log-probabilities under the unmodified distribution every step reports (TokenEvent.watched):
    a classifier's score, e.g. p("unsafe") as a guard's first token."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise HerdError(f"temperature must be >= 0, got {self.temperature}; use 0 for greedy decoding.")
        if not 0 < self.top_p <= 1:
            raise HerdError(f"top_p must be in (0, 1], got {self.top_p}; use 1 to turn nucleus sampling off.")
        if self.top_k is not None and self.top_k < 1:
            raise HerdError(f"top_k must be a positive integer, got {self.top_k}; leave it unset to turn it off.")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise HerdError(f"min_p must be in [0, 1], got {self.min_p}; leave it unset to turn it off.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise HerdError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise HerdError(f"top_logprobs must be an integer from 0 to 20, got {self.top_logprobs!r}.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise HerdError(f"{name} must be between -2 and 2, got {getattr(self, name)}.")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A torch.Generator seeded for this request (None when no seed is set: the global RNG is used)."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


def check_logits(logits: Tensor) -> None:
    """HerdError when logits hold NaN: greedy and sampled decoding would both pick arbitrary tokens, silently."""
    if torch.isnan(logits).any():
        raise HerdError("the model produced NaN logits (its weights hold NaN, or the compute dtype overflows); "
                        "run it with --dtype float32, or check the checkpoint it was saved from.")


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature (temperature > 0). [..., V] -> [..., V]"""
    return logits / temperature


def top_k_filter(logits: Tensor, k: int | None) -> Tensor:
    """Keep the k largest logits of the last dim, set the rest to -inf. [..., V] -> [..., V]"""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1] the k-th largest
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest prefix of tokens sorted by probability whose mass exceeds p; the top token always stays.

    A token is dropped when the mass of the tokens before it already exceeds p (Meta's sample_top_p).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [..., V]
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [..., V] mass of the strictly more likely tokens
    drop_sorted = mass_before > p
    drop_sorted[..., 0] = False  # float rounding must never empty the set
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float | None) -> Tensor:
    """Keep tokens whose probability is at least min_p times the largest probability. [..., V] -> [..., V]"""
    if not min_p:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # [..., 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def sampling_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution a non-greedy request samples from: all filters applied, renormalized. [..., V]"""
    x = apply_temperature(logits.float(), params.temperature)
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    x = min_p_filter(x, params.min_p)
    return torch.softmax(x, dim=-1)


CANDIDATES = (256, 2048)
"""How many of the most likely tokens a nucleus (top-p) or min-p draw looks at, smallest first; the
whole vocabulary is sorted only when the largest set does not hold the nucleus (a near-flat distribution)."""


def _draws(weights: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """Indices of n independent draws from unnormalized non-negative weights [m] (inverse CDF). -> [n]"""
    cdf = torch.cumsum(weights.double(), 0)
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=weights.device) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=weights.shape[0] - 1)


def _draw(weights: Tensor, generator: torch.Generator | None) -> int:
    """Index of one draw from unnormalized non-negative weights [m] (inverse CDF, one uniform number)."""
    return int(_draws(weights, 1, generator)[0])


def sampling_support(logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor] | None:
    """The tokens a non-greedy draw can pick for one row of logits [V], without sorting the vocabulary.

    Returns (ids [n], weights [n]): weights proportional to sampling_probs(logits, params) at ids, and
    zero for filtered tokens among ids; the tokens not in ids have probability 0. The filters keep the
    same tokens as top_k_filter / top_p_filter / min_p_filter but look only at the top-k tokens, or at
    the CANDIDATES most likely ones when those provably hold every token top-p and min-p keep.
    None when they might not (a near-flat distribution, or ties at the k-th logit): use sampling_probs.
    """
    x = logits.float() / params.temperature  # [V]
    vocab = x.shape[-1]
    if params.top_k is not None and params.top_k < vocab:
        vals, ids = torch.topk(x, params.top_k)  # [k] sorted, largest first
        if int((x >= vals[-1]).sum()) != params.top_k:  # ties at the k-th logit: top_k_filter keeps them all
            return None
        return _filter_candidates(vals, ids, torch.logsumexp(vals, 0), params, complete=True)
    if params.top_p < 1 or params.min_p:
        log_z = torch.logsumexp(x, 0)
        for n in CANDIDATES:
            vals, ids = torch.topk(x, min(n, vocab))
            support = _filter_candidates(vals, ids, log_z, params, complete=vals.shape[0] == vocab)
            if support is not None or n >= vocab:
                return support
            if float(torch.logsumexp(vals, 0) - log_z) < -0.7:  # under half the mass: a near-flat row, sort it
                break
        return None
    return torch.arange(vocab, device=x.device), torch.softmax(x, 0)  # temperature only: the whole vocabulary


def _filter_candidates(vals: Tensor, ids: Tensor, log_z: Tensor, params: SamplingParams,
                       complete: bool) -> tuple[Tensor, Tensor] | None:
    """top-p and min-p over the most likely tokens (vals, ids [n], largest first) of a row whose
    log-normalizer is log_z; None when tokens outside them might be kept (complete: there are none)."""
    probs = torch.exp(vals - log_z)  # [n] probabilities after temperature and top-k
    keep = torch.ones_like(probs, dtype=torch.bool)
    covered = complete
    if params.top_p < 1:
        keep &= torch.cumsum(probs, 0) - probs <= params.top_p  # mass of the more likely tokens (top_p_filter)
        keep[0] = True
        covered = covered or bool(probs.sum() > params.top_p)  # the first token left out is dropped too
    if params.min_p:
        threshold = params.min_p * probs[0]
        keep &= probs >= threshold
        covered = covered or bool(probs[-1] < threshold)  # every token left out is below it too
    return (ids, probs * keep) if covered else None


def filtered_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """sampling_probs for one row of logits [V] -> [V], through sampling_support (no vocabulary sort when the
    candidates hold the kept tokens): for callers that need the whole distribution (speculative decoding)."""
    support = sampling_support(logits, params)
    if support is None:
        return sampling_probs(logits.unsqueeze(0), params)[0]
    ids, weights = support
    return torch.zeros(logits.shape[-1], dtype=weights.dtype, device=weights.device).index_put_(
        (ids,), weights / weights.sum())


def draw(probs: Tensor, generator: torch.Generator | None = None) -> int:
    """One index drawn from a distribution [V] (non-negative, any scale) by inverse CDF (torch.multinomial's
    result distribution at a fraction of its cost on a large vocabulary)."""
    return _draw(probs, generator)


def sample_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One draw from sampling_probs(logits, params) for one non-greedy row of logits [V].

    Through sampling_support and an inverse-CDF lookup of one uniform number: on a 128K vocabulary
    ~0.5 ms instead of ~15 ms for the default top-p 0.9 (which sorts the whole vocabulary) and ~3 ms
    for torch.multinomial.
    """
    support = sampling_support(logits, params)
    if support is None:
        return _draw(sampling_probs(logits.unsqueeze(0), params)[0], generator)
    ids, weights = support
    return int(ids[_draw(weights, generator)])


def next_tokens(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> Tensor:
    """Choose the next token of every row of logits [B, V] under that row's params. -> LongTensor [B]"""
    if all(p.greedy for p in params):  # the common fast path: one argmax for the whole batch
        return logits.argmax(dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for i, (p, g) in enumerate(zip(params, generators)):
        row = logits[i:i + 1]  # [1, V]
        out[i] = row.argmax(dim=-1)[0] if p.greedy else sample_token(row[0], p, g)
    return out


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log_softmax of the unmodified logits at the chosen tokens (negative cross-entropy). [B, V], [B] -> [B]"""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def apply_penalties(logits: Tensor, generated: list[int], params: SamplingParams) -> Tensor:
    """OpenAI's presence and frequency penalties over the generated ids, for one row. [V] -> [V]"""
    if not generated or not params.penalized:
        return logits
    counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.shape[-1])
    counts = counts[: logits.shape[-1]].to(logits.dtype)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)


def top_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most likely tokens of each row of raw logits [B, V]: (ids [B, k], log-probs [B, k])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(lp, k, dim=-1)
    return ids, vals


class TokenConstraint(Protocol):
    """Restricts which token may come next (JSON mode). The engine calls advance() with each chosen token."""

    def allows(self, token: int) -> bool: ...

    def allowed_mask(self, vocab_size: int) -> Tensor: ...

    def advance(self, token: int) -> None: ...


def constrained_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
                      constraint: TokenConstraint, tries: int = 16) -> int:
    """Choose the next token of one row of logits [V] among those the constraint allows.

    Greedy: the most likely allowed token. Sampling: a draw from the request's filtered distribution
    restricted to the allowed tokens. Both first try the likely candidates one by one (cheap: a
    trained model usually proposes an allowed token) and fall back to the constraint's full mask.
    """
    if params.greedy:
        for tok in torch.topk(logits, min(tries, logits.shape[-1])).indices.tolist():
            if constraint.allows(tok):
                return tok
        mask = constraint.allowed_mask(logits.shape[-1]).to(logits.device)
        return int(logits.masked_fill(~mask, float("-inf")).argmax())
    # Rejection sampling: the first allowed one of independent draws is a draw from the allowed part
    # of the distribution. All tries come from one cumulative sum over the filtered support.
    support = sampling_support(logits, params)
    ids, weights = support if support is not None else (None, sampling_probs(logits.unsqueeze(0), params)[0])
    for i in _draws(weights, tries, generator).tolist():
        tok = int(ids[i]) if ids is not None else i
        if constraint.allows(tok):
            return tok
    mask = constraint.allowed_mask(logits.shape[-1]).to(logits.device)
    return sample_token(logits.masked_fill(~mask, float("-inf")), params, generator)
