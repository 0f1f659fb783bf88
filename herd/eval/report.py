"""From per-item values to reported numbers: task metrics with standard errors, group averages
(MMLU: micro over all questions, macro over subjects), the results file and the summary table."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from herd.eval.metrics import mean_stderr
from herd.fileio import atomic_write


def mean_metrics(task: Any, values: dict[str, list[float]]) -> dict[str, float]:
    """Task metrics from per-item values: means with standard errors, or corpus-level perplexities."""
    out: dict[str, float] = {}
    nan = float("nan")
    if task.kind == "perplexity":
        ll = float(np.sum(values.get("loglikelihood", [])))
        tokens, nbytes, words = (float(np.sum(values.get(k, []))) for k in ("tokens", "bytes", "words"))
        out["bits_per_byte"] = -ll / nbytes / math.log(2) if nbytes else nan
        out["byte_perplexity"] = math.exp(-ll / nbytes) if nbytes else nan
        out["word_perplexity"] = math.exp(-ll / words) if words else nan
        out["token_perplexity"] = math.exp(-ll / tokens) if tokens else nan
        out["nll_per_token"] = -ll / tokens if tokens else nan
        return out
    if task.kind == "loglikelihood":
        acc, ll = values.get("acc", []), values.get("loglikelihood", [])
        out["acc"] = float(np.mean(acc)) if acc else nan
        out["acc_stderr"] = mean_stderr(acc)
        out["perplexity"] = math.exp(-float(np.mean(ll))) if ll else nan
        return out
    for metric in task.metrics:
        v = values.get(metric, [])
        out[metric] = float(np.mean(v)) if v else nan
        out[f"{metric}_stderr"] = mean_stderr(v)
    return out


def aggregate_groups(tasks: list[Any], results: dict[str, dict], values: dict[str, dict[str, list[float]]]
                     ) -> dict[str, dict[str, Any]]:
    """Per group: the micro average (every item counts once; its standard error over all items) and
    the macro average (every subtask counts once) of each mean metric."""
    groups: dict[str, list[Any]] = {}
    for t in tasks:
        if t.group:
            groups.setdefault(t.group, []).append(t)
    out: dict[str, dict[str, Any]] = {}
    for group, members in groups.items():
        metrics: dict[str, float] = {}
        for metric in members[0].metrics:
            pooled = [x for t in members for x in values.get(t.name, {}).get(metric, [])]
            per_task = [results[t.name]["metrics"].get(metric) for t in members if results[t.name]["n"] > 0]
            metrics[metric] = float(np.mean(pooled)) if pooled else float("nan")
            metrics[f"{metric}_stderr"] = mean_stderr(pooled)
            metrics[f"{metric}_macro"] = float(np.mean(per_task)) if per_task else float("nan")
        summary = list(members[0].summary or members[0].metrics)
        out[group] = {"n": sum(results[t.name]["n"] for t in members), "subtasks": len(members),
                      "summary": [m for s in summary for m in (s, f"{s}_macro")],
                      "skipped": sum(sum(results[t.name]["skipped"].values()) for t in members), "metrics": metrics}
    return out


def _clean(x: Any) -> Any:
    """NaN and inf are not JSON: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_results(path: Path, report: dict[str, Any]) -> Path:
    from herd import __version__

    report = {"herd_version": __version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), **report}
    return atomic_write(path, json.dumps(_clean(report), indent=1, ensure_ascii=False) + "\n")


def summary_table(report: dict[str, Any], max_rows: int = 40) -> str:
    """One table: task, items, metric, value, standard error. Groups get a row with micro and macro;
    with many subtasks only the groups and ungrouped tasks are listed."""
    rows: list[tuple[str, str, str, str, str]] = []
    grouped = {name for name, r in report["tasks"].items() if r.get("group")}
    show_subtasks = len(report["tasks"]) <= max_rows

    def add(name: str, n: Any, metrics: dict[str, Any], skipped: int, shown: list[str] | None) -> None:
        first = True
        for k in shown or [k for k in metrics if not k.endswith("_stderr")]:
            v = metrics.get(k)
            se = metrics.get(f"{k}_stderr")
            se_text = f"{se:.4f}" if isinstance(se, float) and math.isfinite(se) else ""
            items = f"{n}" + (f" (+{skipped} skipped)" if skipped else "")
            rows.append((name if first else "", items if first else "", k,
                         f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else "nan", se_text))
            first = False

    for name, r in report["tasks"].items():
        if name in grouped and not show_subtasks:
            continue
        add(name, r["n"], r["metrics"], sum(r["skipped"].values()), r.get("summary"))
    for name, g in report.get("groups", {}).items():
        add(f"{name} ({g['subtasks']} tasks)", g["n"], g["metrics"], g["skipped"], g.get("summary"))
    header = ("task", "items", "metric", "value", "stderr")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])
