"""Reading a guard's answer: `safe`, or `unsafe` and its categories; anything else is unparseable.

The answer format is the prompt's own instruction: "First line must read 'safe' or 'unsafe'. If
unsafe, a second line must include a comma-separated list of violated categories" (e.g.
`unsafe\\nS1,S10`). Tolerated: whitespace around the answer, around each line and around the
codes (`unsafe \\n S1, S10`), Windows line ends, upper or lower case, a repeated code. `unsafe`
without a second line is unsafe with no category named. Everything else (an empty answer,
`safe` followed by more text, a third line, `S1;S2`, prose) is `unparseable`, and unparseable is
never safe: GuardResult.flagged treats it as flagged.

The score (herd.safety.classifier) is the probability of `unsafe` as the first generated token,
as the Llama Guard 2 and 3 model cards define the classifier score ("we look at the probability
for the first token, and use that as the 'unsafe' class probability"), with a threshold (the
model card's evaluation uses 0.5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

_CODE = re.compile(r"^[A-Za-z]{1,3}\d{1,3}$")

Verdict = Literal["safe", "unsafe", "unparseable"]


@dataclass
class ParsedReply:
    """A guard's answer as read."""

    verdict: Verdict
    """safe, unsafe, or unparseable (not in the format the prompt asks for)."""
    categories: list[str] = field(default_factory=list)
    """The codes named on the second line, in order, each once (upper case)."""
    text: str = ""
    """The answer as generated."""


def parse_guard_output(text: str) -> ParsedReply:
    """Read a guard's generated text (without its end-of-turn token)."""
    lines = [line.strip() for line in text.strip().replace("\r\n", "\n").split("\n")]
    head = lines[0].lower()
    if head == "safe" and len(lines) == 1:
        return ParsedReply("safe", [], text)
    if head != "unsafe":
        return ParsedReply("unparseable", [], text)
    if len(lines) == 1:
        return ParsedReply("unsafe", [], text)
    if len(lines) > 2:
        return ParsedReply("unparseable", [], text)
    codes = [c.strip().upper() for c in lines[1].split(",")]
    if not all(_CODE.match(c) for c in codes):
        return ParsedReply("unparseable", [], text)
    return ParsedReply("unsafe", list(dict.fromkeys(codes)), text)


@dataclass
class GuardResult:
    """The guard's judgement of one conversation."""

    verdict: Verdict
    """What the generated text says: safe, unsafe or unparseable."""
    categories: list[str]
    """Codes of the violated categories the guard named (empty when safe)."""
    score: float | None
    """Probability of `unsafe` as the first generated token (None when not computed)."""
    text: str = ""
    """The generated answer."""
    role: str = "User"
    """What was checked: User (the prompt) or Agent (the reply)."""

    def flagged(self, threshold: float | None = 0.5) -> bool:
        """Whether to treat the conversation as unsafe.

        With a threshold and a score: score >= threshold (the model card's classifier). Without: the
        text's verdict. Unparseable answers are always flagged: they are never taken as safe.
        """
        if self.verdict == "unparseable":
            return True
        if threshold is not None and self.score is not None:
            return self.score >= threshold
        return self.verdict == "unsafe"

    def to_dict(self, threshold: float | None = 0.5) -> dict:
        return {"flagged": self.flagged(threshold), "verdict": self.verdict, "categories": self.categories,
                "score": None if self.score is None else round(self.score, 6), "role": self.role,
                "output": self.text}
