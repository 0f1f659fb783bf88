"""One chat record -> token ids and a per-token loss mask, in herd's Llama 3 chat format.

Record formats (TRL's, so data prepared for TRL's SFTTrainer works unchanged):

    {"messages": [{"role": "system"|"user"|"assistant"|"ipython"|"tool", "content": ...}, ...],
     "tools": [...function schemas...]}                        conversational
    {"prompt": [messages], "completion": [messages]}           conversational prompt/completion
    {"prompt": "text", "completion": "text"}                   prompt/completion strings

Assistant tool calls use {"role": "assistant", "tool_calls": [{"type": "function", "function":
{"name", "arguments"}}]}; tool results the role "tool" or "ipython" (herd.tokenizer.chat renders
both as Llama 3.1's ipython turn). Content may also be a list of {"type": "text", "text"} parts
(OpenAI style), which are joined. A "tools" field may be a list or a JSON string (parquet); the hf
chat style shows the schemas to the model as Llama 3.1's template does, the meta style (Meta's
plain dialog format, which has no place for them) renders the messages only.

What is learned (the mask), by `train_on`:
  assistant  each assistant reply: its content and closing <|eot_id|> / <|eom_id|> (default)
  last       only the last assistant reply
  all        every token
The prompt of a prompt/completion pair is never learned (except with "all"). Prompt/completion
strings become a user turn and an assistant reply (text_pairs="chat"), or raw text
`<|begin_of_text|>` prompt completion `<|end_of_text|>` with the completion and the end token
learned (text_pairs="text", for base-model data; TRL's non-conversational format).

A record that cannot be rendered raises RecordError with a reason from herd.posttrain.report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from herd.errors import HerdError
from herd.tokenizer.chat import ROLES, TRAIN_ON, ChatFormat

TEXT_PAIRS = ("chat", "text")


class RecordError(Exception):
    """A record that is dropped: `reason` is a key of herd.posttrain.report.REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Conversation:
    """A record in one shape: messages to render (or a raw text pair) and where learning starts."""

    messages: list[dict[str, Any]]
    """The dialog (prompt messages first for a prompt/completion pair)."""
    train_from: int = 0
    """Index of the first message that may be learned (the completion's, for pairs)."""
    tools: list[Any] | None = None
    """Custom tool schemas shown to the model (the chat template's `tools`)."""
    text: tuple[str, str] | None = None
    """(prompt, completion) rendered as raw text without the chat format (text_pairs="text")."""


def _content(content: Any, index: int) -> Any:
    """OpenAI-style [{"type": "text", "text": ...}, ...] content joined into one string; others unchanged."""
    if isinstance(content, list) and content and all(isinstance(p, dict) and "type" in p for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise RecordError("bad_messages", f"message {index} has non-text content parts; herd trains on text only")
        return "".join(p["text"] for p in content)
    return content


def parse_messages(value: Any, what: str, offset: int = 0) -> list[dict[str, Any]]:
    """A record field as a list of message dicts (content parts joined, unset fields dropped), or RecordError.

    what: the field's name for the error; offset: index of the first message (for the error).
    """
    if not isinstance(value, list):
        raise RecordError("bad_messages", f"'{what}' is a {type(value).__name__}, not a list of messages")
    out = []
    for i, m in enumerate(value, offset):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RecordError("bad_messages", f"message {i} is not a {{'role': ..., 'content': ...}} dict")
        if m["role"] not in ROLES:
            raise RecordError("unknown_role", f"message {i} has role '{m['role']}'")
        m = {k: v for k, v in m.items() if v is not None}  # parquet structs carry every field, unset ones None
        if "content" in m:
            m["content"] = _content(m["content"], i)
        out.append(m)
    return out


def parse_tools(record: dict[str, Any]) -> list[Any] | None:
    """A record's "tools" (a list, or a JSON string as parquet stores it), None when absent or empty."""
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RecordError("bad_messages", "'tools' is a string that is not JSON") from None
    if tools is not None and not isinstance(tools, list):
        raise RecordError("bad_messages", f"'tools' is a {type(tools).__name__}, not a list of function schemas")
    return tools or None


def to_conversation(record: dict[str, Any], text_pairs: str = "chat") -> Conversation:
    """The Conversation a record describes, or RecordError (unknown_format, bad_messages, unknown_role)."""
    tools = parse_tools(record)
    if record.get("messages") is not None:
        messages = parse_messages(record["messages"], "messages")
        if not messages:
            raise RecordError("no_assistant_turn", "'messages' is empty")
        return Conversation(messages, 0, tools)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str) and text_pairs == "text":
            return Conversation([], 0, None, (prompt, completion))
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        prompt = parse_messages(prompt, "prompt")
        return Conversation(prompt + parse_messages(completion, "completion", len(prompt)), len(prompt), tools)
    keys = ", ".join(sorted(map(str, record))[:6]) or "none"
    hint = ""
    if "chosen" in record or "rejected" in record:
        hint = "; it looks like preference data (for DPO / reward models)"
    elif "text" in record:
        hint = "; it looks like plain text (pre-training data)"
    raise RecordError("unknown_format", f"fields {keys}{hint}")


def render(conv: Conversation, chat: ChatFormat, train_on: str = "assistant") -> tuple[list[int], list[bool]]:
    """Token ids and loss mask (True = learned) of a conversation; RecordError if nothing can be learned."""
    if train_on not in TRAIN_ON:
        raise HerdError(f"unknown train_on '{train_on}'; use one of: {', '.join(TRAIN_ON)}.")
    tok = chat.tokenizer
    if conv.text is not None:
        prompt, completion = conv.text
        head = [tok.bos_id] + tok.encode(prompt)
        tail = tok.encode(completion) + [tok.eos_id]
        return head + tail, [train_on == "all"] * len(head) + [True] * len(tail)
    if train_on != "all" and not any(m["role"] == "assistant" for m in conv.messages[conv.train_from:]):
        where = "in the completion" if conv.train_from else "in the dialog"
        raise RecordError("no_assistant_turn", f"no assistant message {where}")
    try:
        return chat.encode_dialog_with_mask(conv.messages, train_on=train_on, train_from=conv.train_from,
                                            tools=conv.tools)
    except HerdError as e:  # wrong content types, malformed tool calls
        raise RecordError("bad_messages", str(e).rstrip(".")) from None
