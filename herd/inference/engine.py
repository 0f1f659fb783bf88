"""The generation engine: static KV cache, batched prefill and decode, stop tokens, log-probs, streaming.

It speaks token ids only (tokenizing and chat formatting live in herd.inference.cli).

Batches of prompts of different lengths are left-padded into one block of P columns. The cache
slot of a token is its column; its RoPE position is the column minus that row's padding; the
mask hides the padding slots of each row. So every row decodes in lock step (one forward per
step for the whole batch) and gives the same tokens as that prompt alone.

Per decode step the engine does no allocation beyond the model's own: the mask is one
preallocated [B, 1, 1, max_len] buffer that gains a True column per step (eager mode passes the
filled prefix, so attention reads only the filled part of the cache; compiled mode passes the
whole buffer so shapes stay static), positions are one add, and the new tokens cross to Python
once per step (for stop checks and streaming).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from herd.errors import HerdError
from herd.inference.sampling import SamplingParams, next_tokens, token_logprobs
from herd.model import KVCache, Transformer


@dataclass
class TokenEvent:
    """One generated token of one request, as streamed."""

    index: int
    """Position of the request in the list given to stream()/generate()."""
    token: int
    """The token id (a stop token is streamed too, with finish_reason "stop")."""
    logprob: float | None
    """log p(token) under the unmodified distribution, if the request asked for log-probs."""
    finish_reason: str | None
    """None while the request goes on; "stop" (stop token) or "length" (max_new_tokens) on its last token."""


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


class _CacheView:
    """The first `b` rows of a KVCache (views, no copy): what the model reads as `cache.k[i]`."""

    def __init__(self, cache: KVCache, b: int):
        self.k = [t[:b] for t in cache.k]
        self.v = [t[:b] for t in cache.v]
        self.batch_size, self.max_len = b, cache.max_len


def compiler_available() -> bool:
    """Whether torch.compile can build CPU kernels here (inductor needs a C++ compiler)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


class Engine:
    """Generate from a herd Transformer with a static KV cache.

    model: a Transformer in eval mode (its device and dtype are used).
    max_batch_size: rows of the KV cache; more prompts than this run in several batches.
    max_seq_len: slots of the KV cache (prompt + generated tokens); default the model's max_seq_len.
    compile: torch.compile the decode step; compile_mode defaults to "reduce-overhead" (CUDA graphs)
        on GPU and to max-autotune without CUDA graphs plus weight freezing on CPU (the weights are
        then baked in: edit them and build a new Engine). Without a C++ compiler on CPU it warns and
        runs uncompiled.
    """

    def __init__(self, model: Transformer, max_batch_size: int = 8, max_seq_len: int | None = None,
                 compile: bool = False, compile_mode: str | None = None):
        if max_batch_size < 1:
            raise HerdError(f"max_batch_size must be a positive integer, got {max_batch_size}.")
        self.model = model.eval()
        self.args = model.args
        self.max_seq_len = int(max_seq_len or self.args.max_seq_len)
        if self.max_seq_len < 2:
            raise HerdError(f"max_seq_len must be at least 2, got {self.max_seq_len}.")
        self.max_batch_size = max_batch_size
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.cache = KVCache(self.args, max_batch_size, self.max_seq_len, device=self.device, dtype=self.dtype)
        self._views: dict[int, _CacheView] = {}
        self._slots = torch.arange(self.max_seq_len, device=self.device)  # cache_pos for any step is a slice
        self._causal = torch.ones(self.max_seq_len, self.max_seq_len, dtype=torch.bool,
                                  device=self.device).tril()  # prefill masks are slices of this
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
            # max-autotune-no-cudagraphs plus freezing: the weights become constants that inductor
            # prepacks for its own GEMV kernels, which read them near the memory bandwidth (mkl's
            # linear reaches about half of it here). So later in-place edits of the weights are not seen.
            # Set globally (as TORCHINDUCTOR_FREEZING=1 does): passed through options= it was not applied.
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            self._decode = torch.compile(self._decode_step, mode="max-autotune-no-cudagraphs", fullgraph=True,
                                         dynamic=False)
        else:
            mode = mode or "reduce-overhead"
            self._decode = torch.compile(self._decode_step, mode=mode, fullgraph=True, dynamic=False)
        self.compiled = True

    def _run_decode(self, *args: Tensor) -> Tensor:
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

    def _decode_step(self, tokens: Tensor, positions: Tensor, cache_pos: Tensor, mask: Tensor,
                     cache: _CacheView) -> Tensor:
        """One token per row: tokens [B, 1], positions [B, 1], cache_pos [1], mask [B, 1, 1, T] -> logits [B, V]."""
        return self.model(tokens, positions=positions, mask=mask, cache=cache, cache_pos=cache_pos)[:, -1]

    def _view(self, b: int) -> _CacheView:
        if b not in self._views:
            self._views[b] = _CacheView(self.cache, b)
        return self._views[b]

    # -- public API ----------------------------------------------------------------------------

    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> None:
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

    def stream(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[list[TokenEvent]]:
        """Generate for every prompt; yield, after each step, the new token of each request still running."""
        prompts = [list(map(int, p)) for p in prompts]
        plist = _params_list(params, len(prompts))
        for prompt, p in zip(prompts, plist):
            self.check_request(prompt, p)
        for group in self._batches(prompts, plist):
            yield from self._run_batch([prompts[i] for i in group], [plist[i] for i in group], group)

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationResult]:
        """Generate for every prompt; one GenerationResult per prompt, in order."""
        plist = _params_list(params, len(prompts))
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        results: list[GenerationResult | None] = [None] * len(prompts)
        for events in self.stream(prompts, plist):
            for e in events:
                if e.finish_reason != "stop":
                    tokens[e.index].append(e.token)
                    if e.logprob is not None:
                        logprobs[e.index].append(e.logprob)
                if e.finish_reason is not None:
                    results[e.index] = GenerationResult(
                        tokens=tokens[e.index], logprobs=logprobs[e.index] if plist[e.index].logprobs else None,
                        finish_reason=e.finish_reason, stop_token=e.token if e.finish_reason == "stop" else None,
                        prompt_tokens=len(prompts[e.index]))
        return results  # type: ignore[return-value]

    # -- batching ------------------------------------------------------------------------------

    def _batches(self, prompts: list[list[int]], plist: list[SamplingParams]) -> list[list[int]]:
        """Split request indices into batches that fit the cache: at most max_batch_size rows, and the
        longest prompt plus the largest max_new_tokens within max_seq_len (left padding shares columns)."""
        out: list[list[int]] = []
        pending = list(range(len(prompts)))
        while pending:
            group = pending[:self.max_batch_size]
            while len(group) > 1 and (max(len(prompts[i]) for i in group)
                                      + max(plist[i].max_new_tokens for i in group)) > self.max_seq_len:
                group = group[:len(group) // 2]
            out.append(group)
            pending = pending[len(group):]
        return out

    def _run_batch(self, prompts: list[list[int]], plist: list[SamplingParams],
                   indices: list[int]) -> Iterator[list[TokenEvent]]:
        b = len(prompts)
        lens = [len(p) for p in prompts]
        width = max(lens)  # P: prompt columns
        steps = max(p.max_new_tokens for p in plist)
        dev, cache = self.device, self._view(b)
        generators = [p.make_generator(dev) for p in plist]
        want_logprobs = any(p.logprobs for p in plist)
        stops = [set(p.stop_tokens) for p in plist]

        with torch.inference_mode():
            pad = torch.tensor([width - n for n in lens], device=dev)  # [B]
            tokens = torch.zeros(b, width, dtype=torch.long, device=dev)  # pad id 0: masked out anyway
            for i, p in enumerate(prompts):
                tokens[i, width - len(p):] = torch.tensor(p, device=dev)
            cols = self._slots[:width]
            positions = (cols.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # [B, P]
            # mask_buf[i, 0, 0, s]: row i may read slot s. Prompt slots after the padding, then one
            # more slot per decode step.
            mask_buf = torch.zeros(b, 1, 1, self.max_seq_len, dtype=torch.bool, device=dev)
            mask_buf[:, 0, 0, :width] = cols.unsqueeze(0) >= pad.unsqueeze(1)
            causal = self._causal[:width, :width]
            if min(lens) == width:  # no padding: plain causal mask, broadcast over rows
                prefill_mask = causal.view(1, 1, width, width)
            else:
                # Padding query rows read only themselves (the diagonal) so their softmax is defined;
                # their outputs land in slots that real tokens never read.
                eye = torch.eye(width, dtype=torch.bool, device=dev)
                prefill_mask = (causal & mask_buf[:, :, :, :width]) | eye  # [B, 1, P, P]
            logits = self.model(tokens, positions=positions, mask=prefill_mask, cache=cache,
                                cache_pos=cols, last_only=True)[:, -1]  # [B, V]
            cur = torch.empty(b, 1, dtype=torch.long, device=dev)
            next_pos = torch.tensor(lens, device=dev).unsqueeze(1)  # [B, 1] RoPE position of the next token

        done = [False] * b
        produced = [0] * b
        for step in range(steps):
            with torch.inference_mode():
                new = next_tokens(logits, plist, generators)  # [B]
                lp = token_logprobs(logits, new).tolist() if want_logprobs else None
                new_list = new.tolist()
            events = []
            for i in range(b):
                if done[i]:
                    continue
                produced[i] += 1
                tok = new_list[i]
                reason = "stop" if tok in stops[i] else ("length" if produced[i] >= plist[i].max_new_tokens else None)
                done[i] = reason is not None
                events.append(TokenEvent(indices[i], tok, lp[i] if lp is not None and plist[i].logprobs else None,
                                         reason))
            yield events
            if all(done):
                return
            with torch.inference_mode():
                slot = width + step
                mask_buf[:, 0, 0, slot] = True
                cur.copy_(new.unsqueeze(1))
                mask = mask_buf if self.compiled else mask_buf[..., :slot + 1]  # static vs. filled part only
                logits = self._run_decode(cur, next_pos + step, self._slots[slot:slot + 1], mask, cache)


def _params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * n
    plist = list(params)
    if len(plist) != n:
        raise HerdError(f"got {len(plist)} SamplingParams for {n} prompts; pass one, or one per prompt.")
    return plist
