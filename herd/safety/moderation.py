"""Moderation in `herd serve`: a Llama Guard check of each prompt and reply, and Code Shield on code.

    herd serve MODEL --guard GUARD [--guard-check both] [--guard-stream end] [--code-shield warn|block]

Prompt check (before generation): the request's conversation (chat messages, or each completions
prompt as a user turn) goes to the guard as `User`. Flagged: the model never runs; the reply is
OpenAI-shaped, status 200, every choice with `finish_reason: "content_filter"`, `message.content`
null and `message.refusal` naming the categories (completions: empty `text`), and a `moderation`
object: {"flagged", "stage": "prompt", "categories": [{"code", "name"}], "score", "verdict"}.

Reply check (after generation): each choice's text (a tool call as its JSON) goes to the guard as
`Agent` after the conversation. Flagged: that choice becomes the same refusal. Every checked choice
carries its `moderation` object, flagged or not.

Streams, by --guard-stream:
- end (default): text streams as it is generated and the reply is checked when it ends; the last
  chunk of a flagged reply is replaced by one with `finish_reason: "content_filter"` and the
  refusal (`delta.refusal`). Text already sent cannot be taken back: this policy bounds what a
  client sees only by the check at the end (the same trade-off as OpenAI/Azure's asynchronous
  filter), and costs no latency while streaming.
- buffer: a choice's chunks are held until it ends and is checked; a flagged reply sends only the
  refusal. Nothing unsafe reaches the client, at the cost of streaming.

Code Shield (--code-shield): the fenced code blocks of each reply are scanned (herd.safety.codeshield);
`code_shield` {"insecure", "treatment", "findings": [{"cwe", "rule", "severity", ...}]} is added to
the choice. `warn` never refuses; `block` refuses replies Code Shield recommends blocking (an
error-severity finding) and annotates the others. Streams follow --guard-stream.

What is never passed silently: a conversation the guard cannot check (no user message, longer
than the guard's context) is refused with status 400 naming the problem; a guard answer that
cannot be parsed counts as flagged (herd.safety.verdict).

/metrics gains herd_guard_seconds (histogram per stage: the guard's own time, queueing included),
herd_guard_checks_total{stage,result}, herd_guard_flagged_total{stage,category},
herd_code_shield_seconds and herd_code_shield_findings_total{cwe,severity}.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from herd.errors import HerdError

STAGES = ("prompt", "response")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ModerationConfig:
    """Moderation flags of `herd serve` (a Llama Guard model and Code Shield)."""

    guard: str = ""
    """Guard checkpoint folder (Llama Guard 3 1B/8B in HF or Meta format, or a herd-trained guard); empty: no guard."""
    guard_tokenizer: str = ""
    """The guard's tokenizer.model (default: the one stored with the guard checkpoint)."""
    guard_version: int = 3
    """Guard prompt format: 3 (Llama Guard 3, S1-S14) or 2 (Llama Guard 2, S1-S11)."""
    guard_categories: str = ""
    """JSON file of custom categories ({'name', 'description'} objects) instead of the version's list."""
    guard_exclude: str = ""
    """Category codes to leave out of the guard's prompt, e.g. S6,S7."""
    guard_descriptions: bool = False
    """Write category descriptions into the guard's prompt."""
    guard_threshold: float = 0.5
    """Flag when p('unsafe' as the answer's first token) >= this; a negative value lets the generated verdict decide."""
    guard_check: str = "both"
    """What the guard checks: prompt (before generation), response (after it) or both."""
    guard_stream: str = "end"
    """Streamed replies: end (check when the reply ends, replace its last chunk if flagged) or buffer (hold each reply until checked)."""
    guard_batch_size: int = 16
    """Guard checks decoded at once (the guard has its own engine and thread)."""
    guard_max_seq_len: int = 4096
    """Longest guard prompt + answer in tokens (at most the guard's context)."""
    code_shield: str = "off"
    """Scan code blocks in replies with Code Shield: off, warn (add the findings) or block (refuse replies with an error-severity finding)."""

    @property
    def enabled(self) -> bool:
        return bool(self.guard) or self.code_shield != "off"

    def validate(self) -> None:
        for name, value, allowed in (("guard-check", self.guard_check, ("prompt", "response", "both")),
                                     ("guard-stream", self.guard_stream, ("end", "buffer")),
                                     ("code-shield", self.code_shield, ("off", "warn", "block"))):
            if value not in allowed:
                raise HerdError(f"unknown --{name} '{value}'; use one of: {', '.join(allowed)}.")
        if self.guard_threshold > 1:
            raise HerdError(f"--guard-threshold must be at most 1, got {self.guard_threshold}.")
        if self.guard_batch_size < 1 or self.guard_max_seq_len < 64:
            raise HerdError("--guard-batch-size must be at least 1 and --guard-max-seq-len at least 64.")
        if not self.guard and any((self.guard_tokenizer, self.guard_categories, self.guard_exclude)):
            raise HerdError("--guard-tokenizer, --guard-categories and --guard-exclude need --guard GUARD_CHECKPOINT.")


    def check_files(self) -> None:
        """HerdError for a guard checkpoint or categories file that does not exist (before anything loads)."""
        from pathlib import Path

        for flag, value in (("--guard", self.guard), ("--guard-tokenizer", self.guard_tokenizer),
                            ("--guard-categories", self.guard_categories)):
            if value and not Path(value).exists():
                raise HerdError(f"{flag} {value} does not exist; pass "
                                + ("the folder of a Llama Guard model (or of a guard trained with herd sft)."
                                   if flag == "--guard" else "an existing file."))


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum, self.n = 0.0, 0

    def observe(self, seconds: float) -> None:
        self.counts[next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))] += 1
        self.sum += seconds
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, acc = [], 0
        for bound, count in zip(list(BUCKETS) + [float("inf")], self.counts):
            acc += count
            le = "+Inf" if bound == float("inf") else bound
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{le}"}} {acc}')
        sep = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{sep} {round(self.sum, 6)}", f"{name}_count{sep} {self.n}"]
        return out


class Moderator:
    """The server extension (herd.inference.server.app.ServerExtension) that runs the guard and Code Shield.

    guard: a GuardClassifier (its engine runs on its own EngineWorker thread) or None;
    scanner: a CodeShieldScanner or None; tokenizer: the served model's (to read token-id prompts).
    """

    def __init__(self, cfg: ModerationConfig, guard: Any = None, scanner: Any = None, tokenizer: Any = None):
        cfg.validate()
        self.cfg, self.guard, self.scanner, self.tokenizer = cfg, guard, scanner, tokenizer
        self.threshold = cfg.guard_threshold if cfg.guard_threshold >= 0 else None
        self.worker = None
        if guard is not None:
            from herd.inference.server.worker import EngineWorker

            self.worker = EngineWorker(guard.engine)
            self.worker.start()
        self.guard_time = {s: _Histogram() for s in STAGES}
        self.checks = {(s, r): 0 for s in STAGES for r in ("flagged", "passed")}
        self.flagged_categories: dict[tuple[str, str], int] = {}
        self.scan_time = _Histogram()
        self.findings: dict[tuple[str, str], int] = {}
        self.treatments = {"ignore": 0, "warn": 0, "block": 0}

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=5.0)

    def metrics(self) -> str:
        """Prometheus text: the guard's time per check and what it flagged, Code Shield's scan time and findings."""
        lines: list[str] = []
        if self.guard is not None:
            lines += ["# HELP herd_guard_seconds Time of one guard check (queueing included), by stage: prompt "
                      "(before generation, added to the time to first token) or response (after generation).",
                      "# TYPE herd_guard_seconds histogram"]
            for stage in STAGES:
                lines += self.guard_time[stage].lines("herd_guard_seconds", f'stage="{stage}"')
            lines += ["# HELP herd_guard_checks_total Guard checks by stage and result.",
                      "# TYPE herd_guard_checks_total counter"]
            lines += [f'herd_guard_checks_total{{stage="{s}",result="{r}"}} {n}' for (s, r), n in self.checks.items()]
            lines += ["# HELP herd_guard_flagged_total Flagged checks by stage and category (none: no category named).",
                      "# TYPE herd_guard_flagged_total counter"]
            lines += [f'herd_guard_flagged_total{{stage="{s}",category="{c}"}} {n}'
                      for (s, c), n in sorted(self.flagged_categories.items())]
        if self.scanner is not None:
            lines += ["# HELP herd_code_shield_seconds Code Shield scan time per reply with code blocks.",
                      "# TYPE herd_code_shield_seconds histogram"]
            lines += self.scan_time.lines("herd_code_shield_seconds", "")
            lines += ["# HELP herd_code_shield_replies_total Replies with code by Code Shield's recommended treatment.",
                      "# TYPE herd_code_shield_replies_total counter"]
            lines += [f'herd_code_shield_replies_total{{treatment="{t}"}} {n}' for t, n in self.treatments.items()]
            lines += ["# HELP herd_code_shield_findings_total Code Shield findings by CWE and severity.",
                      "# TYPE herd_code_shield_findings_total counter"]
            lines += [f'herd_code_shield_findings_total{{cwe="{c}",severity="{v}"}} {n}'
                      for (c, v), n in sorted(self.findings.items())]
        return "\n".join(lines) + "\n" if lines else ""

    # -- the two checks ------------------------------------------------------------------------

    def _checks(self, stage: str) -> bool:
        return self.guard is not None and self.cfg.guard_check in (stage, "both")

    async def check(self, conversation: list[dict[str, Any]], role: str, stage: str):
        """The guard's GuardResult for one conversation (APIError 400 if it cannot be checked)."""
        from herd.inference.server.protocol import APIError

        start = time.perf_counter()
        try:
            ids, role = self.guard.prompt(conversation, role)
        except HerdError as e:
            raise APIError(400, f"The moderation guard cannot check this {'request' if stage == 'prompt' else 'reply'}"
                                f": {e}", param="messages", code="moderation_unavailable") from None
        queue: asyncio.Queue = asyncio.Queue()
        try:
            job = self.worker.submit(ids, self.guard.params(), None, queue)
        except RuntimeError:
            raise APIError(503, "The server is shutting down; retry on another instance.", type="server_error") from None
        from herd.safety.classifier import Answer

        answer = Answer(self.guard.tokenizer)
        done = False
        try:
            while True:
                _, item = await queue.get()
                if item is None:
                    done = True
                    break
                if isinstance(item, Exception):
                    raise APIError(500, f"the moderation guard failed: {item}", type="server_error")
                for e in item:
                    answer.push(e.token, e.watched, e.finish_reason == "stop")
        finally:
            if not done:  # the request went away (client gone) or the guard failed: free the guard's cache
                self.worker.cancel(job)
        result = self.guard.result(answer.ids, answer.watched, role)
        self.guard_time[stage].observe(time.perf_counter() - start)
        flagged = result.flagged(self.threshold)
        self.checks[stage, "flagged" if flagged else "passed"] += 1
        if flagged:
            for code in result.categories or ["none"]:
                self.flagged_categories[stage, code] = self.flagged_categories.get((stage, code), 0) + 1
        return result

    async def scan(self, text: str):
        res = await self.scanner.scan_reply(text)
        if res.blocks:
            self.scan_time.observe(res.seconds)
            self.treatments[res.treatment] += 1
            for f in res.findings:
                self.findings[f.cwe or "unknown", f.severity] = self.findings.get((f.cwe or "unknown", f.severity), 0) + 1
        return res

    def describe(self, result, stage: str) -> dict[str, Any]:
        """The `moderation` object of a checked prompt or choice."""
        fmt = self.guard.fmt
        return {"flagged": result.flagged(self.threshold), "stage": stage, "verdict": result.verdict,
                "categories": [{"code": c, "name": fmt.category_name(c)} for c in result.categories],
                "score": None if result.score is None else round(result.score, 6)}

    def refusal(self, moderation: dict[str, Any] | None, scan: Any = None) -> str:
        if moderation is not None and moderation["flagged"]:
            what = "request" if moderation["stage"] == "prompt" else "reply"
            if moderation["categories"]:
                cats = ", ".join(f"{c['code']} {c['name']}" for c in moderation["categories"])
                return f"This {what} was blocked by the moderation guard: {cats}."
            if moderation["verdict"] == "unparseable":
                return f"This {what} was blocked: the moderation guard's answer could not be read."
            return f"This {what} was blocked by the moderation guard (unsafe score {moderation['score']})."
        errors = [f for f in scan.findings if f.severity == "error"]
        listed = ", ".join(f"{f.cwe} {f.rule}" for f in errors[:3])
        return f"This reply was blocked by Code Shield: insecure code ({listed})."

    # -- before generation ---------------------------------------------------------------------

    def _conversations(self, kind: str, body: dict[str, Any]) -> list[list[dict[str, Any]]]:
        from herd.inference.server.protocol import APIError, parse_messages, parse_prompts

        if kind == "chat":
            return [parse_messages(body)]
        out = []
        for p in parse_prompts(body):
            if not isinstance(p, str):
                try:
                    p = self.tokenizer.decode([t for t in p if not self.tokenizer.is_special(t)])
                except HerdError as e:
                    raise APIError(400, str(e), param="prompt") from None
            out.append([{"role": "user", "content": p}])
        return out

    async def before(self, kind: str, body: dict[str, Any]) -> Any:
        if not self._checks("prompt"):
            return None
        convs = self._conversations(kind, body)
        results = await asyncio.gather(*(self.check(c, None, "prompt") for c in convs))
        flagged = next((r for r in results if r.flagged(self.threshold)), None)
        if flagged is None:
            return None
        return self._refuse(kind, body, self.describe(flagged, "prompt"))

    def _refuse(self, kind: str, body: dict[str, Any], moderation: dict[str, Any]) -> Any:
        from herd.inference.server.protocol import SSE_DONE, new_id, now, sse, usage

        n = body.get("n") if isinstance(body.get("n"), int) and 1 <= body.get("n") <= 128 else 1
        if kind == "completions":
            try:
                from herd.inference.server.protocol import parse_prompts

                n *= len(parse_prompts(body))
            except Exception:
                pass
        message = self.refusal(moderation)
        rid, created, model = new_id("chatcmpl" if kind == "chat" else "cmpl"), now(), body.get("model") or ""
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": None, "refusal": message},
                        "logprobs": None, "finish_reason": "content_filter", "moderation": moderation} for i in range(n)]
        else:
            choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": "content_filter",
                        "moderation": moderation} for i in range(n)]
        if not body.get("stream"):
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
                    "usage": usage(0, 0, 0), "moderation": moderation}

        async def stream() -> AsyncIterator[bytes]:
            for c in choices:
                if kind == "chat":
                    delta = {"role": "assistant", "content": None, "refusal": message}
                    c = {"index": c["index"], "delta": delta, "logprobs": None, "finish_reason": "content_filter",
                         "moderation": moderation}
                yield sse({"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                           "model": model, "choices": [c]})
            options = body.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                yield sse({"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                           "model": model, "choices": [], "usage": usage(0, 0, 0)})
            yield SSE_DONE

        return stream()

    # -- after generation ----------------------------------------------------------------------

    def _reply_conversation(self, kind: str, body: dict[str, Any], prompt_index: int, text: str) -> list[dict]:
        convs = self._conversations(kind, body)
        base = convs[min(prompt_index, len(convs) - 1)]
        if kind == "completions" and body.get("echo") is True and text.startswith(base[0]["content"]):
            text = text[len(base[0]["content"]):]  # the echoed prompt is not part of the reply
        return list(base) + [{"role": "assistant", "content": text}]

    async def _judge(self, kind: str, body: dict[str, Any], prompt_index: int, text: str
                     ) -> tuple[dict[str, Any] | None, Any, str | None]:
        """(moderation object or None, Code Shield result or None, refusal text or None) for one reply."""
        guard_task = scan_task = None
        if self._checks("response"):
            guard_task = self.check(self._reply_conversation(kind, body, prompt_index, text), "Agent", "response")
        if self.scanner is not None:
            scan_task = self.scan(text)
        result, scan = await asyncio.gather(guard_task or _none(), scan_task or _none())
        moderation = self.describe(result, "response") if result is not None else None
        refuse = None
        if moderation is not None and moderation["flagged"]:
            refuse = self.refusal(moderation)
        elif scan is not None and self.cfg.code_shield == "block" and scan.treatment == "block":
            refuse = self.refusal(None, scan)
        return moderation, scan, refuse

    def _annotate(self, choice: dict[str, Any], moderation: Any, scan: Any) -> None:
        if moderation is not None:
            choice["moderation"] = moderation
        if scan is not None and scan.blocks:
            choice["code_shield"] = scan.to_dict()

    async def after(self, kind: str, body: dict[str, Any], result: Any) -> Any:
        if not (self._checks("response") or self.scanner is not None):
            return result
        if isinstance(result, dict):
            return await self._after_response(kind, body, result)
        return self._after_stream(kind, body, result)

    def _prompt_index(self, kind: str, body: dict[str, Any], index: int) -> int:
        n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") >= 1 else 1
        return index // n if kind == "completions" else 0

    @staticmethod
    def _choice_text(kind: str, choice: dict[str, Any]) -> str:
        if kind == "completions":
            return choice.get("text") or ""
        msg = choice.get("message") or {}
        if msg.get("tool_calls"):
            return json.dumps([c.get("function") for c in msg["tool_calls"]], ensure_ascii=False)
        return msg.get("content") or ""

    async def _after_response(self, kind: str, body: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        choices = result.get("choices") or []
        judged = await asyncio.gather(*(self._judge(kind, body, self._prompt_index(kind, body, c["index"]),
                                                    self._choice_text(kind, c)) for c in choices))
        for choice, (moderation, scan, refuse) in zip(choices, judged):
            self._annotate(choice, moderation, scan)
            if refuse is not None:
                choice["finish_reason"] = "content_filter"
                choice["logprobs"] = None
                if kind == "chat":
                    choice["message"] = {"role": "assistant", "content": None, "refusal": refuse}
                else:
                    choice["text"] = ""
                    choice["refusal"] = refuse
        return result

    async def _after_stream(self, kind: str, body: dict[str, Any], stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        buffer = self.cfg.guard_stream == "buffer"
        text: dict[int, str] = {}
        calls: dict[int, list] = {}
        held: dict[int, list[bytes]] = {}  # buffer: a choice's chunks until it is checked
        async for part in stream:
            obj = _event(part)
            if obj is None or "error" in obj or not obj.get("choices"):  # [DONE], errors, the usage chunk
                yield part
                continue
            choice = obj["choices"][0]
            i = choice["index"]
            if kind == "chat":
                delta = choice.get("delta") or {}
                text[i] = text.get(i, "") + (delta.get("content") or "")
                if delta.get("tool_calls"):
                    calls.setdefault(i, []).extend(c.get("function") for c in delta["tool_calls"])
            else:
                text[i] = text.get(i, "") + (choice.get("text") or "")
            if choice.get("finish_reason") is None:
                if buffer:
                    held.setdefault(i, []).append(part)
                else:
                    yield part
                continue
            reply = json.dumps(calls[i], ensure_ascii=False) if calls.get(i) else text.get(i, "")
            moderation, scan, refuse = await self._judge(kind, body, self._prompt_index(kind, body, i), reply)
            self._annotate(choice, moderation, scan)
            if refuse is not None:
                choice["finish_reason"] = "content_filter"
                choice["logprobs"] = None
                if kind == "chat":
                    choice["delta"] = {"role": "assistant", "refusal": refuse} if buffer else {"refusal": refuse}
                else:
                    choice["text"], choice["refusal"] = "", refuse
                held.pop(i, None)  # buffer: nothing of a refused reply is sent
            for p in held.pop(i, []):
                yield p
            yield _sse(obj)


async def _none() -> None:
    return None


def _event(part: bytes) -> dict[str, Any] | None:
    """The JSON object of one server-sent event, or None ([DONE], comments)."""
    if not part.startswith(b"data: ") or part.strip() == b"data: [DONE]":
        return None
    try:
        obj = json.loads(part[6:])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _sse(obj: dict[str, Any]) -> bytes:
    from herd.inference.server.protocol import sse

    return sse(obj)


def build_moderator(cfg: ModerationConfig, tokenizer: Any, threads: int = 0, device: str | None = None,
                    dtype: str | None = None) -> Moderator:
    """Load the guard (and Code Shield) as configured; HerdError names what is missing."""
    import argparse
    from pathlib import Path

    cfg.validate()
    cfg.check_files()
    guard = scanner = None
    if cfg.guard:
        from herd.safety.guard_cli import guard_format, load_guard

        fmt_ns = argparse.Namespace(guard_version=cfg.guard_version,
                                    categories=Path(cfg.guard_categories) if cfg.guard_categories else None,
                                    exclude=cfg.guard_exclude, descriptions=cfg.guard_descriptions)
        load_ns = argparse.Namespace(checkpoint=Path(cfg.guard), tokenizer=Path(cfg.guard_tokenizer)
                                     if cfg.guard_tokenizer else None, dtype=dtype, device=device, threads=threads)
        threshold = cfg.guard_threshold if cfg.guard_threshold >= 0 else None
        guard = load_guard(load_ns, guard_format(fmt_ns), threshold, cfg.guard_batch_size, cfg.guard_max_seq_len)
    if cfg.code_shield != "off":
        from herd.safety.codeshield import CodeShieldScanner

        scanner = CodeShieldScanner()
    return Moderator(cfg, guard, scanner, tokenizer)
