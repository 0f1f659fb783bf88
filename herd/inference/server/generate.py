"""Chat and text completions on top of the engine worker: prompts to token ids, token events to
text (stop strings, streaming hold-back, log-probs, echo, tool calls, JSON mode), and the
OpenAI response objects or server-sent event chunks.

Stop strings are matched on the decoded text, so a stop string split across tokens is still
found; while streaming, the last len(longest stop) - 1 characters are held back until they can no
longer start a stop string. Tool calls follow Llama 3.1's JSON format: with `tools`, a reply that
starts with `{` or `<|python_tag|>` is held back and parsed whole (herd.tokenizer.ChatFormat)
into `tool_calls`; `tool_choice` "required" constrains the reply to a JSON object, a named tool
starts the reply with `{"name": "<tool>", "parameters": {` and constrains the rest to valid JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from herd.errors import HerdError
from herd.inference.engine import Engine, TokenEvent
from herd.inference.json_mode import START_OBJECT, JsonConstraint, JsonVocab
from herd.inference.sampling import SamplingParams
from herd.inference.server.protocol import (SSE_DONE, APIError, GenRequest, Limits, new_id, now, parse_messages,
                                            parse_prompts, parse_sampling, parse_tools, sse, usage)
from herd.inference.server.worker import EngineWorker
from herd.tokenizer import ChatFormat, Tokenizer


@dataclass
class Choice:
    """One output being generated: token events in, text and log-probs out."""

    index: int
    tokenizer: Tokenizer
    stops: list[str]
    prefix_ids: list[int] = field(default_factory=list)  # forced start of the reply (named tool choice)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already sent to the client
    lp_sent: int = 0  # log-prob items already sent
    logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_string_hit: bool = False
    generated: int = 0  # tokens the model produced (a stop token included)
    cached_tokens: int = 0
    prompt_logprobs: list | None = None
    echo_only: bool = False  # max_tokens 0 with echo: the one token the engine makes is dropped

    def __post_init__(self) -> None:
        self.decoder = self.tokenizer.stream_decoder()
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        if self.prefix_ids:
            self.text = self.decoder.push_many(self.prefix_ids)

    def push(self, e: TokenEvent) -> None:
        if self.finish_reason is not None:
            return
        self.generated += 1
        if e.cached_tokens:
            self.cached_tokens = e.cached_tokens
        if e.prompt_logprobs is not None:
            self.prompt_logprobs = e.prompt_logprobs
        if self.echo_only:
            self.generated, self.finish_reason = 0, "length"
            return
        if e.finish_reason == "stop":  # a stop token: not part of the text
            self.text += self.decoder.flush()
            self.finish_reason = "stop"
        else:
            self.ids.append(e.token)
            self.logprobs.append((e.token, e.logprob, e.top_logprobs))
            self.text += self.decoder.push(e.token)
            if e.finish_reason is not None:
                self.text += self.decoder.flush()
                self.finish_reason = e.finish_reason
        if self.stops:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = "stop"
                self.stop_string_hit = True

    def ready_text(self) -> str:
        """Text that can be sent now (everything once finished; else all but the held-back tail)."""
        end = len(self.text) if self.finish_reason else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def new_logprobs(self) -> list:
        out = self.logprobs[self.lp_sent:]
        self.lp_sent = len(self.logprobs)
        return out


class JobGroup:
    """The engine jobs of one HTTP request (its n choices, or several prompts), iterated together.

    `async for tag, events in group` yields each job's token events as they come and (tag, None) when
    the job ended. Leaving the loop early, a client disconnecting (polled every 0.5 s) or a failure
    cancels the jobs still running, so their KV blocks are freed at once."""

    def __init__(self, worker: EngineWorker, request: Request, specs: list[tuple[list[int], SamplingParams, Any]]):
        self.worker, self.request = worker, request
        self.queue: asyncio.Queue = asyncio.Queue()
        try:
            self.jobs = [worker.submit(p, sp, c, self.queue, tag=i) for i, (p, sp, c) in enumerate(specs)]
        except RuntimeError:
            raise APIError(503, "The server is shutting down; retry on another instance.", type="server_error",
                           headers={"Retry-After": "5"}) from None
        self.open = set(self.jobs)

    def cancel(self, tag: int) -> None:
        self.worker.cancel(self.jobs[tag])

    async def __aiter__(self) -> AsyncIterator[tuple[int, list[TokenEvent] | None]]:
        last_check = time.monotonic()
        try:
            while self.open:
                try:
                    job, item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    job, item = None, None
                if time.monotonic() - last_check >= 0.5:  # tokens may arrive every few ms: poll by the clock
                    last_check = time.monotonic()
                    if await self.request.is_disconnected():
                        return
                if job is None:
                    continue
                if isinstance(item, Exception):
                    raise APIError(500, str(item), type="server_error")
                if item is None:
                    self.open.discard(job)
                yield job.tag, item
        finally:
            for job in self.open:
                self.worker.cancel(job)


class Service:
    """Everything a request handler needs: engine worker, tokenizer, chat format, limits, metrics."""

    def __init__(self, engine: Engine, worker: EngineWorker, tokenizer: Tokenizer, model_name: str,
                 limits: Limits | None = None, max_queue: int = 256, chat_style: str = "hf"):
        self.engine, self.worker, self.tokenizer = engine, worker, tokenizer
        self.model_name = model_name
        self.limits = limits or Limits()
        self.max_queue = max_queue
        self.chat = ChatFormat(tokenizer, style=chat_style)
        self._json_vocab: JsonVocab | None = None
        self.created = now()
        # As in `herd generate`: a base model emits <|begin_of_text|> only to start a new document.
        self.stop_tokens = sorted(set(tokenizer.stop_tokens) | {tokenizer.bos_id})

    @property
    def json_vocab(self) -> JsonVocab:
        if self._json_vocab is None:  # built on first use: one pass over the vocabulary
            self._json_vocab = JsonVocab(self.tokenizer, self.engine.args.vocab_size)
        return self._json_vocab

    def check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    # -- shared machinery ----------------------------------------------------------------------

    def _engine_params(self, greq: GenRequest, prompt: list[int], copy: int) -> SamplingParams:
        """Per-choice SamplingParams with max_new_tokens from the request and the context check."""
        ctx = self.engine.max_seq_len
        max_tokens = greq.max_tokens
        if max_tokens is None:  # chat without max_tokens: whatever the context leaves
            max_tokens = ctx - len(prompt)
            if max_tokens < 1:
                raise APIError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has "
                                    f"{len(prompt)} tokens; shorten the messages.", param="messages",
                               code="context_length_exceeded")
        want = len(prompt) + max(max_tokens, 1)
        if want > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for "
                                "the completion). Reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        seed = None if greq.user_seed is None else greq.user_seed + copy  # n samples differ, reproducibly
        return dataclasses.replace(greq.params, seed=seed, max_new_tokens=max(max_tokens, 1),
                                   stop_tokens=self.stop_tokens)

    def _check_ids(self, prompt: list[int], param: str) -> None:
        if not prompt:
            raise APIError(400, "The prompt is empty.", param=param)
        lo, hi, vocab = min(prompt), max(prompt), self.engine.args.vocab_size
        if lo < 0 or hi >= vocab:  # the length is checked with max_tokens (_engine_params)
            raise APIError(400, f"token id {lo if lo < 0 else hi} is outside the model's vocabulary "
                                f"(0..{vocab - 1}).", param=param)

    def _admit(self, jobs: int) -> None:
        if self.worker.inflight + jobs > self.engine.max_batch_size + self.max_queue:
            raise APIError(429, "The server is busy (its request queue is full); retry shortly.",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def _group(self, request: Request, specs: list[tuple[list[int], SamplingParams, Any]]) -> "JobGroup":
        self._admit(len(specs))
        return JobGroup(self.worker, request, specs)

    # -- chat ----------------------------------------------------------------------------------

    def _chat_prompt(self, body: dict[str, Any], greq: GenRequest) -> tuple[list[int], list[int], Any, str | None]:
        """(prompt ids, forced reply prefix ids, constraint factory or None, tool_choice)."""
        messages = parse_messages(body)
        tools, choice = parse_tools(body)
        use_tools = tools is not None and choice != "none"
        try:
            prompt = self.chat.encode_dialog_prompt(messages, tools=tools if use_tools else None)
        except HerdError as e:
            raise APIError(400, str(e), param="messages") from None
        prefix_ids: list[int] = []
        constraint = None
        if greq.json_mode or choice == "required":
            constraint = lambda: JsonConstraint(self.json_vocab, self.stop_tokens)  # noqa: E731
        if choice is not None and choice.startswith("function:"):
            prefix = '{"name": "' + choice.split(":", 1)[1] + '", "parameters": {'  # the arguments: an object
            prefix_ids = self.tokenizer.encode(prefix)
            constraint = lambda: JsonConstraint(self.json_vocab, self.stop_tokens, START_OBJECT,  # noqa: E731
                                                prefix=prefix.encode())
        return prompt + prefix_ids, prefix_ids, constraint, choice if use_tools else None

    def _tool_calls(self, c: Choice, tool_choice: str | None) -> list[dict[str, Any]] | None:
        if tool_choice is None:
            return None
        msg = self.chat.decode_assistant_message(c.prefix_ids + c.ids)
        calls = msg.get("tool_calls")
        if not calls:
            return None
        return [{"id": new_id("call"), "type": "function",
                 "function": {"name": call["function"]["name"],
                              "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}
                for call in calls]

    def _chat_logprobs(self, items: list) -> dict[str, Any]:
        def entry(tok: int, lp: float) -> dict[str, Any]:
            b = self.tokenizer.token_bytes(tok)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

        return {"content": [{**entry(tok, lp), "top_logprobs": [entry(t, v) for t, v in (top or [])]}
                            for tok, lp, top in items]}

    async def chat_completions(self, body: dict[str, Any], request: Request) -> dict[str, Any] | AsyncIterator[bytes]:
        self.check_model(body)
        greq = parse_sampling(body, self.limits, chat=True)
        prompt, prefix_ids, constraint, tool_choice = self._chat_prompt(body, greq)
        self._check_ids(prompt, "messages")
        specs = [(prompt, self._engine_params(greq, prompt, i), constraint() if constraint else None)
                 for i in range(greq.n)]
        choices = [Choice(i, self.tokenizer, greq.stop, prefix_ids=prefix_ids) for i in range(greq.n)]
        rid, created = new_id("chatcmpl"), now()
        group = self._group(request, specs)  # before any byte is sent, so a full queue is still a 429
        if greq.stream:
            return self._chat_stream(group, greq, choices, tool_choice, rid, created, len(prompt))
        async for i, events in group:
            for e in events or []:
                choices[i].push(e)
            if choices[i].stop_string_hit:
                group.cancel(i)
        out = []
        for c in choices:
            calls = self._tool_calls(c, tool_choice)
            message: dict[str, Any] = {"role": "assistant", "content": None if calls else c.text}
            if calls:
                message["tool_calls"] = calls
            out.append({"index": c.index, "message": message,
                        "logprobs": self._chat_logprobs(c.logprobs) if greq.logprobs else None,
                        "finish_reason": "tool_calls" if calls else c.finish_reason or "length"})
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": out, "usage": self._usage(len(prompt), choices)}

    @staticmethod
    def _usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, Any]:
        """Prompt tokens once per prompt (as OpenAI counts with n > 1); every generated token of every choice."""
        return usage(prompt_tokens, sum(c.generated for c in choices), sum(c.cached_tokens for c in choices))

    async def _chat_stream(self, group: JobGroup, greq: GenRequest, choices: list[Choice],
                           tool_choice: str | None, rid: str, created: int, prompt_len: int) -> AsyncIterator[bytes]:
        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        # A tool call is parsed whole: hold a reply back until it is clear whether it is one.
        undecided = {c.index for c in choices} if tool_choice is not None else set()
        holding: set[int] = set()
        closed: set[int] = set()
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for i, evs in group:
            c = choices[i]
            if i in closed:
                continue
            for e in evs or []:
                c.push(e)
            if c.stop_string_hit:
                group.cancel(i)
            if evs is None and c.finish_reason is None:
                c.finish_reason = "length"  # ended without a reason of its own (server shutting down)
            if i in undecided:
                head = c.text.lstrip()[:1]
                if c.prefix_ids or (c.ids and c.ids[0] == self.tokenizer.python_tag_id) or head == "{":
                    holding.add(i)
                    undecided.discard(i)
                elif head:
                    undecided.discard(i)
            if i in holding or i in undecided:
                if c.finish_reason is None:
                    continue
                calls = self._tool_calls(c, tool_choice)
                if calls:
                    yield chunk(i, {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]})
                    yield chunk(i, {}, "tool_calls")
                    closed.add(i)
                    continue
            text = c.ready_text()
            lps = self._chat_logprobs(c.new_logprobs()) if greq.logprobs else None
            if text or c.finish_reason or (lps and lps["content"]):
                yield chunk(i, {"content": text} if text else {}, c.finish_reason, lps)
            if c.finish_reason:
                closed.add(i)
        if greq.include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                       "choices": [], "usage": self._usage(prompt_len, choices)})
        yield SSE_DONE

    # -- text completions ----------------------------------------------------------------------

    def _plain_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if not self.tokenizer.is_special(t)])

    def _completion_logprobs(self, prompt: list[int] | None, c: Choice, top_n: int,
                             text_start: int = 0) -> dict[str, Any]:
        """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
        items: list[tuple[int, float | None, list | None]] = []
        if prompt is not None:  # echo: the prompt's tokens first (nothing predicts the first one)
            plp = c.prompt_logprobs or [None] * len(prompt)
            for tok, entry in zip(prompt, plp):
                items.append((tok, None, None) if entry is None else (tok, entry[0], entry[1]))
        items += c.logprobs
        decoder = self.tokenizer.stream_decoder()
        tokens, lps, tops, offsets = [], [], [], []
        pos = text_start
        for tok, lp, top in items:
            offsets.append(pos)
            if not self.tokenizer.is_special(tok):  # special tokens are not part of the text
                pos += len(decoder.push(tok))
            tokens.append(self.tokenizer.token_bytes(tok).decode("utf-8", errors="replace"))
            lps.append(lp)
            if top is None:
                tops.append(None)
            else:
                d: dict[str, float] = {}
                for t, v in top[:max(top_n, 1)]:
                    d.setdefault(self.tokenizer.token_bytes(t).decode("utf-8", errors="replace"), v)
                tops.append(d)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def completions(self, body: dict[str, Any], request: Request) -> dict[str, Any] | AsyncIterator[bytes]:
        self.check_model(body)
        greq = parse_sampling(body, self.limits, chat=False)
        if greq.max_tokens == 0 and not greq.echo:
            raise APIError(400, "'max_tokens' 0 makes sense only with 'echo': true.", param="max_tokens")
        prompts, prompt_texts = [], []
        for p in parse_prompts(body):
            ids = self.tokenizer.encode(p, bos=True) if isinstance(p, str) else p
            self._check_ids(ids, "prompt")
            prompts.append(ids)
            # echo returns the prompt as sent; token-id prompts as their text (special tokens left out)
            prompt_texts.append((p if isinstance(p, str) else self._plain_text(ids)) if greq.echo else "")
        constraint = (lambda: JsonConstraint(self.json_vocab, self.stop_tokens)) if greq.json_mode else None
        specs, choices = [], []
        for pi, ids in enumerate(prompts):
            for j in range(greq.n):
                specs.append((ids, self._engine_params(greq, ids, j), constraint() if constraint else None))
                choices.append(Choice(pi * greq.n + j, self.tokenizer, greq.stop, echo_only=greq.max_tokens == 0))
        rid, created = new_id("cmpl"), now()
        group = self._group(request, specs)  # before any byte is sent, so a full queue is still a 429
        if greq.stream:
            return self._completion_stream(group, greq, choices, prompts, prompt_texts, rid, created)
        async for i, events in group:
            for e in events or []:
                choices[i].push(e)
            if choices[i].stop_string_hit:
                group.cancel(i)
        out = []
        for c in choices:
            pi = c.index // greq.n
            lp = None
            if greq.logprobs:
                lp = self._completion_logprobs(prompts[pi] if greq.echo else None, c, greq.top_logprobs)
            out.append({"index": c.index, "text": prompt_texts[pi] + c.text, "logprobs": lp,
                        "finish_reason": c.finish_reason or "length"})
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": out, "usage": usage(sum(len(p) for p in prompts),
                                               sum(c.generated for c in choices),
                                               sum(c.cached_tokens for c in choices))}

    async def _completion_stream(self, group: JobGroup, greq: GenRequest, choices: list[Choice],
                                 prompts: list[list[int]], prompt_texts: list[str], rid: str,
                                 created: int) -> AsyncIterator[bytes]:
        def chunk(index: int, text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
            return sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        echoed: set[int] = set()
        closed: set[int] = set()
        async for i, evs in group:
            c = choices[i]
            if i in closed:
                continue
            for e in evs or []:
                c.push(e)
            if c.stop_string_hit:
                group.cancel(i)
            if c.finish_reason is None and evs is None:
                c.finish_reason = "length"
            pi = c.index // greq.n
            head = ""
            if greq.echo and i not in echoed:
                echoed.add(i)
                head = prompt_texts[pi]
            text = c.ready_text()
            lps = None
            if greq.logprobs:
                fresh = Choice(c.index, self.tokenizer, [])
                fresh.logprobs, fresh.prompt_logprobs = c.new_logprobs(), c.prompt_logprobs
                lps = self._completion_logprobs(prompts[pi] if head else None, fresh, greq.top_logprobs)
            if head or text or c.finish_reason:
                yield chunk(c.index, head + text, c.finish_reason, lps)
            if c.finish_reason:
                closed.add(i)
        if greq.include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                       "choices": [], "usage": usage(sum(len(p) for p in prompts),
                                                     sum(c.generated for c in choices),
                                                     sum(c.cached_tokens for c in choices))})
        yield SSE_DONE
