"""Continuous batching: which requests run in the next engine step, and how many of their tokens.

A request (Sequence) waits in a queue until the running batch has room (at most max_batch_size
rows) and the KV pool has blocks for its prompt; its prompt's cached prefix blocks are taken from
the prefix cache, so only the rest is computed. Every step then:

- decodes: every running request with exactly one token not yet in the cache (the last sampled
  token, or a prompt whose all but last token were cached) goes into one [B, 1] forward;
- prefills: running requests with more uncached tokens get chunks, oldest first, within a budget
  of `prefill_chunk` tokens per step (chunked prefill, as in Sarathi-Serve and vLLM), so a long
  prompt is spread over several steps and never stalls everyone else's decoding for long.

A fork group (Engine.add_forked_request: K samples of one prompt) is admitted as one request that
reserves a row for each fork; when its prompt is computed, its forks start from that one prefill:
they share the prompt's full blocks (reference counts), each gets a copy of the partial last block,
and all sample their first token from the same last-position logits (their own seeds).

A request that finishes (or is aborted: a client that went away) gives its blocks back at once.
When a decoding request needs a new block and none is free, the most recently admitted request is
preempted: its blocks are released (their published prefix stays cached) and it goes back to the
front of the queue, to be recomputed (mostly from the prefix cache) when room returns (nano-vllm's
policy). Requests are admitted first come, first served.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from herd.inference.kv_pool import BlockManager
from herd.inference.sampling import SamplingParams, TokenConstraint


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: its tokens, where their keys/values live, how far it got."""

    id: int
    prompt: list[int]
    params: SamplingParams
    constraint: TokenConstraint | None = None
    tokens: list[int] = field(default_factory=list)  # prompt + generated (without a final stop token)
    blocks: list[int] = field(default_factory=list)  # block table
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of the published full blocks
    num_computed: int = 0  # tokens whose keys/values are in the cache
    num_cached: int = 0  # prompt tokens taken from the prefix cache at (first) admission
    generator: torch.Generator | None = None
    prompt_logprobs: list[Any] | None = None  # filled by the engine when params.prompt_logprobs
    prompt_logprobs_partial: list[Any] = field(default_factory=list)  # ... chunk by chunk until complete
    admitted: bool = False  # admitted at least once (prefix-cache statistics count only the first time)
    preemptions: int = 0
    forks: list["Sequence"] = field(default_factory=list)  # requests waiting to start from this one's prefill
    parent: "Sequence | None" = None  # the request whose prefill this fork waits for

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def pending(self) -> int:
        """Tokens not yet in the KV cache."""
        return len(self.tokens) - self.num_computed

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs and self.prompt_logprobs is None


class Scheduler:
    """The waiting queue, the running batch and the block manager; decides each step's work."""

    def __init__(self, blocks: BlockManager, max_batch_size: int, prefill_chunk: int, prefix_cache: bool = True):
        self.blocks = blocks
        self.max_batch_size, self.prefill_chunk, self.prefix_cache = max_batch_size, prefill_chunk, prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prompt_tokens_computed = 0  # prompt tokens run through the model (prefill work; not cache hits)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.blocks.block_size)

    # -- admission -----------------------------------------------------------------------------

    def _admit(self) -> None:
        bs = self.blocks.block_size
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            hits: list[int] = []
            if self.prefix_cache and not seq.wants_prompt_logprobs:
                # Never the block holding the last token: its logits must be computed.
                hits = self.blocks.match_prefix(seq.tokens, (len(seq.tokens) - 1) // bs)
            need = self.blocks_for(len(seq.tokens)) - len(hits)
            if seq.forks and self.running:
                # a fork group waits for a row per fork and a block per copy of its partial last block; with
                # nothing running it starts on its own blocks (forks that then find none queue by themselves)
                if len(self.running) + 1 + len(seq.forks) > self.max_batch_size:
                    break
                need += len(seq.forks) if len(seq.prompt) % bs else 0
            reclaimed = sum(1 for b in hits if self.blocks.ref[b] == 0)  # cached blocks now free
            if need + reclaimed > self.blocks.num_free():
                break  # first come, first served: wait for room rather than let a later one jump ahead
            self.waiting.popleft()
            self.blocks.acquire(hits)
            seq.blocks = hits + self.blocks.allocate(need)
            seq.hashes = []
            prev = None
            for j in range(len(hits)):
                prev = self.blocks.chain_hash(prev, seq.tokens[j * bs:(j + 1) * bs])
                seq.hashes.append(prev)
            seq.num_computed = len(hits) * bs
            if not seq.admitted:
                seq.num_cached = seq.num_computed
                self.blocks.queries += len(seq.tokens)
                self.blocks.hits += seq.num_computed
                seq.admitted = True
            self.running.append(seq)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """(rows to decode, (row, tokens) chunks to prefill) for the next step."""
        self._admit()
        decode: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running or seq.pending != 1 or seq.wants_prompt_logprobs:
                continue
            if not self._reserve_slot(seq):
                continue  # it was preempted itself
            decode.append(seq)
        decode = [s for s in decode if s in self.running]  # a later reservation may have preempted it
        prefill: list[tuple[Sequence, int]] = []
        budget = self.prefill_chunk
        for seq in self.running:
            if budget <= 0:
                break
            if seq.pending > 1 or (seq.pending >= 1 and seq.wants_prompt_logprobs):
                n = min(seq.pending, budget)
                prefill.append((seq, n))
                budget -= n
        return decode, prefill

    def _reserve_slot(self, seq: Sequence) -> bool:
        """Make sure position num_computed of `seq` has a block, preempting the newest requests if needed."""
        if seq.num_computed // self.blocks.block_size < len(seq.blocks):
            return True
        while self.blocks.num_free() == 0:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        seq.blocks += self.blocks.allocate(1)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Give back a running request's blocks and requeue it first, to be recomputed later."""
        self.running.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks, seq.hashes, seq.num_computed = [], [], 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def computed(self, seq: Sequence, n: int) -> None:
        """`n` more tokens of `seq` are in the cache: publish every block that became full."""
        self.prompt_tokens_computed += max(0, min(n, len(seq.prompt) - seq.num_computed))
        seq.num_computed += n
        bs = self.blocks.block_size
        for j in range(len(seq.hashes), seq.num_computed // bs):
            prev = seq.hashes[-1] if seq.hashes else None
            seq.hashes.append(self.blocks.publish(seq.blocks[j], prev, seq.tokens[j * bs:(j + 1) * bs]))

    def fork(self, parent: Sequence) -> tuple[list[Sequence], list[tuple[int, int]]]:
        """Start `parent`'s forks on its just-computed prompt; returns (the forks now running, (source,
        destination) blocks whose keys/values the engine must copy: the partial last block).

        A fork that finds no free block for its copy queues as a request of its own instead (the prefix
        cache still serves the prompt's full blocks); it samples the same tokens, only not for free.
        """
        bs, n = self.blocks.block_size, len(parent.prompt)
        full, partial = n // bs, n % bs != 0
        started: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        for child in parent.forks:
            child.parent = None
            if partial and self.blocks.num_free() < 1:
                self.waiting.appendleft(child)
                continue
            self.blocks.acquire(parent.blocks[:full])
            child.blocks = parent.blocks[:full]
            if partial:
                child.blocks = child.blocks + self.blocks.allocate(1)
                copies.append((parent.blocks[full], child.blocks[-1]))
            child.hashes = list(parent.hashes[:full])
            child.num_computed = child.num_cached = n
            child.admitted = True
            self.blocks.queries += n
            self.blocks.hits += n
            self.running.append(child)
            started.append(child)
        parent.forks = []
        return started, copies

    def finish(self, seq: Sequence) -> None:
        """Remove a request (finished or aborted) and give its blocks back."""
        if seq.parent is not None and seq in seq.parent.forks:  # a fork that never started
            seq.parent.forks.remove(seq)
            seq.parent = None
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.release(seq.blocks)
            seq.blocks = []
        elif seq in self.waiting:
            self.waiting.remove(seq)
