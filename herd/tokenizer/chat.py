"""The Llama 3.1 chat format: dialogs to token ids, tool calls, and generated replies back to messages.

Two styles, one code path:

- "hf" (default): token for token what the Hugging Face chat template of Llama-3.1-8B-Instruct
  renders: an automatic system header ("Cutting Knowledge Date: December 2023", "Today Date: ..."),
  custom tools as JSON in the first user message (or the system message), tool results in the
  `ipython` role (JSON-encoded as the template does), built-in calls as `<|python_tag|>name.call(...)`.
  It is the default because Llama 3.1 Instruct was tuned with these lines and the TRL / transformers
  data people fine-tune on is rendered this way.
- "meta": Meta's plain reference dialog (`<|begin_of_text|>` then each message as
  header + content.strip() + `<|eot_id|>`), no system lines added. Use it for models trained from
  scratch, where the date lines would only be noise.

Messages are dicts in the shape transformers and TRL use: {"role", "content"} and, for an assistant
tool call, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]}.
Text is cut only at special tokens, so every text segment is encoded exactly as the template's
string would be; special-token strings inside message content stay plain text (unlike
tokenizer.json, which would turn a user's "<|eot_id|>" into the real token).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

from herd.errors import HerdError
from herd.tokenizer.core import Tokenizer

ROLES = ("system", "user", "assistant", "ipython", "tool")
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
DEFAULT_DATE = "26 Jul 2024"
"""The Llama 3.1 template's fixed date when none is given (Llama 3.2's template uses today's date)."""

_CUSTOM_TOOLS_PROMPT = (
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n")
_BUILTIN_CALL = re.compile(r"^(\w+)\.call\((.*)\)$", re.DOTALL)
_FUNCTION_TAG = re.compile(r"^<function=([^>]+)>(.*)</function>$", re.DOTALL)


def _tojson(x: Any, indent: int | None = None) -> str:
    # transformers' chat-template `tojson`: plain json.dumps, non-ASCII kept, keys in given order
    return json.dumps(x, ensure_ascii=False, indent=indent)


TRAIN_ON = ("assistant", "last", "all")
"""Loss-mask policies of encode_dialog_with_mask: every assistant reply, the last one only, or every token."""


class Segment(NamedTuple):
    """A run of a rendered dialog that starts at a special token."""

    message: int
    """Index of the message it renders in the list given, or -1 for template text (bos, generation prompt)."""
    reply: bool
    """Whether it is what an assistant wrote: the content and closing token of an assistant message."""
    parts: list[int | str]
    """Special-token ids and text pieces, before encoding."""


class ChatFormat:
    """Render dialogs in the Llama 3.1 chat format and parse generated assistant messages."""

    def __init__(self, tokenizer: Tokenizer, style: Literal["hf", "meta"] = "hf",
                 date_string: str = DEFAULT_DATE) -> None:
        if style not in ("hf", "meta"):
            raise HerdError(f"unknown chat style '{style}'; choose 'hf' (the Llama 3.1 HF template) or 'meta'.")
        self.tokenizer = tokenizer
        self.style = style
        self.date_string = date_string

    # -- building blocks -----------------------------------------------------------------------

    def _encode_parts(self, parts: Sequence[int | str]) -> list[int]:
        """Special ids stay ids; each run of text between them is encoded as one string."""
        out: list[int] = []
        text: list[str] = []
        for p in parts:
            if isinstance(p, str):
                text.append(p)
                continue
            if text:
                out.extend(self.tokenizer.encode("".join(text)))
                text = []
            out.append(p)
        if text:
            out.extend(self.tokenizer.encode("".join(text)))
        return out

    def _header_parts(self, role: str) -> list[int | str]:
        tok = self.tokenizer
        return [tok.start_header_id, role, tok.end_header_id, "\n\n"]

    def encode_header(self, role: str) -> list[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n` as ids."""
        return self._encode_parts(self._header_parts(role))

    def _message_parts(self, message: Mapping[str, Any], builtin_tools: Sequence[str] | None,
                       index: int = 0) -> list[int | str]:
        tok = self.tokenizer
        role = _role(message, index)
        if "tool_calls" in message and message["tool_calls"]:
            return self._tool_call_parts(message, builtin_tools, index)
        content = message.get("content")
        if role in ("ipython", "tool"):
            # The HF template JSON-encodes anything iterable, strings included ("42" -> "\"42\"").
            if self.style == "hf" and (isinstance(content, (str, Mapping, list, tuple))):
                body = _tojson(content)
            else:
                body = content if isinstance(content, str) else _tojson(content)
            return [*self._header_parts("ipython"), body, tok.eot_id]
        return [*self._header_parts(role), _text(content, index).strip(), tok.eot_id]

    def _tool_call_parts(self, message: Mapping[str, Any], builtin_tools: Sequence[str] | None,
                         index: int) -> list[int | str]:
        tok = self.tokenizer
        calls = message["tool_calls"]
        if not isinstance(calls, list) or len(calls) != 1:
            raise HerdError(f"message {index} has {len(calls) if isinstance(calls, list) else 'malformed'} "
                            "tool_calls; Llama 3.1 makes exactly one tool call per assistant message.")
        call = calls[0].get("function", calls[0]) if isinstance(calls[0], Mapping) else None
        if not isinstance(call, Mapping) or "name" not in call:
            raise HerdError(f"message {index} has a tool call without a name; use "
                            '{"type": "function", "function": {"name": ..., "arguments": {...}}}.')
        name, args = call["name"], call.get("arguments", {})
        if isinstance(args, str):  # OpenAI-style clients send arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise HerdError(f"message {index}: tool call arguments are not valid JSON; "
                                "pass a dict or a JSON object string.") from None
        parts: list[int | str] = self._header_parts("assistant")
        if builtin_tools is not None and name in builtin_tools:
            if self.style == "meta" and name == "code_interpreter":
                parts += [tok.python_tag_id, str(args.get("code", ""))]
            else:
                parts += [tok.python_tag_id,
                          name + ".call(" + ", ".join(f'{k}="{v}"' for k, v in args.items()) + ")"]
        else:
            parts.append('{"name": "' + name + '", "parameters": ' + _tojson(args) + "}")
        # ipython mode (built-in tools on): a tool call hands control to the executor -> eom
        parts.append(tok.eom_id if builtin_tools is not None else tok.eot_id)
        return parts

    def encode_message(self, message: Mapping[str, Any], builtin_tools: Sequence[str] | None = None) -> list[int]:
        """One message: header, content (stripped), `<|eot_id|>` (`<|eom_id|>` for calls in ipython mode)."""
        return self._encode_parts(self._message_parts(message, builtin_tools))

    # -- dialogs -------------------------------------------------------------------------------

    def encode_dialog_prompt(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                             tools: Sequence[Mapping[str, Any]] | None = None,
                             builtin_tools: Sequence[str] | None = None, date_string: str | None = None,
                             tools_in_user_message: bool = True, bos: bool = True) -> list[int]:
        """Token ids of a dialog; with add_generation_prompt it ends with the assistant header.

        tools: custom tool (function) schemas, shown to the model as JSON. builtin_tools: names out of
        brave_search, wolfram_alpha, photogen, code_interpreter ("Environment: ipython" mode).
        """
        return self._encode_parts(self.dialog_parts(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, builtin_tools=builtin_tools,
            date_string=date_string, tools_in_user_message=tools_in_user_message, bos=bos))

    def render(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        """The dialog as text, special tokens written out (what the HF template's string looks like)."""
        parts = self.dialog_parts(messages, **kwargs)
        return "".join(p if isinstance(p, str) else self.tokenizer.decode([p]) for p in parts)

    def dialog_parts(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[int | str]:
        """The dialog as special-token ids and text pieces, before encoding."""
        return [p for seg in self.dialog_segments(messages, **kwargs) for p in seg.parts]

    def encode_dialog_with_mask(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                                train_on: str = "assistant", train_from: int = 0,
                                **kwargs: Any) -> tuple[list[int], list[bool]]:
        """ids of a dialog (as encode_dialog_prompt) and the SFT loss mask: True on tokens to learn.

        train_on "assistant" (default): each assistant message's content and its closing
        `<|eot_id|>`/`<|eom_id|>` (so a fine-tuned model learns to stop), never headers, system, user
        or tool text. "last": only the last assistant message's. "all": every token.
        train_from: messages before this index are never learned (the prompt of a prompt/completion
        pair); "all" ignores it. Each segment starts at a special token, so encoding per segment
        gives the same ids as encoding the whole dialog.
        """
        if train_on not in TRAIN_ON:
            raise HerdError(f"unknown train_on '{train_on}'; use one of: {', '.join(TRAIN_ON)}.")
        segments = self.dialog_segments(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        replies = [s.message for s in segments if s.reply and s.message >= train_from]
        last = max(replies, default=None)
        ids: list[int] = []
        mask: list[bool] = []
        for seg in segments:
            enc = self._encode_parts(seg.parts)
            if train_on == "all":
                learn = True
            else:
                learn = seg.reply and seg.message >= train_from and (train_on == "assistant" or seg.message == last)
            ids += enc
            mask += [learn] * len(enc)
        return ids, mask

    def dialog_segments(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                        tools: Sequence[Mapping[str, Any]] | None = None,
                        builtin_tools: Sequence[str] | None = None, date_string: str | None = None,
                        tools_in_user_message: bool = True, bos: bool = True) -> list[Segment]:
        """The dialog as segments (message index, assistant-written?, parts), in order."""
        tok = self.tokenizer
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise HerdError("a dialog must be a list of {'role': ..., 'content': ...} messages.")
        for i, m in enumerate(messages):
            _role(m, i)
        msgs = list(messages)
        segments: list[Segment] = [Segment(-1, False, [tok.bos_id])] if bos else []

        def add_message(m: Mapping[str, Any], index: int) -> None:
            parts = self._message_parts(m, builtin_tools, index)
            if m["role"] == "assistant":  # header (4 parts) is prompt; the rest is the reply
                segments.extend([Segment(index, False, parts[:4]), Segment(index, True, parts[4:])])
            else:
                segments.append(Segment(index, False, parts))

        if self.style == "meta":
            for i, m in enumerate(msgs):
                add_message(m, i)
        else:
            system = ""
            if msgs and msgs[0]["role"] == "system":
                system = _text(msgs[0].get("content"), 0).strip()
                msgs = msgs[1:]
            text = ""
            if builtin_tools is not None or tools is not None:
                text += "Environment: ipython\n"
            if builtin_tools is not None:
                text += "Tools: " + ", ".join(t for t in builtin_tools if t != "code_interpreter") + "\n\n"
            text += "Cutting Knowledge Date: December 2023\n"
            text += "Today Date: " + (date_string or self.date_string) + "\n\n"
            if tools is not None and not tools_in_user_message:
                text += ("You have access to the following functions. To call a function, please respond "
                         "with JSON for a function call." + _CUSTOM_TOOLS_PROMPT)
                text += "".join(_tojson(t, indent=4) + "\n\n" for t in tools)
            offset = len(messages) - len(msgs)  # 1 when messages[0] was the system message
            segments.append(Segment(0 if offset else -1, False,
                                    [*self._header_parts("system"), text + system, tok.eot_id]))
            if tools is not None and tools_in_user_message:
                if not msgs:
                    raise HerdError("custom tools go into the first user message, but the dialog has none; "
                                    "add a user message or pass tools_in_user_message=False.")
                first = _text(msgs[0].get("content"), offset).strip()
                msgs = msgs[1:]
                segments.append(Segment(offset, False, [
                    *self._header_parts("user"),
                    "Given the following functions, please respond with a JSON for a function call "
                    "with its proper arguments that best answers the given prompt.\n\n"
                    + _CUSTOM_TOOLS_PROMPT + "".join(_tojson(t, indent=4) + "\n\n" for t in tools) + first,
                    tok.eot_id]))
                offset += 1
            for i, m in enumerate(msgs):
                add_message(m, offset + i)
        if add_generation_prompt:
            segments.append(Segment(-1, False, self._header_parts("assistant")))
        return segments

    # -- parsing replies -----------------------------------------------------------------------

    def decode_assistant_message(self, ids: Sequence[int]) -> dict[str, Any]:
        """Parse generated ids (after the assistant header) into a message dict.

        Returns {"role": "assistant", "content": text, "stop_reason": ...}, plus "tool_calls" (and
        content "") when the reply is a tool call: `<|python_tag|>name.call(k="v")` (built-in),
        `<|python_tag|>` + code (code_interpreter), or a JSON {"name", "parameters"} object (custom).
        stop_reason: "end_of_turn" (`<|eot_id|>`), "end_of_message" (`<|eom_id|>`) or "out_of_tokens".
        """
        tok = self.tokenizer
        ids = [int(i) for i in ids]
        if len(ids) >= 2 and ids[0] == tok.start_header_id and tok.end_header_id in ids:
            ids = ids[ids.index(tok.end_header_id) + 1:]  # a reply passed with its header
        stop_reason = "out_of_tokens"
        for j, i in enumerate(ids):
            if i in (tok.eot_id, tok.eom_id, tok.eos_id):
                stop_reason = "end_of_message" if i == tok.eom_id else "end_of_turn"
                ids = ids[:j]
                break
        python_tag = bool(ids) and ids[0] == tok.python_tag_id
        body = [i for i in ids if i != tok.python_tag_id]
        text = tok.decode(body)
        if text.startswith("\n\n") and not python_tag:
            text = text[2:]  # the header's blank line when the caller kept it
        stripped = text.strip()
        call = _parse_custom_call(stripped)
        if call is None and python_tag:
            call = _parse_builtin_call(stripped)
        message: dict[str, Any] = {"role": "assistant", "content": "" if call else text,
                                   "stop_reason": stop_reason}
        if call is not None:
            message["tool_calls"] = [{"type": "function", "function": call}]
        return message


def _role(message: Any, index: int) -> str:
    if not isinstance(message, Mapping) or "role" not in message:
        raise HerdError(f"message {index} is not a {{'role': ..., 'content': ...}} dict; fix the dialog.")
    role = message["role"]
    if role not in ROLES:
        raise HerdError(f"message {index} has unknown role '{role}'; use one of: {', '.join(ROLES)}.")
    return role


def _text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if not isinstance(content, str):
        raise HerdError(f"message {index} has {type(content).__name__} content; Llama 3 text messages take a string.")
    return content


def _parse_custom_call(text: str) -> dict[str, Any] | None:
    """{"name": ..., "parameters"|"arguments": {...}} or <function=name>{...}</function>, else None."""
    m = _FUNCTION_TAG.match(text)
    if m:
        try:
            args = json.loads(m.group(2))
        except json.JSONDecodeError:
            return None
        return {"name": m.group(1), "arguments": args} if isinstance(args, dict) else None
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def _parse_builtin_call(text: str) -> dict[str, Any]:
    """`name.call(k="v", ...)` -> {"name", "arguments"}; anything else after <|python_tag|> is code."""
    m = _BUILTIN_CALL.match(text)
    if m:
        try:
            call = ast.parse(f"f({m.group(2)})", mode="eval").body
            if isinstance(call, ast.Call) and not call.args:
                args = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
                if all(k is not None for k in args):
                    return {"name": m.group(1), "arguments": args}
        except (SyntaxError, ValueError):
            pass
    return {"name": "code_interpreter", "arguments": {"code": text}}
