"""Sampled chat replies on held-out prompts: what a post-training loop shows at each evaluation.

    prompts = heldout_prompts(data.val, tokenizer, n=3)       # from rendered examples
    replies = chat_replies(model, tokenizer, prompts, max_new_tokens=64)
    for r in replies: print(r.format())     # the question, the reply, and whether it ended with <|eot_id|>

A held-out prompt is a rendered example cut right after its last assistant header
(`<|start_header_id|>assistant<|end_header_id|>\\n\\n`): exactly what the chat format feeds a model
before it answers, in whichever chat style the data was rendered; the cut-off reply is kept as
the reference. Replies are greedy (temperature 0) and stop at <|eot_id|>, <|eom_id|> or
<|end_of_text|>; a reply that runs out of tokens has no stop. A fine-tuned chat model should end
its turn with <|eot_id|>, which a base model never learned to do, so `ended_with_eot` is the first
sign that fine-tuning took.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from herd.train.artifacts import greedy_generate


@dataclass
class HeldoutPrompt:
    """A prompt cut from a rendered example, with the reply the data gives."""

    ids: list[int]
    """Token ids up to and including the last assistant header."""
    question: str
    """The last user (or tool) message, for display."""
    reference: str
    """The reply in the data (the text after the cut, up to its end token)."""


@dataclass
class Reply:
    """One sampled reply."""

    question: str
    text: str
    """The decoded reply, without its stop token."""
    stop: str
    """The special token that ended it (<|eot_id|>, <|eom_id|>, <|end_of_text|>), or '' if it ran out of tokens."""
    reference: str
    tokens: int
    """Generated tokens (without the stop token)."""

    @property
    def ended_with_eot(self) -> bool:
        return self.stop == "<|eot_id|>"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ended_with_eot": self.ended_with_eot}

    def format(self, width: int = 100) -> str:
        """Two lines: the question, then the reply and how it ended."""
        q = self.question.replace("\n", " ")
        q = q if len(q) <= width else q[:width - 3] + "..."
        end = f"ended with {self.stop}" if self.stop else f"no end token after {self.tokens} tokens"
        return f"  Q: {q}\n  A: {self.text!r} ({end})"


def _find_last(ids: Sequence[int], pattern: Sequence[int]) -> int:
    """Index just past the last occurrence of `pattern` in ids, or -1."""
    n = len(pattern)
    for i in range(len(ids) - n, -1, -1):
        if list(ids[i:i + n]) == list(pattern):
            return i + n
    return -1


def _last_turn(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of the last non-assistant message in rendered ids (user, tool or system)."""
    tok = tokenizer
    starts = [i for i, t in enumerate(ids) if t == tok.start_header_id]
    for s in reversed(starts):
        try:
            end_header = list(ids).index(tok.end_header_id, s)
        except ValueError:
            continue
        role = tok.decode(list(ids[s + 1:end_header]))
        if role == "assistant":
            continue
        body = list(ids[end_header + 1:])
        if tok.eot_id in body:
            body = body[:body.index(tok.eot_id)]
        return tok.decode(body).strip()
    return tok.decode(list(ids[-32:]))


def heldout_prompts(dataset: Any, tokenizer: Any, n: int) -> list[HeldoutPrompt]:
    """Prompts from the first `n` examples of an SFTDataset that have an assistant header."""
    from herd.tokenizer.chat import ChatFormat

    header = ChatFormat(tokenizer).encode_header("assistant")
    out: list[HeldoutPrompt] = []
    stops = {tokenizer.eot_id, tokenizer.eom_id, tokenizer.eos_id}
    for i in range(len(dataset)):
        if len(out) >= n:
            break
        ids, _ = dataset.example(i)
        ids = np.asarray(ids).tolist()
        cut = _find_last(ids, header)
        if cut < 0:
            continue
        ref = ids[cut:]
        end = next((j for j, t in enumerate(ref) if t in stops), len(ref))
        out.append(HeldoutPrompt(ids[:cut], _last_turn(tokenizer, ids[:cut]), tokenizer.decode(ref[:end])))
    return out


@torch.no_grad()
def chat_replies(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[HeldoutPrompt],
                 max_new_tokens: int) -> list[Reply]:
    """Greedy replies to `prompts` (all ranks call this under torchrun; every rank gets the replies)."""
    if not prompts:
        return []
    limit = model.args.max_seq_len - max_new_tokens if hasattr(model, "args") else None
    ids = [p.ids[-limit:] if limit and limit > 0 else p.ids for p in prompts]  # keep the end: the question
    stops = {tokenizer.eot_id: "<|eot_id|>", tokenizer.eom_id: "<|eom_id|>", tokenizer.eos_id: "<|end_of_text|>"}
    results = greedy_generate(model, ids, max_new_tokens, list(stops))
    return [Reply(p.question, tokenizer.decode(new), stops.get(stop, "") if stop is not None else "", p.reference,
                  len(new)) for p, (new, stop) in zip(prompts, results)]
