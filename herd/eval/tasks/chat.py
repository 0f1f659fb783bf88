"""Chat tasks scored by a checker: a fine-tuned model's greedy replies to chat prompts.

- arithmetic:PATH  prompts from herd.posttrain.arithmetic (`python -m herd.posttrain.arithmetic
  prompts|recipe ...`, or any records whose last user turn asks "What is A + B?" / "A - B"), each
  rendered in the chat format (`--chat-style`, the one the model was fine-tuned with) and answered
  greedily until the end of the turn; `correct` is the share of replies that state the right result
  (herd.posttrain.arithmetic.is_correct), `formatted` the share that state any result ("= N").

This is the "share of correct answers on held-out prompts" of the post-training recipe: the same
number before SFT, after SFT, after rejection sampling and after DPO.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.eval.tasks.base import GenItem, Task, TaskOptions, register_prefix


class ArithmeticChat(Task):
    """Greedy chat replies to arithmetic questions, checked exactly."""

    kind = "generate"
    metrics = ("correct", "formatted")

    def __init__(self, name: str, docs: list[dict[str, Any]], source: str):
        super().__init__(name, source, 0)
        self.docs = docs

    def items(self, limit: int = 0) -> list[GenItem]:
        docs = self.docs[:limit] if limit else self.docs
        return [GenItem(d["id"], d["messages"][-1]["content"], [], d["messages"], max_tokens=32, messages=d["messages"])
                for d in docs]

    def score(self, item: GenItem, completion: str) -> dict[str, float]:
        from herd.posttrain.arithmetic import is_correct, stated_result

        return {"correct": float(bool(is_correct(item.reference, completion))),
                "formatted": float(stated_result(completion) is not None)}


@register_prefix("arithmetic", "greedy chat replies to herd.posttrain.arithmetic prompts (jsonl), share correct")
def _arithmetic(arg: str, opts: TaskOptions) -> list[Task]:
    from herd.eval.data import read_records
    from herd.posttrain.arithmetic import parse_question

    path = Path(arg)
    if not path.is_file():
        raise HerdError(f"arithmetic:{arg}: {path} does not exist; write prompts with "
                        "`python -m herd.posttrain.arithmetic prompts FILE` (or its `recipe` kind).")
    docs = []
    for i, row in enumerate(read_records(path)):
        messages = row.get("messages") or row.get("prompt")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            raise HerdError(f"arithmetic:{arg}: record {i} has no 'messages' (or 'prompt') chat turns.")
        if messages[-1].get("role") == "assistant":  # an SFT record: ask its question, drop the answer
            messages = messages[:-1]
        if not messages or parse_question(str(messages[-1].get("content", ""))) is None:
            raise HerdError(f"arithmetic:{arg}: record {i}'s last user turn is not a 'What is A + B?' question.")
        docs.append({"id": str(row.get("id", i)), "messages": messages})
    if not docs:
        raise HerdError(f"arithmetic:{arg}: no prompts in {path}.")
    return [ArithmeticChat(f"arithmetic:{path.name}", docs, str(path))]
