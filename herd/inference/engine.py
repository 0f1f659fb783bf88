"""The generation engine: continuous batching over a paged KV cache with prefix caching and chunked
prefill; sampling, stop tokens, log-probs, streaming.

It speaks token ids only (tokenizing and chat formatting live in herd.inference.cli and the server).

Two ways to drive it:

- generate(prompts, params) / stream(prompts, params): run a list of requests to the end (what
  `herd generate`, `herd chat`, training samples and tests use);
- add_request() / step() / abort(): the server's loop, where requests arrive and leave at any
  step (herd.inference.server.worker runs it on its own thread).

Each step runs at most two forwards: one [B, 1] decode forward for every running request with one
new token, and one prefill forward over chunks of prompts (left-padded rows, so the last column
is each row's last token; padding writes to the pool's scratch block and is masked). Every row
has its own RoPE positions and reads its own slots through herd.inference.kv_pool.PagedStep, so a
request gives the same tokens whatever else shares its batch (the tests check this against
transformers and against full forwards). The scheduler (herd.inference.scheduler) decides the
rows; the pool (herd.inference.kv_pool) holds the keys and values and the prefix cache.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from herd.errors import HerdError
from herd.inference.kv_pool import SCRATCH_BLOCK, BlockManager, KVPool, PagedStep
from herd.inference.sampling import (SamplingParams, TokenConstraint, apply_penalties, check_logits,
                                     constrained_token, next_tokens, token_logprobs, top_logprobs)
from herd.inference.scheduler import Scheduler, Sequence
from herd.model import Transformer


@dataclass
class TokenEvent:
    """One generated token of one request, as streamed."""

    index: int
    """The request: its position in the list given to stream()/generate(), or add_request()'s id."""
    token: int
    """The token id (a stop token is streamed too, with finish_reason "stop")."""
    logprob: float | None
    """log p(token) under the unmodified distribution, if the request asked for log-probs."""
    finish_reason: str | None
    """None while the request goes on; "stop" (stop token) or "length" (max_new_tokens) on its last token."""
    top_logprobs: list[tuple[int, float]] | None = None
    """The params.top_logprobs most likely (id, log-prob) at this step, if asked for."""
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    """On a request's first event when params.prompt_logprobs: per prompt token (log p, top alternatives);
    None for the first token (nothing predicts it)."""
    cached_tokens: int = 0
    """On the first event: prompt tokens whose keys/values came from the prefix cache."""
    watched: list[float] | None = None
    """log p of each of the request's params.watch_tokens at this step (unmodified distribution), if it set any."""


@dataclass
class GenerationResult:
    """The whole output of one request."""

    tokens: list[int]
    """Generated ids, without the stop token."""
    logprobs: list[float] | None
    """log p of each generated token (same length as tokens), or None if not requested."""
    finish_reason: str
    """"stop" or "length"."""
    stop_token: int | None
    """The stop token that ended the request, if any."""
    prompt_tokens: int
    """Length of the prompt."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""


def compiler_available() -> bool:
    """Whether torch.compile can build CPU kernels here (inductor needs a C++ compiler)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


class Engine:
    """Generate from a herd Transformer with continuous batching over a paged, prefix-cached KV cache.

    model: a Transformer in eval mode (its device and dtype are used).
    max_batch_size: most requests decoding at once; more wait in a queue.
    max_seq_len: longest request (prompt + generated tokens); default the model's max_seq_len.
    block_size: tokens per KV block (the unit of allocation and of prefix sharing).
    cache_tokens: size of the KV pool in tokens; default max_batch_size * max_seq_len (never preempts).
        Smaller pools hold more requests than they could all grow to and preempt when they run out.
    prefill_chunk: most prompt tokens computed per step (chunked prefill).
    prefix_cache: reuse the KV blocks of earlier requests that share a prefix.
    compile: torch.compile the decode step (dynamic shapes; on CPU max-autotune with weight freezing,
        so edit the weights only before building the Engine). Without a C++ compiler it warns and
        runs uncompiled.
    """

    def __init__(self, model: Transformer, max_batch_size: int = 8, max_seq_len: int | None = None,
                 compile: bool = False, compile_mode: str | None = None, block_size: int = 16,
                 cache_tokens: int | None = None, prefill_chunk: int = 512, prefix_cache: bool = True):
        if max_batch_size < 1:
            raise HerdError(f"max_batch_size must be a positive integer, got {max_batch_size}.")
        if block_size < 1 or prefill_chunk < 1:
            raise HerdError(f"block_size and prefill_chunk must be positive, got {block_size} and {prefill_chunk}.")
        self.model = model.eval()
        self.args = model.args
        self.max_seq_len = int(max_seq_len or self.args.max_seq_len)
        if self.max_seq_len < 2:
            raise HerdError(f"max_seq_len must be at least 2, got {self.max_seq_len}.")
        self.max_batch_size = max_batch_size
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.block_size = block_size
        per_seq = -(-self.max_seq_len // block_size)
        num_blocks = 1 + (-(-cache_tokens // block_size) if cache_tokens else max_batch_size * per_seq)
        if num_blocks - 1 < per_seq:
            raise HerdError(f"a KV cache of {cache_tokens} tokens cannot hold one request of max_seq_len "
                            f"{self.max_seq_len}; raise cache_tokens or lower max_seq_len.")
        self.pool = KVPool(self.args, num_blocks, block_size, device=self.device, dtype=self.dtype)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_batch_size, prefill_chunk, prefix_cache)
        self._positions = torch.arange(per_seq * block_size, device=self.device)  # a whole number of blocks
        # Ids at and above this are never sampled nor reported (a model whose embedding has more rows
        # than its tokenizer has tokens: the server sets it to the tokenizer's size).
        self.vocab_limit = self.args.vocab_size
        self._next_id = 0
        self._seqs: dict[int, Sequence] = {}
        self.compiled = False
        self._decode: Callable[..., Tensor] = self._decode_step
        if compile:
            self._setup_compile(compile_mode)

    # -- compilation ---------------------------------------------------------------------------

    def _setup_compile(self, mode: str | None) -> None:
        if self.device.type == "cpu" and not compiler_available():
            print("herd: warning: torch.compile needs a C++ compiler (g++) on CPU and none was found; "
                  "running the decode step uncompiled.", file=sys.stderr)
            return
        if mode is None and self.device.type == "cpu":
            # Freezing makes the weights constants that inductor prepacks for its own GEMV kernels,
            # which read them near the memory bandwidth (mkl's linear reaches about half of it here).
            # Set globally (as TORCHINDUCTOR_FREEZING=1 does): passed through options= it was not applied.
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            mode = "max-autotune-no-cudagraphs"
        # Batch size and context length change every step: one graph with dynamic shapes.
        self._decode = torch.compile(self._decode_step, mode=mode or "max-autotune-no-cudagraphs",
                                     fullgraph=True, dynamic=True)
        self.compiled = True

    def _run_decode(self, *args) -> Tensor:
        """The decode step, falling back to eager (once, with a message) if compilation fails."""
        if not self.compiled:
            return self._decode_step(*args)
        try:
            return self._decode(*args)
        except Exception as e:  # inductor failures surface as many exception types
            print(f"herd: warning: torch.compile of the decode step failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); running uncompiled.", file=sys.stderr)
            self.compiled, self._decode = False, self._decode_step
            return self._decode_step(*args)  # the cache writes of this step are idempotent

    def _decode_step(self, tokens: Tensor, positions: Tensor, mask: Tensor, write: Tensor, table: Tensor) -> Tensor:
        """One token per row: tokens/positions [B, 1], mask [B, 1, 1, T], slots write [B], blocks table [B, nb] -> [B, V]."""
        step = PagedStep(self.pool, write, table, reuse_buffers=not self.compiled)
        return self.model(tokens, positions=positions, mask=mask, cache=step)[:, -1]

    # -- requests ------------------------------------------------------------------------------

    def check_request(self, prompt: Seq[int], params: SamplingParams) -> None:
        """Raise HerdError if this request can never run (empty, bad ids, longer than the context)."""
        if len(prompt) == 0:
            raise HerdError("the prompt is empty; give at least one token (e.g. the begin_of_text id).")
        n = len(prompt) + params.max_new_tokens
        if n > self.max_seq_len:
            raise HerdError(f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) "
                            f"is {n} tokens, more than the context of {self.max_seq_len}; shorten the prompt "
                            "or lower max_new_tokens.")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= self.args.vocab_size:
            bad = lo if lo < 0 else hi
            raise HerdError(f"token id {bad} is outside the model's vocabulary (0..{self.args.vocab_size - 1}); "
                            "use the tokenizer the model was trained with.")
        bad_watch = [t for t in params.watch_tokens if not 0 <= t < self.vocab_limit]
        if bad_watch:
            raise HerdError(f"watch_tokens {bad_watch} are outside the vocabulary (0..{self.vocab_limit - 1}).")

    def add_request(self, prompt: Seq[int], params: SamplingParams,
                    constraint: TokenConstraint | None = None) -> int:
        """Queue a request; returns its id (the `index` of its TokenEvents). Raises HerdError if it can never run."""
        prompt = [int(t) for t in prompt]
        self.check_request(prompt, params)
        rid = self._next_id
        self._next_id += 1
        seq = Sequence(rid, prompt, params, constraint=constraint, generator=params.make_generator(self.device))
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def add_forked_request(self, prompt: Seq[int], params: Seq[SamplingParams]) -> list[int]:
        """Queue len(params) requests on one prompt whose prefill is computed once (best-of-K sampling);
        returns their ids. Each request samples with its own params (seed) exactly as a request of its
        own would; the first is the one whose prefill the others start from (aborting it before its
        prompt is computed aborts the whole group)."""
        prompt = [int(t) for t in prompt]
        plist = list(params)
        if not plist:
            raise HerdError("add_forked_request needs at least one SamplingParams.")
        for p in plist:
            self.check_request(prompt, p)
            if p.prompt_logprobs:
                raise HerdError("prompt_logprobs cannot be asked of forked requests; add them as separate requests.")
        seqs = []
        for p in plist:
            seqs.append(Sequence(self._next_id, prompt, p, generator=p.make_generator(self.device)))
            self._seqs[self._next_id] = seqs[-1]
            self._next_id += 1
        parent = seqs[0]
        parent.forks = seqs[1:]
        for child in parent.forks:
            child.parent = parent
        self.scheduler.add(parent)
        return [s.id for s in seqs]

    def abort(self, request_id: int) -> bool:
        """Drop a request now (a client went away) and give its KV blocks back. False if it had already ended."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        for child in seq.forks:  # a fork group whose prompt was never computed goes as a whole
            self._seqs.pop(child.id, None)
            child.parent = None
        seq.forks = []
        self.scheduler.finish(seq)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> dict[str, float]:
        """Running/waiting requests, KV-pool use and prefix-cache counters (for /metrics)."""
        b = self.blocks
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_total": b.usable, "kv_blocks_used": b.usable - b.num_free(),
                "kv_cache_usage": b.used_fraction(), "prefix_cache_queries": b.queries,
                "prefix_cache_hits": b.hits, "preemptions": self.scheduler.preemptions,
                "prompt_tokens_computed": self.scheduler.prompt_tokens_computed}

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Run one scheduling step; return the new token of every request that produced one."""
        decode, prefill = self.scheduler.schedule()
        produced: list[tuple[Sequence, Tensor]] = []
        with torch.inference_mode():
            if decode:
                logits = self._forward([(s, 1) for s in decode], decode_only=True)
                for s, row in zip(decode, logits):
                    self.scheduler.computed(s, 1)
                    produced += self._with_forks(s, row)
            if prefill:
                logits = self._forward(prefill, decode_only=False)
                for (s, n), row in zip(prefill, logits):
                    self.scheduler.computed(s, n)
                    if s.pending == 0:  # its whole prompt is in: the last logits give the next token
                        produced += self._with_forks(s, row)
            if not produced:
                return []
            produced.sort(key=lambda x: x[0].id)
            return self._sample([s for s, _ in produced], torch.stack([r for _, r in produced]))

    def _with_forks(self, seq: Sequence, row: Tensor) -> list[tuple[Sequence, Tensor]]:
        """`seq` with its logits row, plus its forks (if it just computed their shared prompt) on the same row."""
        if not seq.forks:
            return [(seq, row)]
        children, copies = self.scheduler.fork(seq)
        for src, dst in copies:
            self.pool.copy_block(src, dst)
        return [(seq, row)] + [(c, row) for c in children]

    def _forward(self, rows: list[tuple[Sequence, int]], decode_only: bool) -> Tensor:
        """Feed rows' next n tokens (left-padded to the longest); returns each row's last logits [B, V]."""
        dev, bs = self.device, self.block_size
        width = max(n for _, n in rows)  # S
        span = max(s.num_computed + n for s, n in rows)  # T: positions the longest row holds after this step
        n_blocks = -(-span // bs)
        tokens = torch.tensor([[0] * (width - n) + s.tokens[s.num_computed:s.num_computed + n] for s, n in rows],
                              device=dev)  # [B, S]
        table = torch.tensor([s.blocks[:n_blocks] + [SCRATCH_BLOCK] * (n_blocks - len(s.blocks[:n_blocks]))
                              for s, _ in rows], device=dev)  # [B, blocks]
        starts = torch.tensor([s.num_computed for s, _ in rows], device=dev)
        pads = torch.tensor([width - n for _, n in rows], device=dev)
        cols = self._positions[:width].unsqueeze(0)  # [1, S]
        real = cols >= pads.unsqueeze(1)  # [B, S] False on left padding
        positions = torch.where(real, starts.unsqueeze(1) + cols - pads.unsqueeze(1), 0)  # padding: position 0
        write = table.gather(1, positions // bs) * bs + positions % bs  # [B, S] the slot of every new token
        write = torch.where(real, write, SCRATCH_BLOCK * bs)
        # Attention reads whole blocks: position t of a row is column t of the gathered blocks. A query at
        # position p reads columns 0..p; a padding query (position 0) reads column 0 only.
        t = self._positions[:n_blocks * bs]
        mask = (t.view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1)  # [B, 1, S, nb * bs]
        if decode_only:
            return self._run_decode(tokens, positions, mask, write.view(-1), table)
        step = PagedStep(self.pool, write.view(-1), table, reuse_buffers=True)
        if not any(s.wants_prompt_logprobs for s, _ in rows):
            return self.model(tokens, positions=positions, mask=mask, cache=step, last_only=True)[:, -1]
        h = self.model.features(tokens, positions=positions, mask=mask, cache=step)  # [B, S, dim]
        for i, (s, n) in enumerate(rows):
            if s.wants_prompt_logprobs:
                self._prompt_logprobs(s, self.model.logits(h[i, width - n:])[:, :self.vocab_limit], n)
        return self.model.logits(h[:, -1])

    def _prompt_logprobs(self, seq: Sequence, logits: Tensor, n: int) -> None:
        """Record log p(token) of the prompt tokens this chunk's logits [n, V] predict."""
        start = seq.num_computed
        if start == 0:
            seq.prompt_logprobs_partial = [None]
        k = max(seq.params.top_logprobs, 1)
        targets = seq.tokens[start + 1:start + n + 1]  # the last logits of the prompt predict a new token
        if targets:
            m = len(targets)
            lp = token_logprobs(logits[:m], torch.tensor(targets, device=logits.device)).tolist()
            ids, vals = top_logprobs(logits[:m], k)
            for j in range(m):
                seq.prompt_logprobs_partial.append((lp[j], list(zip(ids[j].tolist(), vals[j].tolist()))))
        if start + n >= len(seq.prompt):
            seq.prompt_logprobs = seq.prompt_logprobs_partial

    def _sample(self, seqs: list[Sequence], logits: Tensor) -> list[TokenEvent]:
        """Choose each row's next token, append it, finish the requests that are done."""
        logits = logits[:, :self.vocab_limit]
        check_logits(logits)
        plist = [s.params for s in seqs]
        adjusted = logits
        if any(p.penalized for p in plist):
            adjusted = torch.stack([apply_penalties(row, s.output, s.params) for row, s in zip(logits, seqs)])
        new = next_tokens(adjusted, plist, [s.generator for s in seqs]).tolist()
        for i, s in enumerate(seqs):
            if s.constraint is not None:
                new[i] = constrained_token(adjusted[i], s.params, s.generator, s.constraint)
                s.constraint.advance(new[i])
        lp = top = watched = None
        if any(p.watch_tokens for p in plist):
            watched = torch.log_softmax(logits.float(), dim=-1)  # [B, V]; only the watched columns are read
        if any(p.logprobs for p in plist):
            lp = token_logprobs(logits, torch.tensor(new, device=logits.device)).tolist()
            k = max(p.top_logprobs for p in plist)
            if k:
                ids, vals = top_logprobs(logits, k)
                top = [list(zip(a, b)) for a, b in zip(ids.tolist(), vals.tolist())]
        events = []
        for i, s in enumerate(seqs):
            tok, p = new[i], s.params
            first = len(s.output) == 0
            reason = "stop" if tok in p.stop_tokens else None
            if reason is None:
                s.tokens.append(tok)
                if len(s.output) >= p.max_new_tokens:
                    reason = "length"
            events.append(TokenEvent(
                s.id, tok, lp[i] if lp is not None and p.logprobs else None, reason,
                top_logprobs=top[i][:p.top_logprobs] if top is not None and p.logprobs and p.top_logprobs else None,
                prompt_logprobs=s.prompt_logprobs if first and p.prompt_logprobs else None,
                cached_tokens=s.num_cached if first else 0,
                watched=watched[i, p.watch_tokens].tolist() if watched is not None and p.watch_tokens else None))
            if reason is not None:
                self._seqs.pop(s.id, None)
                self.scheduler.finish(s)
        return events

    # -- whole lists of requests ---------------------------------------------------------------

    def stream(self, prompts: Seq[Seq[int]],
               params: SamplingParams | Seq[SamplingParams] | None = None) -> Iterator[list[TokenEvent]]:
        """Generate for every prompt; yield, after each step, the new token of each request that made one.

        It drives the engine itself, so it cannot share it with a running server loop."""
        if self.has_work():
            raise HerdError("this Engine is already serving requests; use add_request()/step() alongside them.")
        prompts = [list(map(int, p)) for p in prompts]
        plist = _params_list(params, len(prompts))
        for prompt, p in zip(prompts, plist):
            self.check_request(prompt, p)
        where = {self.add_request(prompt, p): i for i, (prompt, p) in enumerate(zip(prompts, plist))}
        try:
            while self.has_work():
                events = self.step()
                for e in events:
                    e.index = where[e.index]
                if events:
                    yield events
        finally:  # a consumer that stops early must not leave requests holding the cache
            for rid in where:
                self.abort(rid)

    def generate(self, prompts: Seq[Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[GenerationResult]:
        """Generate for every prompt; one GenerationResult per prompt, in order."""
        plist = _params_list(params, len(prompts))
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        cached = [0] * len(prompts)
        results: list[GenerationResult | None] = [None] * len(prompts)
        for events in self.stream(prompts, plist):
            for e in events:
                cached[e.index] += e.cached_tokens
                if e.finish_reason != "stop":
                    tokens[e.index].append(e.token)
                    if e.logprob is not None:
                        logprobs[e.index].append(e.logprob)
                if e.finish_reason is not None:
                    results[e.index] = GenerationResult(
                        tokens=tokens[e.index], logprobs=logprobs[e.index] if plist[e.index].logprobs else None,
                        finish_reason=e.finish_reason, stop_token=e.token if e.finish_reason == "stop" else None,
                        prompt_tokens=len(prompts[e.index]), cached_tokens=cached[e.index])
        return results  # type: ignore[return-value]


def _params_list(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * n
    plist = list(params)
    if len(plist) != n:
        raise HerdError(f"got {len(plist)} SamplingParams for {n} prompts; pass one, or one per prompt.")
    return plist
