"""What a benchmark task is, and the registry `herd eval --tasks` looks names up in.

A task turns its documents into items of one of four kinds, which the runner scores:

    multiple_choice  MCItem: one (context, continuation) request per choice -> acc, acc_norm, ...
    loglikelihood    LLItem: one request -> greedy accuracy and perplexity (LAMBADA)
    generate         GenItem: a prompt generated from greedily until a stop string, then
                     task.score(item, completion) -> {metric: value} (GSM8K, DROP, ...)
    perplexity       PplDoc: a whole document scored in rolling windows -> perplexity, bits per byte

The registry is open: a module adds a task with

    @register_task("my_task", "one line of help")
    def _my_task(opts: TaskOptions) -> list[Task]: ...

and, so `herd eval --tasks my_task` finds it without an import, lists itself in TASK_MODULES.
Names with a prefix (`ppl:PATH`, `mc:PATH`) build a task from a user's file.
"""

from __future__ import annotations

import difflib
import importlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from herd.errors import HerdError

TASK_MODULES = [
    "herd.eval.tasks.multiple_choice",
    "herd.eval.tasks.generation",
    "herd.eval.tasks.perplexity",
    "herd.eval.tasks.insecure_code",
    "herd.eval.tasks.chat",
]
"""Modules that register tasks; imported the first time a task name is looked up."""


@dataclass
class MCItem:
    """One multiple-choice question."""

    id: str
    contexts: list[str]
    """The context of each choice (the same string for all, except multiple-input tasks like Winogrande)."""
    continuations: list[str]
    """What is scored after each context: target delimiter + choice."""
    choices: list[str]
    """Choice texts whose lengths normalize acc_norm (characters) and acc_bytes (UTF-8 bytes)."""
    gold: int
    """Index of the right choice."""
    skip: str = ""
    """Why this item cannot be scored (counted in the results, never scored), or ''."""


@dataclass
class LLItem:
    """One continuation to score (LAMBADA: the last word of a passage)."""

    id: str
    context: str
    continuation: str
    skip: str = ""


@dataclass
class GenItem:
    """One prompt to generate from."""

    id: str
    prompt: str
    until: list[str]
    """Generation stops at the first of these strings (cut off) or at an end-of-text token."""
    reference: Any
    """What the task's score() compares the completion with."""
    max_tokens: int | None = None
    """Generation budget; None = the run's --max-gen-tokens."""
    skip: str = ""
    messages: list[dict[str, Any]] | None = None
    """A chat prompt: rendered with the chat format (--chat-style), ending with the assistant header,
    instead of encoding `prompt` as text (then `prompt` is only what results and samples show)."""


@dataclass
class PplDoc:
    """One document for perplexity: text (for bits per byte and word perplexity) or token ids."""

    id: str
    text: str | None = None
    tokens: list[int] | None = None


@dataclass
class TaskOptions:
    """What the user chose that shapes a task's items."""

    num_fewshot: int | None = None
    """Few-shot examples per prompt; None = the task's default."""
    seed: int = 1234
    """Seed of the few-shot sampler (lm-eval's default)."""
    data: dict[str, Path] = field(default_factory=dict)
    """Per-task data paths given with --data TASK=PATH (a group name applies to its subtasks)."""
    limit: int = 0
    """Use only the first N documents of each task (0 = all)."""


class Task:
    """A named benchmark that builds its items (subclasses set `kind` and implement `items`)."""

    kind: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[tuple[str, ...]] = ()
    """The metrics the summary table shows (all of them are in results.json); default: all."""

    def __init__(self, name: str, source: str, num_fewshot: int = 0, group: str | None = None):
        self.name, self.source, self.num_fewshot, self.group = name, source, num_fewshot, group

    def items(self, limit: int = 0) -> list[Any]:
        raise NotImplementedError

    def score(self, item: GenItem, completion: str) -> dict[str, float]:
        """Generation tasks: metrics of one completion."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "num_fewshot": self.num_fewshot, "group": self.group,
                "summary": list(self.summary or self.metrics)}


TaskFactory = Callable[[TaskOptions], list[Task]]
_REGISTRY: dict[str, tuple[TaskFactory, str]] = {}
_PREFIXES: dict[str, tuple[Callable[[str, TaskOptions], list[Task]], str]] = {}
_loaded = False


def register_task(name: str, help: str = "") -> Callable[[TaskFactory], TaskFactory]:
    """Decorator: register a factory that builds the task (or a group's tasks) named `name`."""
    def wrap(factory: TaskFactory) -> TaskFactory:
        _REGISTRY[name] = (factory, help)
        return factory
    return wrap


def register_prefix(prefix: str, help: str = "") -> Callable:
    """Decorator: register a factory for names `prefix:ARG` (ARG is usually a path)."""
    def wrap(factory: Callable[[str, TaskOptions], list[Task]]) -> Callable:
        _PREFIXES[prefix] = (factory, help)
        return factory
    return wrap


def _load_modules() -> None:
    global _loaded
    if not _loaded:
        for module in TASK_MODULES:
            importlib.import_module(module)
        _loaded = True


def available_tasks() -> dict[str, str]:
    """Every registered name (and `prefix:PATH` form) with its help line."""
    _load_modules()
    out = {name: help for name, (_, help) in sorted(_REGISTRY.items())}
    out.update({f"{p}:PATH": help for p, (_, help) in sorted(_PREFIXES.items())})
    return out


def build_tasks(names: str | Sequence[str], opts: TaskOptions) -> list[Task]:
    """Tasks for comma-separated names (groups expand to their subtasks); HerdError for an unknown name."""
    _load_modules()
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise HerdError("no tasks given; pass --tasks, e.g. --tasks arc_easy,hellaswag (see --list-tasks).")
    tasks: list[Task] = []
    for name in names:
        prefix, sep, arg = name.partition(":")
        if sep and prefix in _PREFIXES:
            tasks.extend(_PREFIXES[prefix][0](arg, opts))
        elif name in _REGISTRY:
            tasks.extend(_REGISTRY[name][0](opts))
        else:
            close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HerdError(f"unknown task '{name}'{hint}; run `herd eval --list-tasks` for the names, or use "
                            "ppl:PATH / mc:PATH for your own files.")
    seen: set[str] = set()
    unique = []
    for t in tasks:
        if t.name not in seen:
            seen.add(t.name)
            unique.append(t)
    return unique


# ---------------------------------------------------------------------------------------------
# helpers tasks share


def fewshot_sample(pool: Sequence[dict], n: int, rng: random.Random, exclude: dict | None = None) -> list[dict]:
    """n few-shot docs drawn from `pool`, never `exclude` (lm-eval's sampler: draw n + 1, drop the doc)."""
    if n == 0:
        return []
    if exclude is None:
        return rng.sample(list(pool), n)
    picked = [d for d in rng.sample(list(pool), n + 1) if d != exclude][:n]
    if len(picked) < n:  # the pool held copies of the doc
        picked = rng.sample([d for d in pool if d != exclude], n)
    return picked


def check_fewshot_pool(task: str, pool_size: int, n: int, split: str, same_split: bool) -> None:
    """HerdError when the few-shot split cannot give n examples."""
    usable = pool_size - (1 if same_split else 0)
    if n > usable:
        raise HerdError(f"{task}: --num-fewshot {n} needs {n} examples but the {split} split it draws them from "
                        f"has {usable}; lower --num-fewshot or point --data at a copy with a larger {split} split.")


def stable_id(doc: dict, keys: Sequence[str], index: int) -> str:
    for k in keys:
        if k in doc and doc[k] not in (None, ""):
            return str(doc[k])
    return str(index)


def doc_fingerprint(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, default=str)
