"""DataReport: what reading chat data did with each record, counted by reason, with examples.

Bad records never stop a run and are never lost silently: each one is counted under a reason,
and the first few of each reason keep their file:line and what was wrong, so the report says
where to look. When no usable example remains, `nothing_usable` turns the counts into the one
HerdError a user sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from herd.errors import HerdError

MAX_SAMPLES = 5
"""Records kept per reason, with file:line and detail, for the report."""

REASONS: dict[str, str] = {
    # files
    "unreadable_files": "a file that cannot be opened, decompressed or parsed as parquet (records read before the failure are kept)",
    "skipped_files": "a file in a data folder that is neither jsonl(.gz/.zst), json nor parquet",
    # records, dropped
    "malformed_json": "a line that is not a JSON object",
    "unknown_format": "a record with neither 'messages' nor 'prompt' + 'completion'",
    "unknown_role": "a message whose role is not system, user, assistant, ipython or tool",
    "bad_messages": "messages that are not a list of {'role', 'content'} dicts, or content / tool calls of the wrong type",
    "no_assistant_turn": "nothing to learn: no assistant message (after the prompt of a prompt/completion pair)",
    "too_long": "longer than max_seq_len tokens (overlong=drop)",
    "nothing_left_after_truncation": "truncated to max_seq_len, no learned token was left",
}


@dataclass
class DataReport:
    """Counts of what was read, kept, truncated and dropped (and why)."""

    files: int = 0
    """Data files read."""
    records: int = 0
    """Records seen: jsonl lines that are not blank, JSON array items, parquet rows."""
    kept: int = 0
    """Records that became examples (train + val)."""
    train: int = 0
    """Examples in the training split."""
    val: int = 0
    """Examples held out for validation."""
    truncated: int = 0
    """Kept examples cut to max_seq_len tokens."""
    tokens: int = 0
    """Tokens of every kept example."""
    trained_tokens: int = 0
    """Tokens the loss learns (targets under the loss mask)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Dropped records (and problem files) by reason."""
    samples: dict[str, list[str]] = field(default_factory=dict)
    """The first few 'file:line: detail' of each reason."""
    reasons: ClassVar[dict[str, str]] = REASONS
    """What each reason means (a subclass for other kinds of data adds its own)."""
    kind: ClassVar[str] = "SFT example"
    formats: ClassVar[str] = "TRL's conversational {'messages': [...]} or {'prompt', 'completion'} format"
    """What an example is and the formats that make one, for the nothing-usable error."""

    def count(self, reason: str, where: str, detail: str = "") -> None:
        """Record one dropped record (or problem file) under `reason`."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        kept = self.samples.setdefault(reason, [])
        if len(kept) < MAX_SAMPLES:
            kept.append(f"{where}: {detail}" if detail else where)

    @property
    def dropped_records(self) -> int:
        return sum(n for r, n in self.dropped.items() if not r.endswith("_files"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A few human-readable lines (the reasons, with an example each)."""
        lines = [f"read {self.records:,} records from {self.files} file(s): kept {self.kept:,} "
                 f"({self.train:,} train, {self.val:,} val), truncated {self.truncated:,}, "
                 f"dropped {self.dropped_records:,}; {self.tokens:,} tokens, {self.trained_tokens:,} learned"]
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            example = self.samples.get(reason, [""])[0]
            lines.append(f"  {reason}: {n:,} - {self.reasons.get(reason, reason)}" + (f" (e.g. {example})" if example else ""))
        return "\n".join(lines)

    def nothing_usable(self, what: str) -> HerdError:
        """The one-line error for data with no usable example, naming the commonest reasons."""
        if not self.records:
            why = "no record was read"
            if self.dropped:
                why += " (" + "; ".join(f"{n} {r}, e.g. {self.samples[r][0]}" for r, n in self.dropped.items()) + ")"
        else:
            top = sorted(self.dropped.items(), key=lambda kv: -kv[1])[:3]
            why = f"all {self.records:,} records were dropped: " + "; ".join(
                f"{n:,} {r} ({self.reasons.get(r, r)}; e.g. {self.samples[r][0]})" for r, n in top)
        return HerdError(f"no usable {self.kind} in {what}: {why}; fix the data, or pass files of {self.formats}.")
