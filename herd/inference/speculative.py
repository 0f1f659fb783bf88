"""Speculative decoding: a small draft model proposes k tokens, the target model checks them in one forward.

    decoder = SpeculativeDecoder(target, draft, k=4)
    results = decoder.generate([prompt_ids], SamplingParams(temperature=0, max_new_tokens=64))
    decoder.stats.acceptance_rate

One round (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding",
Algorithm 1; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling"):

1. the draft samples d_1..d_k from its distributions q_1..q_k (k cheap forwards, one token each);
2. the target runs once on [last token, d_1..d_k] and gives p_1..p_{k+1};
3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is
   drawn from norm(max(0, p_i - q_i)) and the round ends; if all k pass, one more comes from p_{k+1}.

Every emitted token is then distributed exactly as the target alone would sample it (the p and q are
the *filtered* distributions of herd.inference.sampling: temperature, top-k, top-p, min-p), and with
temperature 0 the rule reduces to "accept while the draft's token is the target's argmax", so the
output is token for token that of plain greedy decoding. Each round emits 1..k+1 tokens for one
target forward.

Caches: both models keep a static KVCache. A rejected token's cache slots are simply overwritten
later, because each forward's mask reads only the slots of the accepted prefix. Batch size 1: the
rounds of different requests accept different numbers of tokens. It drives the models and caches
directly and leaves herd.inference.engine alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from herd.errors import HerdError
from herd.inference.engine import GenerationResult, TokenEvent, _params_list
from herd.inference.sampling import SamplingParams, check_logits, draw, filtered_probs
from herd.model import KVCache, Transformer


@dataclass
class SpeculativeStats:
    """Counters over everything a SpeculativeDecoder generated."""

    rounds: int = 0
    """Target verification forwards (one per round)."""
    proposed: int = 0
    """Draft tokens proposed."""
    accepted: int = 0
    """Draft tokens the target accepted."""
    emitted: int = 0
    """Tokens emitted (accepted drafts + one target token per round, before max_new_tokens/stop cuts)."""

    @property
    def acceptance_rate(self) -> float:
        """Fraction of proposed draft tokens that were accepted."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per target forward (1 without speculation)."""
        return self.emitted / self.rounds if self.rounds else 0.0


def verify(p: Tensor, q: Tensor, draft: Sequence[int], greedy: bool,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """The acceptance rule for one round.

    p: target distributions [k + 1, V] (rows for d_1..d_k and the bonus position); for greedy, logits.
    q: draft distributions [k, V] the draft tokens were sampled from (unused when greedy).
    draft: the k proposed token ids.
    Returns (number of accepted draft tokens a, the token emitted after them).
    """
    k = len(draft)
    if greedy:
        best = p.argmax(dim=-1).tolist()  # [k + 1]
        a = 0
        while a < k and draft[a] == best[a]:
            a += 1
        return a, best[a]
    idx = torch.arange(k, device=p.device)
    d = torch.tensor(list(draft), device=p.device)
    ratio = p[idx, d] / q[idx, d]  # q(d_i) > 0 because d_i was drawn from q_i
    u = torch.rand(k, generator=generator, device=p.device)
    rejected = (u >= ratio).tolist()  # u < min(1, ratio) accepts
    a = rejected.index(True) if True in rejected else k
    if a == k:
        return k, draw(p[k], generator)
    residual = (p[a] - q[a]).clamp(min=0)
    if residual.sum() <= 0:  # only by rounding: p_a == q_a would have accepted
        residual = p[a]
    return a, draw(residual, generator)


class SpeculativeDecoder:
    """Batch-1 generation from `target`, with `draft` proposing `k` tokens per target forward.

    Same interface as Engine for one request at a time: check_request, stream, generate.
    The two models must share the tokenizer (the caller checks; herd generate compares the files).
    Their embedding tables may have different numbers of rows (presets pad the vocabulary
    differently): the draft's distribution is cut or padded with zero probability to the target's
    rows, which the acceptance rule handles exactly. Both run in their own dtype.
    """

    def __init__(self, target: Transformer, draft: Transformer, k: int = 4, max_seq_len: int | None = None):
        if k < 1:
            raise HerdError(f"the number of draft tokens must be at least 1, got {k}.")
        self.target, self.draft, self.k = target.eval(), draft.eval(), k
        self.args = target.args
        self.max_seq_len = int(max_seq_len or min(target.args.max_seq_len, draft.args.max_seq_len))
        if self.max_seq_len > draft.args.max_seq_len:
            raise HerdError(f"max_seq_len {self.max_seq_len} is longer than the draft model's context "
                            f"({draft.args.max_seq_len}); lower --max-seq-len.")
        w = target.tok_embeddings.weight
        self.device = w.device
        # k extra slots: a round writes up to k draft tokens past the last one kept
        slots = self.max_seq_len + k + 1
        self.t_cache = KVCache(target.args, 1, slots, device=self.device, dtype=w.dtype)
        self.d_cache = KVCache(draft.args, 1, slots, device=self.device, dtype=draft.tok_embeddings.weight.dtype)
        self._causal = torch.ones(slots, slots, dtype=torch.bool, device=self.device).tril()
        self._slots = torch.arange(slots, device=self.device)
        self.stats = SpeculativeStats()

    # -- public API (as Engine's) -----------------------------------------------------------------

    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise HerdError if this request can never run (empty, bad ids, longer than the context)."""
        if len(prompt) == 0:
            raise HerdError("the prompt is empty; give at least one token (e.g. the begin_of_text id).")
        n = len(prompt) + params.max_new_tokens
        if n > self.max_seq_len:
            raise HerdError(f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) "
                            f"is {n} tokens, more than the context of {self.max_seq_len}; shorten the prompt "
                            "or lower max_new_tokens.")
        if min(prompt) < 0 or max(prompt) >= self.args.vocab_size:
            bad = min(prompt) if min(prompt) < 0 else max(prompt)
            raise HerdError(f"token id {bad} is outside the model's vocabulary (0..{self.args.vocab_size - 1}); "
                            "use the tokenizer the model was trained with.")

    def stream(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[list[TokenEvent]]:
        """Generate for each prompt in turn; yield the tokens of each round as TokenEvents."""
        prompts = [list(map(int, p)) for p in prompts]
        plist = _params_list(params, len(prompts))
        for prompt, p in zip(prompts, plist):
            self.check_request(prompt, p)
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            yield from self._run(i, prompt, p)

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationResult]:
        """One GenerationResult per prompt, in order."""
        plist = _params_list(params, len(prompts))
        out: list[GenerationResult] = []
        tokens: list[int] = []
        logprobs: list[float] = []
        for events in self.stream(prompts, plist):
            for e in events:
                if e.finish_reason != "stop":
                    tokens.append(e.token)
                    if e.logprob is not None:
                        logprobs.append(e.logprob)
                if e.finish_reason is not None:
                    out.append(GenerationResult(tokens=tokens, logprobs=logprobs if plist[e.index].logprobs else None,
                                                finish_reason=e.finish_reason,
                                                stop_token=e.token if e.finish_reason == "stop" else None,
                                                prompt_tokens=len(prompts[e.index])))
                    tokens, logprobs = [], []
        return out

    # -- one request -----------------------------------------------------------------------------

    def _forward(self, model: Transformer, cache: KVCache, tokens: list[int], start: int) -> Tensor:
        """Logits [S, V] of `tokens` placed at positions start..start+S-1, reading slots 0..start+S-1."""
        n = len(tokens)
        x = torch.tensor([tokens], device=self.device)
        pos = self._slots[start:start + n]
        mask = self._causal[start:start + n, :start + n].view(1, 1, n, start + n)
        return model(x, positions=pos, mask=mask, cache=cache, cache_pos=pos)[0].float()

    def _fit_vocab(self, logits: Tensor) -> Tensor:
        """Draft logits [V_draft] -> [V_target]: rows the draft lacks get probability 0."""
        v = self.args.vocab_size
        if logits.shape[-1] >= v:
            return logits[:v]
        return torch.cat([logits, logits.new_full((v - logits.shape[-1],), float("-inf"))])

    def _run(self, index: int, prompt: list[int], params: SamplingParams) -> Iterator[list[TokenEvent]]:
        gen = params.make_generator(self.device)
        greedy = params.greedy
        stops = set(params.stop_tokens)
        seq = list(prompt)
        produced = 0
        with torch.inference_mode():
            # Invariant at the top of each round: the target cache holds seq[:-1], the draft cache seq[:d_len].
            self._forward(self.target, self.t_cache, seq[:-1], 0) if len(seq) > 1 else None
            d_len = 0
            while True:
                k = min(self.k, params.max_new_tokens - produced)  # never propose past the budget
                draft, q_rows = [], []
                feed, start = seq[d_len:], d_len
                for i in range(k):
                    logits = self._fit_vocab(self._forward(self.draft, self.d_cache, feed, start)[-1])  # [V]
                    start += len(feed)
                    if greedy:
                        tok = int(logits.argmax())
                    else:
                        q = filtered_probs(logits, params)
                        q_rows.append(q)
                        tok = draw(q, gen)
                    draft.append(tok)
                    feed = [tok]
                t_logits = self._forward(self.target, self.t_cache, [seq[-1]] + draft, len(seq) - 1)  # [k + 1, V]
                check_logits(t_logits)
                p = t_logits if greedy else torch.stack([filtered_probs(row, params) for row in t_logits])
                a, extra = verify(p, torch.stack(q_rows) if q_rows else p[:0], draft, greedy, gen)
                new = draft[:a] + [extra]
                self.stats.rounds += 1
                self.stats.proposed += k
                self.stats.accepted += a
                self.stats.emitted += len(new)
                lp = torch.log_softmax(t_logits[:a + 1], dim=-1) if params.logprobs else None  # unmodified p
                events = []
                for j, tok in enumerate(new):
                    produced += 1
                    reason = "stop" if tok in stops else ("length" if produced >= params.max_new_tokens else None)
                    events.append(TokenEvent(index, tok, float(lp[j, tok]) if lp is not None else None, reason))
                    if reason is not None:
                        break
                yield events
                if events[-1].finish_reason is not None:
                    return
                # The draft cache is valid through seq + d_1..d_{min(a, k-1)} (d_k was never fed to it).
                d_len = len(seq) + min(a, k - 1)
                seq.extend(new)
