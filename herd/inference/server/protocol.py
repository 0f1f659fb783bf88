"""The OpenAI wire format: request bodies checked field by field into herd's types, errors in
OpenAI's JSON shape, and the response / stream-chunk objects.

Field meanings follow OpenAI's API reference for /v1/chat/completions and /v1/completions and
vLLM's OpenAI-compatible server (which also takes top_k, min_p and, for lm-eval, echo with
log-probs). Every problem with a request becomes an APIError: status 400 (or 404 / 413 / 429 ...),
a message naming the field and what would be valid, and the field as `param`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from herd.inference.sampling import SamplingParams


class APIError(Exception):
    """A request the server refuses: HTTP status + OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_MISSING = object()
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object"}


def get(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """body[name] if it has one of `types` (None counts as absent), else default; APIError when wrong or required."""
    value = body.get(name)
    if value is None:
        if default is _MISSING:
            raise APIError(400, f"'{name}' is required.", param=name)
        return default
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise APIError(400, f"'{name}' must be {want}, got {json.dumps(value)[:60]}.", param=name)
    return value


def in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}.", param=name)


@dataclass
class Limits:
    """What the service accepts (flags of `herd serve`)."""

    max_n: int = 8
    max_stop: int = 4
    max_top_logprobs: int = 20


@dataclass
class GenRequest:
    """One checked generation request (chat or completions), before tokenizing."""

    params: SamplingParams
    max_tokens: int | None  # None: as much as the context allows
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    json_mode: bool = False
    user_seed: int | None = None


def parse_sampling(body: dict[str, Any], limits: Limits, chat: bool) -> GenRequest:
    """The fields both endpoints share (OpenAI defaults: temperature 1, top_p 1)."""
    temperature = get(body, "temperature", float, 1.0)
    in_range("temperature", temperature, 0.0, 2.0)
    top_p = get(body, "top_p", float, 1.0)
    if not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}.", param="top_p")
    top_k = get(body, "top_k", int, -1)
    if top_k == 0 or top_k < -1:
        raise APIError(400, f"'top_k' must be a positive integer (or -1 for off), got {top_k}.", param="top_k")
    min_p = get(body, "min_p", float, 0.0)
    in_range("min_p", min_p, 0.0, 1.0)
    presence = get(body, "presence_penalty", float, 0.0)
    in_range("presence_penalty", presence, -2.0, 2.0)
    frequency = get(body, "frequency_penalty", float, 0.0)
    in_range("frequency_penalty", frequency, -2.0, 2.0)
    seed = get(body, "seed", int, None)
    n = get(body, "n", int, 1)
    if not 1 <= n <= limits.max_n:
        raise APIError(400, f"'n' must be from 1 to {limits.max_n} on this server, got {n}.", param="n")
    max_tokens = get(body, "max_completion_tokens", int, None) if chat else None
    if max_tokens is None:
        max_tokens = get(body, "max_tokens", int, None if chat else 16)  # OpenAI's completions default: 16
    if max_tokens is not None and max_tokens < 0:
        raise APIError(400, f"'max_tokens' must be >= 0, got {max_tokens}.", param="max_tokens")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise APIError(400, "'stop' must be a string or an array of strings.", param="stop")
    stops = [s for s in stops if s]
    if len(stops) > limits.max_stop:
        raise APIError(400, f"'stop' may hold at most {limits.max_stop} strings, got {len(stops)}.", param="stop")
    stream = get(body, "stream", bool, False)
    options = get(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true.", param="stream_options")
    include_usage = bool(options and get(options, "include_usage", bool, False))
    if chat:
        logprobs = get(body, "logprobs", bool, False)
        top = get(body, "top_logprobs", int, 0)
        if top and not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        echo = False
    else:  # completions: logprobs is the number of alternatives (0..5 in OpenAI's API; vLLM allows 20)
        lp = get(body, "logprobs", int, None)
        logprobs, top = lp is not None, lp or 0
        echo = get(body, "echo", bool, False)
    if not 0 <= top <= limits.max_top_logprobs:
        raise APIError(400, f"top log-probs must be from 0 to {limits.max_top_logprobs}, got {top}.",
                       param="top_logprobs" if chat else "logprobs")
    json_mode = False
    fmt = get(body, "response_format", dict, None)
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            json_mode = True
        elif kind != "text":
            raise APIError(400, f"response_format type {json.dumps(kind)} is not supported; use 'text' or "
                                "'json_object'.", param="response_format")
    for unsupported in ("suffix", "best_of", "logit_bias"):
        if body.get(unsupported) not in (None, 1, {}, ""):
            raise APIError(400, f"'{unsupported}' is not supported by this server; leave it out.", param=unsupported)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=None if top_k == -1 else top_k,
                            min_p=min_p or None, seed=seed, max_new_tokens=1, logprobs=logprobs,
                            top_logprobs=top, prompt_logprobs=echo and logprobs,
                            presence_penalty=presence, frequency_penalty=frequency)
    return GenRequest(params=params, max_tokens=max_tokens, n=n, stream=stream, include_usage=include_usage,
                      stop=stops, logprobs=logprobs, top_logprobs=top, echo=echo, json_mode=json_mode,
                      user_seed=seed)


def message_text(content: Any, index: int) -> str | None:
    """OpenAI message content (a string, or an array of {"type": "text", "text"} parts) as text."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content: only text parts are supported "
                                    '({"type": "text", "text": ...}).', param="messages")
            out.append(part["text"])
        return "".join(out)
    raise APIError(400, f"messages[{index}].content must be a string or an array of text parts.", param="messages")


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = get(body, "messages", list)
    if not messages:
        raise APIError(400, "'messages' must hold at least one message.", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role'.", param="messages")
        role = m["role"]
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        msg: dict[str, Any] = {"role": role, "content": message_text(m.get("content"), i)}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        elif role not in ("tool", "assistant") and msg["content"] is None:
            raise APIError(400, f"messages[{i}] ({role}) has no content.", param="messages")
        out.append(msg)
    return out


def parse_tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(function schemas, tool_choice): tool_choice is "auto", "none", "required" or a function name."""
    tools = get(body, "tools", list, None)
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "'tool_choice' needs 'tools'.", param="tool_choice")
        return None, None
    schemas = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}.",
                           param="tools")
        schemas.append({"type": "function", "function": fn})
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str) or name not in {s["function"]["name"] for s in schemas}:
            raise APIError(400, "'tool_choice' names a function that is not in 'tools'.", param="tool_choice")
        choice = "function:" + name
    elif choice not in ("auto", "none", "required"):
        raise APIError(400, "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', "
                            "'function': {'name': ...}}.", param="tool_choice")
    return schemas, choice


def parse_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """Completions' prompt: a string, an array of strings, an array of token ids, or an array of those."""
    prompt = body.get("prompt")
    bad = APIError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array of "
                        "arrays of token ids.", param="prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [list(prompt)]
    out: list[str | list[int]] = []
    for p in prompt:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(list(p))
        else:
            raise bad
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(obj: Any) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
