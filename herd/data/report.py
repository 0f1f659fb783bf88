"""The data report: what each pipeline stage read, kept and dropped, why, and examples of dropped documents.

`write_report(pipeline_dir, report_dir)` reads this layout under pipeline_dir (any depth):

    **/stats.json               a datatrove logging dir's merged stats (one "stage" per logging
                                dir; the stage is named by the dir's path relative to
                                pipeline_dir; stages are listed in sorted path order, so prefix
                                them 01_, 02_, ... to order them)
    **/stats/NNNNN.json         per-task stats, summed when stats.json is not there yet (a run
                                still going, or one that crashed)
    **/excluded/**/*.jsonl[.gz] documents dropped by a filter's exclusion writer (datatrove's
                                JsonlWriter); each carries metadata["filter_reason"]. Examples
                                are grouped by (folder under excluded/, reason).

and writes to report_dir: report.md (human), report.json (the same numbers) and, when a stage
counted quality-score histogram bins ("<key>_bin_NN" stats from QualityScorer / QualityFilter),
<key>.png. For each step of each stage: documents and characters in, kept and dropped, drops
per reason (documents and characters), and the readers' input problems (unreadable files,
malformed JSON, non-UTF-8, empty documents, ...).

Works with any datatrove step: herd's filters add characters per drop reason (chars_in,
chars_dropped_<reason>); for other filters the report shows document counts and the kept
characters (datatrove's doc_len).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from herd.errors import HerdError
from herd.fileio import atomic_path, atomic_write

N_EXAMPLES = 3
EXAMPLE_CHARS = 300
_BIN = re.compile(r"^(.+)_bin_(\d\d)$")
_PROBLEMS = ("unreadable_files", "malformed_json", "bad_text_field", "empty_documents", "non_utf8",
             "binary_files", "too_large_files")


def _total(value: Any) -> float:
    """A datatrove stat's total (stats are plain numbers or MetricStats dicts)."""
    if isinstance(value, dict):
        return value.get("total", 0)
    return value or 0


def _load_stage(log_dir: Path) -> list[dict[str, Any]]:
    """[{name, stats: {key: total}, time}] for every step of a datatrove logging dir."""
    merged = log_dir / "stats.json"
    files = [merged] if merged.is_file() else sorted((log_dir / "stats").glob("*.json"))
    steps: list[dict[str, Any]] = []
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # a task writing its stats right now; the next report picks it up
        for i, step in enumerate(data):
            if i == len(steps):
                steps.append(dict(name=step.get("name", f"step {i}"), stats=defaultdict(float), time=0.0))
            steps[i]["time"] += _total(step.get("time_stats", {}))
            for key, value in step.get("stats", {}).items():
                steps[i]["stats"][key] += _total(value)
    return steps


def _summarize_step(step: dict[str, Any]) -> dict[str, Any]:
    s = step["stats"]
    is_reader = "READER" in step["name"]
    out: dict[str, Any] = dict(name=step["name"], seconds=round(step["time"], 3))
    if is_reader:
        # records the reader could not turn into documents count as dropped by the reader
        lost = {k: int(s[k]) for k in _PROBLEMS if s.get(k) and k not in ("non_utf8", "unreadable_files")}
        docs = int(s.get("documents", 0))
        out.update(docs_in=docs + sum(lost.values()), docs_kept=docs, docs_dropped=sum(lost.values()),
                   chars_kept=int(s.get("doc_len", 0)), files=int(s.get("input_files", 0)))
        out["problems"] = {k: int(s[k]) for k in _PROBLEMS if s.get(k)}
        out["reasons"] = {k: dict(docs=v) for k, v in lost.items()}
        return out
    docs_in = int(s.get("total", 0))
    dropped = int(s.get("dropped", 0))
    kept = int(s.get("forwarded", docs_in - dropped))
    out.update(docs_in=docs_in, docs_kept=kept, docs_dropped=dropped, chars_kept=int(s.get("doc_len", 0)))
    if "chars_in" in s:
        out.update(chars_in=int(s["chars_in"]), chars_dropped=int(s.get("chars_dropped", 0)))
    reasons = {}
    for key, value in s.items():
        if key.startswith("dropped_"):
            reason = key[len("dropped_"):]
            reasons[reason] = dict(docs=int(value))
            if f"chars_dropped_{reason}" in s:
                reasons[reason]["chars"] = int(s[f"chars_dropped_{reason}"])
    out["reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]["docs"]))
    hists: dict[str, list[int]] = {}
    for key, value in s.items():
        m = _BIN.match(key)
        if m:
            hists.setdefault(m.group(1), [0] * 20)[int(m.group(2))] += int(value)
    if hists:
        out["histograms"] = hists
    return out


def _read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
    except (OSError, EOFError):
        return


def _examples(pipeline_dir: Path, n: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{exclusion folder: {reason: up to n examples}} from every excluded/ folder."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for excl in sorted(p for p in pipeline_dir.rglob("excluded") if p.is_dir()):
        for file in sorted(excl.rglob("*.jsonl*")):
            group = str(file.parent.relative_to(pipeline_dir))
            by_reason = out.setdefault(group, {})
            for rec in _read_jsonl(file):
                meta = rec.get("metadata") or {}
                reason = meta.get("filter_reason", "unspecified")
                bucket = by_reason.setdefault(reason, [])
                if len(bucket) < n:
                    text = rec.get("text", "")
                    bucket.append(dict(id=rec.get("id"), chars=len(text), text=text[:EXAMPLE_CHARS],
                                       metadata={k: v for k, v in meta.items() if k != "filter_reason"}))
    return out


def plot_score_histogram(scores_or_counts: list[float] | list[int], path: str | Path, title: str = "quality score",
                         threshold: float | None = None, counts: bool = False) -> None:
    """PNG histogram of scores in [0, 1] (20 bins); pass counts=True to give the 20 bin counts directly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = [i / 20 for i in range(21)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if counts:
        ax.bar(edges[:-1], scores_or_counts, width=0.05, align="edge", edgecolor="black")
    else:
        ax.hist(scores_or_counts, bins=edges, edgecolor="black")
    if threshold is not None:
        ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3f}")
        ax.legend()
    ax.set_xlabel("score")
    ax.set_ylabel("documents")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _fmt(n: float) -> str:
    return f"{int(n):,}"


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# Data report: {report['pipeline_dir']}", ""]
    for stage in report["stages"]:
        lines += [f"## Stage `{stage['stage']}`", "",
                  "| step | docs in | kept | dropped | chars in | chars kept | chars dropped | seconds |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for st in stage["steps"]:
            chars_in = _fmt(st["chars_in"]) if "chars_in" in st else ""
            chars_dropped = _fmt(st["chars_dropped"]) if "chars_dropped" in st else ""
            lines.append(f"| {st['name']} | {_fmt(st['docs_in'])} | {_fmt(st['docs_kept'])} | "
                         f"{_fmt(st['docs_dropped'])} | {chars_in} | {_fmt(st['chars_kept'])} | {chars_dropped} | "
                         f"{st['seconds']:.2f} |")
        lines.append("")
        for st in stage["steps"]:
            if st.get("problems"):
                lines.append(f"- **{st['name']}** input problems: "
                             + ", ".join(f"{k} {v}" for k, v in st["problems"].items()))
            if st.get("reasons"):
                parts = [f"{r} {v['docs']} docs" + (f" / {_fmt(v['chars'])} chars" if "chars" in v else "")
                         for r, v in st["reasons"].items()]
                lines.append(f"- **{st['name']}** dropped: " + "; ".join(parts))
        for plot in stage.get("plots", []):
            lines += ["", f"![{plot}]({plot})"]
        lines.append("")
    if report["examples"]:
        lines += ["## Examples of dropped documents", ""]
        for group, by_reason in report["examples"].items():
            for reason, examples in by_reason.items():
                lines += [f"### `{group}`: {reason}", ""]
                for ex in examples:
                    snippet = ex["text"].replace("\n", " ⏎ ")
                    meta = ", ".join(f"{k}={v}" for k, v in ex["metadata"].items()
                                     if isinstance(v, (int, float, str)) and len(str(v)) < 80)
                    lines += [f"- `{ex['id']}` ({ex['chars']} chars; {meta})", f"  > {snippet}", ""]
    return "\n".join(lines) + "\n"


def write_report(pipeline_dir: str | Path, report_dir: str | Path, n_examples: int = N_EXAMPLES) -> dict[str, Any]:
    """Build the report of a pipeline directory (layout in the module docstring); returns its JSON form."""
    pipeline_dir = Path(pipeline_dir)
    if not pipeline_dir.is_dir():
        raise HerdError(f"pipeline directory {pipeline_dir} does not exist; pass the folder the pipeline wrote.")
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    # an earlier report inside pipeline_dir holds copies of the stages: never list them twice
    skip = report_dir.resolve() if report_dir.resolve() not in [pipeline_dir.resolve(), *pipeline_dir.resolve().parents] else None
    log_dirs = sorted(d for d in ({p.parent for p in pipeline_dir.rglob("stats.json")}
                                  | {p.parent for p in pipeline_dir.rglob("stats") if p.is_dir() and any(p.glob("*.json"))})
                      if skip is None or skip not in d.resolve().parents)
    stages = []
    for log_dir in log_dirs:
        steps = [_summarize_step(s) for s in _load_stage(log_dir)]
        stage = dict(stage=str(log_dir.relative_to(pipeline_dir)), steps=steps, plots=[])
        for st in steps:
            for key, counts in st.pop("histograms", {}).items():
                name = f"{key}.png" if len(log_dirs) == 1 else f"{stage['stage'].replace('/', '_')}_{key}.png"
                plot_score_histogram(counts, report_dir / name, title=f"{key} ({sum(counts)} documents)", counts=True)
                stage["plots"].append(name)
                st.setdefault("score_histograms", {})[key] = counts
        stages.append(stage)
    report = dict(pipeline_dir=str(pipeline_dir), stages=stages, examples=_examples(pipeline_dir, n_examples))
    for name, text in (("report.json", json.dumps(report, indent=2, ensure_ascii=False)), ("report.md", _markdown(report))):
        atomic_write(report_dir / name, text)
    return report


def add_report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline_dir", help="the folder a pipeline wrote (holding datatrove logging dirs and excluded/)")
    parser.add_argument("--output", default=None, help="report folder (default: PIPELINE_DIR/report)")
    parser.add_argument("--examples", type=int, default=N_EXAMPLES, help="dropped documents shown per filter and reason")


def run_report(args: argparse.Namespace) -> int:
    out = args.output or os.path.join(args.pipeline_dir, "report")
    stages_file = Path(args.pipeline_dir) / "work" / "stages.json"
    if stages_file.is_file():
        # a `herd data run` folder: its last run's stages, in pipeline order (work/ may hold stages
        # of runs with other options, and report/stages holds copies of them)
        from herd.data.pipeline import write_pipeline_report

        stages = [(name, Path(folder)) for name, folder in json.loads(stages_file.read_text())]
        path = write_pipeline_report(Path(args.pipeline_dir), stages, args.examples, Path(out))
        print(f"wrote {path} and report.json ({len(stages)} stages)")
        return 0
    report = write_report(args.pipeline_dir, out, args.examples)
    print(f"wrote {out}/report.md and report.json ({len(report['stages'])} stages)")
    return 0
