"""The pre-training data pipeline end to end, as a chain of datatrove executors.

    1 filter    (N tasks)  read -> domain -> language id -> repetition -> dirty words -> [KL]
                           -> [quality classifier] -> write documents + dedup signatures
    2 plan      (1 task)   URL dedup (most recent) + MinHash LSH clusters + frequent-line counts
    3 dedup     (N tasks)  drop duplicates, remove frequent lines -> clean jsonl
    4 tokenize  (N tasks)  herd tokenizer -> token files, validation split by id hash
    5 pack      (1 task)   domain mix -> token shards + manifest (herd.data.shards)

Stages 4-5 run only with a tokenizer, so a caller can first get clean text (e.g. to train a
tokenizer on it) and call again with the tokenizer: finished stages are not redone.

Resuming: every stage lives in OUT/work/<stage>-<key>/, where the key hashes the inputs and
every option that stage (or an earlier one) depends on. datatrove marks each finished task in
logs/completions and skips it on the next run; a task killed midway left only temp files, so the
re-run redoes exactly the unfinished tasks. Decisions depend on task rank and file order, never
on timing or worker count, so an interrupted-and-resumed run writes the same shard bytes as an
uninterrupted one. Changing an option gives the affected stages a new key (a fresh folder).

Executors: "local" (processes on this machine), "slurm" (one job array per stage, chained with
dependencies; run_pipeline returns after submitting) and "ray" (the running Ray cluster).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from herd.data.mix import DEFAULT_WEIGHTS, AssignDomain, Bypass, parse_weights
from herd.data.runtime import executor_runtime
from herd.errors import HerdError
from herd.fileio import atomic_write

STAGES_FILE = "stages.json"


@dataclass
class DataConfig:
    """Options of `herd data run`; stage folders are keyed by the options they depend on."""

    tasks: int = 4
    """Tasks per parallel stage; each reads a slice of the input files. Keep it fixed to resume a run."""
    workers: int = 2
    """Tasks running at once on the local executor (processes)."""
    executor: str = "local"
    """local, slurm or ray."""
    input_format: str = "auto"
    """auto, jsonl, parquet or text (folders of text/source files)."""
    text_key: str = "text"
    """Field holding the text in jsonl/parquet inputs."""
    languages: str = ""
    """Comma-separated language codes to keep (e.g. en,fr); empty keeps all languages above language_min_score."""
    language_min_score: float = 0.5
    """Minimum language-id probability for non-code documents."""
    repetition: bool = True
    """Gopher-style repetition filter (duplicated lines, paragraphs and n-grams)."""
    dirty_words: bool = True
    """Drop documents dense in dirty words."""
    kl_distribution: str = ""
    """Token-distribution JSON for the KL outlier filter; empty skips it."""
    quality_model: str = ""
    """fastText quality classifier (from `herd data train-classifier`); empty skips it."""
    quality_threshold: float = 0.5
    """Keep documents whose quality score is at least this."""
    domain_model: str = ""
    """fastText domain classifier whose labels become metadata domain; empty uses source rules."""
    domain_rules: str = ""
    """Comma-separated source-substring=domain rules, e.g. github=code,arxiv=math."""
    filter_skip_domains: str = "code"
    """Domains that skip the prose filters (language id, repetition, dirty words, KL, quality) and line dedup."""
    url_dedup: bool = True
    """Drop all but the most recent document per normalized URL."""
    url_field: str = "url"
    """Metadata field holding the URL."""
    date_field: str = "date"
    """Metadata field holding the crawl/publication date (ISO-8601 or epoch seconds)."""
    minhash: bool = True
    """Near-duplicate removal with MinHash LSH."""
    minhash_ngrams: int = 5
    """Word n-gram size of MinHash shingles."""
    minhash_bands: int = 14
    """LSH bands."""
    minhash_rows: int = 8
    """Hashes per band (bands x rows hash functions in all)."""
    line_dedup: bool = True
    """Llama 3's line rule: remove lines found in more than line_max_count documents of a bucket."""
    line_max_count: int = 6
    """Lines in more documents than this (within a bucket) are removed."""
    line_bucket_docs: int = 30_000_000
    """Documents per line-dedup bucket."""
    mix: str = DEFAULT_WEIGHTS
    """Target token shares per domain (domain=weight,...); "none" keeps the natural mix."""
    max_repeat: float = 4.0
    """At most this many passes over any domain when upsampling it."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation (chosen by id hash)."""
    seed: int = 0
    """Seed of the mix sampling and the validation split."""
    shard_tokens: int = 67_108_864
    """Tokens per shard file before a new one starts."""
    examples: int = 5
    """Dropped-document examples per reason in the report."""
    slurm_partition: str = ""
    """Slurm partition (executor slurm)."""
    slurm_time: str = "24:00:00"
    """Slurm time limit per task (executor slurm)."""
    verbose: bool = False
    """Show datatrove's own log lines on the console (otherwise they go to OUT/work/datatrove.log)."""


@dataclass
class PipelineResult:
    """Where a run put things: clean text (jsonl under clean_dir/docs), shards' manifest, report."""

    output_dir: Path
    clean_dir: Path | None
    manifest: Path | None
    report: Path | None
    stages: dict[str, dict[str, Any]]
    seconds: float


FILTER_FIELDS = ("tasks", "input_format", "text_key", "languages", "language_min_score", "repetition", "dirty_words",
                 "kl_distribution", "quality_model", "quality_threshold", "domain_model", "domain_rules",
                 "filter_skip_domains", "url_field", "date_field", "minhash_ngrams", "minhash_bands", "minhash_rows")
DEDUP_FIELDS = ("url_dedup", "minhash", "line_dedup", "line_max_count", "line_bucket_docs")
TOKENIZE_FIELDS = ("val_fraction", "seed")
PACK_FIELDS = ("mix", "max_repeat", "shard_tokens")


def _key(parent: str, values: dict[str, Any]) -> str:
    return hashlib.sha256((parent + json.dumps(values, sort_keys=True, default=str)).encode()).hexdigest()[:12]


def _file_fingerprint(paths: Sequence[str]) -> list[Any]:
    """Input identity for stage keys: every file's path, size and mtime."""
    out = []
    for p in sorted(paths):
        root = Path(p)
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
        out.append([str(root.resolve()), [(str(f.relative_to(root)) if f != root else "", f.stat().st_size,
                                          int(f.stat().st_mtime)) for f in files]])
    return out


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def filter_steps(inputs: Sequence[str], cfg: DataConfig, folder: Path) -> list[Any]:
    """The filter stage's steps: readers, annotators, filters (each with an exclusion writer), stage writer."""
    from datatrove.pipeline.writers import JsonlWriter

    from herd.data.dedup.stages import StageWriter
    from herd.data.filters.dirty_words import DirtyWordsConfig, DirtyWordsFilter
    from herd.data.filters.language import LanguageConfig, LanguageFilter
    from herd.data.filters.repetition import RepetitionFilter
    from herd.data.readers import make_reader

    def excluded(name: str) -> JsonlWriter:
        return JsonlWriter(str(folder / "excluded" / name), output_filename="${rank}.jsonl", compression=None)

    skip = _split(cfg.filter_skip_domains)
    # doc_progress: datatrove's per-task progress bar over documents (the long part of a run)
    steps: list[Any] = [make_reader(path, cfg.input_format, text_key=cfg.text_key, doc_progress=True) for path in inputs]
    if cfg.domain_model:
        from herd.data.filters.quality import DomainClassifier

        steps.append(DomainClassifier(cfg.domain_model))
    steps.append(AssignDomain(cfg.domain_rules))
    lang = LanguageFilter(LanguageConfig(languages=list(_split(cfg.languages)), min_score=cfg.language_min_score),
                          exclusion_writer=excluded("language"))
    steps += [Bypass(lang, skip), AssignDomain(cfg.domain_rules)]
    if cfg.repetition:
        steps.append(Bypass(RepetitionFilter(exclusion_writer=excluded("repetition")), skip))
    if cfg.dirty_words:
        steps.append(Bypass(DirtyWordsFilter(DirtyWordsConfig(), exclusion_writer=excluded("dirty_words")), skip))
    if cfg.kl_distribution:
        from herd.data.filters.kl import KLConfig, KLFilter

        steps.append(Bypass(KLFilter(KLConfig(distribution=cfg.kl_distribution), exclusion_writer=excluded("kl")), skip))
    if cfg.quality_model:
        from herd.data.filters.quality import QualityFilter

        steps.append(Bypass(QualityFilter(cfg.quality_model, threshold=cfg.quality_threshold,
                                          exclusion_writer=excluded("quality")), skip))
    steps.append(StageWriter(str(folder), cfg.minhash_ngrams, cfg.minhash_bands, cfg.minhash_rows,
                             url_field=cfg.url_field, date_field=cfg.date_field, skip_line_domains=skip))
    return steps


def _executor(cfg: DataConfig, steps: list[Any], tasks: int, logs: Path, name: str, depends: Any) -> Any:
    if cfg.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(steps, tasks=tasks, workers=max(1, min(cfg.workers, tasks)), logging_dir=str(logs),
                                     start_method="fork")
    if cfg.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        if not cfg.slurm_partition:
            raise HerdError("the slurm executor needs a partition; pass --slurm-partition NAME.")
        return SlurmPipelineExecutor(steps, tasks=tasks, time=cfg.slurm_time, partition=cfg.slurm_partition,
                                     logging_dir=str(logs), job_name=f"herd-data-{name}", depends=depends)
    if cfg.executor == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(steps, tasks=tasks, workers=cfg.workers, logging_dir=str(logs), depends=depends)
    raise HerdError(f"unknown executor {cfg.executor!r}; use local, slurm or ray.")


def stage_stats(logs: Path) -> list[dict[str, Any]]:
    """Per-step stats of a stage, merged over every finished task (also those finished by an earlier run)."""
    from datatrove.utils.stats import PipelineStats

    files = sorted((logs / "stats").glob("*.json"))
    if not files:
        return []
    total = None
    for f in files:
        stats = PipelineStats.from_json(json.loads(f.read_text()))
        total = stats if total is None else total + stats
    return json.loads(total.to_json())


def run_pipeline(inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
                 tokenizer_path: str | os.PathLike | None = None, config: DataConfig | None = None,
                 log: Callable[[str], None] = print) -> PipelineResult:
    """Run (or resume) the pipeline on `inputs` (files or folders) into `output_dir`.

    Writes OUT/clean/docs/*.jsonl (the kept text), and with a tokenizer OUT/manifest.json +
    OUT/train, OUT/val shards; the report goes to OUT/report. Safe to call again after a crash
    or with a tokenizer added: finished work is reused.
    """
    from herd.data.dedup.stages import ApplyDedup, DedupPlan, StageReader, StageWriter
    from herd.data.pack import PackShards, TokenizeDocuments, load_tokenizer

    cfg = config or DataConfig()
    start = time.time()
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise HerdError("no inputs given; pass --input with files or folders of text.")
    for p in inputs:
        if not Path(p).exists():
            raise HerdError(f"input {p} does not exist; pass existing files or folders.")
    if cfg.tasks < 1 or cfg.workers < 1:
        raise HerdError("--tasks and --workers must be at least 1.")
    weights = None if cfg.mix.strip().lower() in ("", "none") else parse_weights(cfg.mix)
    out = Path(output_dir)
    work = out / "work"
    fields = dataclasses.asdict(cfg)
    k_filter = _key("", {"inputs": _file_fingerprint(inputs), **{f: fields[f] for f in FILTER_FIELDS}})
    k_dedup = _key(k_filter, {f: fields[f] for f in DEDUP_FIELDS})
    stages: list[tuple[str, Path, int, Callable[[Path], list[Any]]]] = [
        ("filter", work / f"filter-{k_filter}", cfg.tasks, lambda d: filter_steps(inputs, cfg, d)),
        ("plan", work / f"plan-{k_dedup}", 1, lambda d: [DedupPlan(
            str(work / f"filter-{k_filter}"), cfg.tasks, cfg.url_dedup, cfg.minhash, cfg.line_dedup,
            cfg.line_max_count, cfg.line_bucket_docs, folder=str(d))]),
        ("dedup", work / f"dedup-{k_dedup}", cfg.tasks, lambda d: [
            StageReader(str(work / f"filter-{k_filter}")),
            ApplyDedup(str(work / f"plan-{k_dedup}"), _split(cfg.filter_skip_domains), exclusion_writer=__import__(
                "datatrove.pipeline.writers", fromlist=["JsonlWriter"]).JsonlWriter(
                str(d / "excluded" / "dedup"), output_filename="${rank}.jsonl", compression=None)),
            StageWriter(str(d), signatures=False)]),
    ]
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        k_tok = _key(k_dedup, {"tokenizer": tok.sha256, **{f: fields[f] for f in TOKENIZE_FIELDS}})
        k_pack = _key(k_tok, {f: fields[f] for f in PACK_FIELDS})
        stages += [
            ("tokenize", work / f"tokenize-{k_tok}", cfg.tasks, lambda d: [
                StageReader(str(work / f"dedup-{k_dedup}")),
                TokenizeDocuments(str(d), str(tokenizer_path), cfg.val_fraction, cfg.seed)]),
            ("pack", work / f"pack-{k_pack}", 1, lambda d: [PackShards(
                str(work / f"tokenize-{k_tok}"), cfg.tasks, str(out), str(tokenizer_path), weights, cfg.seed,
                cfg.max_repeat, cfg.shard_tokens)]),
        ]
    (work).mkdir(parents=True, exist_ok=True)
    atomic_write(work / "config.json", json.dumps({"inputs": inputs, "tokenizer": str(tokenizer_path or ""),
                                                   "config": fields}, indent=1))
    # this run's stages, for `herd data report OUT` (work/ may also hold stages of other options)
    atomic_write(work / STAGES_FILE, json.dumps([[name, str(folder)] for name, folder, _, _ in stages], indent=1))
    log_file = None if cfg.verbose else work / "datatrove.log"
    if log_file is not None:
        log(f"datatrove's log lines go to {log_file} (--verbose shows them here)")
    previous = None
    ran: list[tuple[str, Path]] = []
    with executor_runtime(log_file):
        for i, (name, folder, tasks, build) in enumerate(stages, 1):
            folder.mkdir(parents=True, exist_ok=True)
            done = len(list((folder / "logs" / "completions").glob("*"))) if (folder / "logs" / "completions").is_dir() else 0
            t0 = time.time()
            log(f"[{i}/{len(stages)}] {name}: {tasks} task(s)" + (f", {done} already done" if done else "") + f" -> {folder}")
            executor = _executor(cfg, build(folder), tasks, folder / "logs", name, previous)
            ran.append((name, folder))
            if cfg.executor == "local":
                try:
                    executor.run()
                except Exception as e:  # the report of what ran so far is written before failing
                    report = write_pipeline_report(out, ran, cfg.examples)
                    what = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
                    if not isinstance(e, HerdError):
                        what = f"{type(e).__name__}: {what}; the task logs in {folder / 'logs'} have the details"
                    raise HerdError(f"the {name} stage failed: {what.rstrip('.')} (report of the stages so far: "
                                    f"{report}).") from None
                log(f"[{i}/{len(stages)}] {name} finished in {time.time() - t0:.1f} s")
            previous = executor
        if cfg.executor != "local":
            previous.run()  # submits / runs the whole dependency chain
            return PipelineResult(out, None, None, None, {}, time.time() - start)
    stats = {name: stage_stats(folder / "logs") for name, folder, _, _ in stages}
    manifest = out / "manifest.json" if tokenizer_path is not None else None
    clean = work / f"dedup-{k_dedup}"
    report = write_pipeline_report(out, [(name, folder) for name, folder, _, _ in stages], cfg.examples)
    return PipelineResult(out, clean, manifest, report, stats, time.time() - start)


def write_pipeline_report(out: Path, stages: list[tuple[str, Path]], n_examples: int = 3,
                          report_dir: Path | None = None) -> Path:
    """OUT/report/report.md (+ report.json, plots) through herd.data.report, for this run's stages only.

    The report reads a folder of datatrove logging dirs; OUT/work may also hold stages of earlier
    runs with other options, so this run's stages are staged under OUT/report/stages/NN-name:
    merged stats over all finished tasks (including tasks an interrupted run finished) plus
    links to the excluded-document files.
    """
    from herd.data.report import write_report

    report_dir = Path(report_dir) if report_dir is not None else out / "report"
    staging = report_dir / "stages"
    if staging.exists():
        shutil.rmtree(staging)
    for i, (name, folder) in enumerate(stages, 1):
        dest = staging / f"{i:02d}-{name}"
        (dest / "stats").mkdir(parents=True)
        merged = stage_stats(folder / "logs") if (folder / "logs").is_dir() else []
        (dest / "stats.json").write_text(json.dumps(merged, indent=1))  # staging only: report/ is rebuilt
        for f in sorted((folder / "excluded").rglob("*.jsonl*")) if (folder / "excluded").is_dir() else []:
            link = dest / "excluded" / f.relative_to(folder / "excluded")
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), link)
    write_report(staging, report_dir, n_examples)
    # dedup decisions and the mix are not per-document filter counts: add them as their own section
    extra = ["", "## Dedup plan and domain mix", ""]
    for name, folder in stages:
        summary = folder / "plan" / "summary.json"
        if name == "plan" and summary.is_file():
            plan = json.loads(summary.read_text())
            extra += [f"- dedup plan over {plan['documents']:,} documents: {plan['url_duplicates']:,} URL duplicates, "
                      f"{plan['minhash_duplicates']:,} MinHash near-duplicates, {plan['frequent_lines']:,} frequent "
                      f"lines (in {plan['line_buckets']} bucket(s)) removed from every document", ""]
    if (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        mix = manifest.get("mix", {})
        for split, rec in manifest["splits"].items():
            extra.append(f"- {split}: {rec['tokens']:,} tokens, {rec['documents']:,} documents, {len(rec['shards'])} shard(s)")
        if mix.get("domains"):
            extra += ["", "| domain | available tokens | target share | tokens | share | passes |", "|---|---:|---:|---:|---:|---:|"]
            for d, v in mix["domains"].items():
                extra.append(f"| {d} | {v['available_tokens']:,} | {v['target_share']:.3f} | {v['tokens']:,} | "
                             f"{v['share']:.3f} | {v['repeat']:.2f} |")
    md = report_dir / "report.md"
    atomic_write(md, md.read_text(encoding="utf-8") + "\n".join(extra) + "\n")
    return md
