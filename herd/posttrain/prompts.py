"""Prompts for on-policy training: records -> chat messages + token ids, split into train and held-out.

A record is TRL's prompt-only form: {"prompt": "text"} or {"prompt": [messages]}, or a chat
{"messages": [...]} whose trailing assistant turn, if any, is dropped (so SFT data doubles as
prompts). Held-out prompts are chosen by the same stable hash of the record's "id" (or its JSON)
as the SFT validation split (herd.data.pack.is_validation), so a record is held out in every run
with the same seed. What was read, kept and dropped is counted in a DataReport.

    prompts = build_prompts(["prompts.jsonl"], chat, max_prompt_len=512, val_fraction=0.1, seed=0)
    prompts.train[0].messages, prompts.train[0].ids
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from herd.data.pack import is_validation
from herd.errors import HerdError
from herd.posttrain.dataset import record_key
from herd.posttrain.records import data_files, iter_records
from herd.posttrain.render import RecordError, parse_messages
from herd.posttrain.report import REASONS, DataReport
from herd.tokenizer.chat import ChatFormat

PROMPT_REASONS = {
    **REASONS,
    "no_prompt": "a record with no prompt to reply to: no 'prompt' (string or messages) or 'messages', malformed "
                 "messages, or no user turn at the end",
    "too_long": "a prompt longer than --max-prompt-len tokens",
}


@dataclass
class PromptReport(DataReport):
    """DataReport for prompt data (no learned tokens: `tokens` counts prompt tokens)."""

    reasons: ClassVar[dict[str, str]] = PROMPT_REASONS
    kind: ClassVar[str] = "prompt"
    formats: ClassVar[str] = "{'prompt': 'text' or [messages]} or {'messages': [...]} records"

    def format(self) -> str:
        lines = super().format().splitlines()
        lines[0] = (f"read {self.records:,} prompt records from {self.files} file(s): kept {self.kept:,} "
                    f"({self.train:,} train, {self.val:,} held out), dropped {self.dropped_records:,}; "
                    f"{self.tokens:,} prompt tokens")
        return "\n".join(lines)


@dataclass
class Prompt:
    """One prompt: its chat messages (what a reward function sees) and rendered ids (ending with the assistant header)."""

    messages: list[dict[str, Any]]
    ids: list[int]


@dataclass
class PromptSet:
    train: list[Prompt]
    heldout: list[Prompt]
    report: PromptReport

    def fingerprint(self) -> str:
        """sha256 of the training prompts' ids (a resume must see the same prompts)."""
        h = hashlib.sha256()
        for p in self.train:
            h.update(json.dumps(p.ids).encode())
        return h.hexdigest()


def prompt_messages(record: Any) -> list[dict[str, Any]]:
    """The prompt a record asks for, as chat messages (RecordError if it holds none to reply to).

    {"messages": [...]} with its trailing assistant turns dropped (SFT data doubles as prompts), or
    {"prompt": "text" | [messages]}; the prompt must end with a user (or tool / ipython) turn.
    """
    if not isinstance(record, dict):
        raise RecordError("bad_record", f"a JSON {type(record).__name__}, not an object")
    if record.get("messages") is not None:
        messages = parse_messages(record["messages"], "messages")
    elif "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RecordError("no_prompt", "'prompt' is empty")
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = parse_messages(prompt, "prompt")
    else:
        raise RecordError("no_prompt", f"no 'messages' or 'prompt' (fields {', '.join(sorted(map(str, record))[:6])})")
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] not in ("user", "ipython", "tool"):
        raise RecordError("no_prompt", "the prompt does not end with a user (or tool) turn to reply to")
    return messages


def build_prompts(paths: Sequence[str], chat: ChatFormat, max_prompt_len: int, val_fraction: float,
                  seed: int = 0) -> PromptSet:
    """Read and render every prompt of `paths`; HerdError when no training prompt is left."""
    report = PromptReport()
    train: list[Prompt] = []
    heldout: list[Prompt] = []
    for where, record in iter_records(data_files(list(paths), report), report):
        try:
            messages = prompt_messages(record)
        except RecordError as e:  # every way a record fails to be a prompt is counted as one reason
            report.count("no_prompt", where, e.detail)
            continue
        ids = chat.encode_dialog_prompt(messages, add_generation_prompt=True)
        if len(ids) > max_prompt_len:
            report.count("too_long", where, f"{len(ids)} tokens > --max-prompt-len {max_prompt_len}")
            continue
        report.tokens += len(ids)
        held = is_validation(record_key(record), val_fraction, seed)
        (heldout if held else train).append(Prompt(messages, ids))
    report.train, report.val = len(train), len(heldout)
    report.kept = report.train + report.val
    what = ", ".join(map(str, paths))
    if not report.kept:
        raise report.nothing_usable(what)
    if not train:
        raise HerdError(f"all {report.kept} prompts of {what} fell into the held-out split; lower --val-fraction "
                        "or add prompts.")
    return PromptSet(train, heldout, report)
