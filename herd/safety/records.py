"""Guard data records: a conversation to check and, for evaluation and training, its label.

One JSON object per line (jsonl, .gz/.zst, json arrays and parquet also read):

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}   TRL's chat format
    {"prompt": "...", "response": "..."}       a prompt and, optionally, the reply to check
                                               ("completion" is read as the reply too)

Optional fields: "id" (copied to the output), "role" ("User" to classify the prompt, "Agent" the
reply; default: the last message's), and the label: "label" ("safe" or "unsafe", or a boolean
"unsafe") with "categories" (codes such as ["S1", "S10"], or "S1,S10"); categories alone mean
unsafe. A label that names a code the guard does not have, or calls a conversation safe and
names categories, is an error of that record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_ROLE_ALIASES = {"user": "User", "prompt": "User", "agent": "Agent", "assistant": "Agent", "response": "Agent"}


class GuardRecordError(ValueError):
    """A record that cannot be used; `reason` is a short key for the summary."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class GuardRecord:
    """One conversation to check, with its label when it has one."""

    messages: list[dict[str, Any]]
    role: str | None = None
    unsafe: bool | None = None
    """The label: True unsafe, False safe, None unlabelled."""
    categories: list[str] = field(default_factory=list)
    id: Any = None


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise GuardRecordError("bad_record", f"'{name}' is a {type(value).__name__}, not text")
    return value


def to_guard_record(record: Any, codes: list[str] | None = None) -> GuardRecord:
    """The GuardRecord a JSON object describes, or GuardRecordError. codes: the guard's category codes,
    to check labels against."""
    if not isinstance(record, Mapping):
        raise GuardRecordError("bad_record", f"a JSON {type(record).__name__}, not an object")
    if record.get("messages") is not None:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise GuardRecordError("bad_record", "'messages' must be a non-empty list of {'role', 'content'} objects")
        messages = [dict(m) if isinstance(m, Mapping) else m for m in messages]
    elif record.get("prompt") is not None:
        messages = [{"role": "user", "content": _text(record["prompt"], "prompt")}]
        reply = record.get("response", record.get("completion"))
        if reply is not None:
            messages.append({"role": "assistant", "content": _text(reply, "response")})
    else:
        keys = ", ".join(sorted(map(str, record))[:6]) or "none"
        raise GuardRecordError("unknown_format", f"fields {keys}; give 'messages' or 'prompt' (and 'response')")
    role = record.get("role")
    if role is not None:
        if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
            raise GuardRecordError("bad_record", f"'role' {role!r} must be User (the prompt) or Agent (the reply)")
        role = _ROLE_ALIASES[role.lower()]
    out = GuardRecord(messages, role, id=record.get("id"))
    label, cats = record.get("label"), record.get("categories")
    if "unsafe" in record and label is None:
        if not isinstance(record["unsafe"], bool):
            raise GuardRecordError("bad_label", "'unsafe' must be true or false")
        label = "unsafe" if record["unsafe"] else "safe"
    if isinstance(cats, str):
        cats = [c for c in cats.split(",")]
    if cats is not None:
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise GuardRecordError("bad_label", "'categories' must be a list of codes such as [\"S1\", \"S10\"]")
        out.categories = list(dict.fromkeys(c.strip().upper() for c in cats if c.strip()))
    if label is not None:
        if not isinstance(label, str) or label.strip().lower() not in ("safe", "unsafe"):
            raise GuardRecordError("bad_label", f"'label' {label!r} must be \"safe\" or \"unsafe\"")
        out.unsafe = label.strip().lower() == "unsafe"
    elif out.categories:
        out.unsafe = True
    if out.unsafe is False and out.categories:
        raise GuardRecordError("bad_label", f"labelled safe but names categories {', '.join(out.categories)}")
    if codes is not None:
        unknown = [c for c in out.categories if c not in codes]
        if unknown:
            raise GuardRecordError("bad_label", f"categories {', '.join(unknown)} are not the guard's "
                                                f"({', '.join(codes)})")
    return out
