"""The three dedup passes as datatrove pipeline steps, so they run on any datatrove executor.

    filter stage (N tasks)   ... -> StageWriter:  each task writes its documents (jsonl) and their
                                  dedup signatures: URL key + date, MinHash band keys, line hashes
    plan stage (1 task)      DedupPlan: reads every task's signatures and decides globally which
                                  documents are URL / near duplicates and which lines are frequent
    apply stage (N tasks)    StageReader -> ApplyDedup -> ...: drops those documents and lines

Global order is (task rank, position in the task's file), so decisions are deterministic and
independent of how many workers ran. Every file is written to a temp name and renamed, so a
task killed midway leaves nothing that a re-run would mistake for finished output.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from herd.data.dedup.lines import document_line_hashes, frequent_lines, remove_lines
from herd.data.dedup.minhash import cluster_duplicates, document_bands, hash_functions
from herd.data.dedup.url import parse_date, url_duplicates, url_key
from herd.errors import HerdError
from herd.fileio import atomic_open, atomic_write

KEEP, URL_DUP, MINHASH_DUP = 0, 1, 2
REASONS = {URL_DUP: "url_duplicate", MINHASH_DUP: "minhash_duplicate"}


def _atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def doc_to_json(doc: Document) -> str:
    return json.dumps({"id": doc.id, "text": doc.text, "metadata": doc.metadata}, ensure_ascii=False)


class StageWriter(PipelineStep):
    """Writes this task's documents to FOLDER/docs/RANK.jsonl and dedup signatures to FOLDER/sigs/RANK.npz."""

    name = "stage writer + dedup signatures"
    type = "💽 - WRITER"

    def __init__(self, folder: str, n_grams: int = 5, bands: int = 14, rows: int = 8, minhash_seed: int = 1,
                 url_field: str = "url", date_field: str = "date", skip_line_domains: tuple[str, ...] = ("code",),
                 signatures: bool = True) -> None:
        super().__init__()
        self.signatures = signatures
        self.folder, self.n_grams, self.bands, self.rows = Path(folder), n_grams, bands, rows
        self.minhash_seed, self.url_field, self.date_field = minhash_seed, url_field, date_field
        self.skip_line_domains = tuple(skip_line_domains)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        a, b = hash_functions(self.bands * self.rows, self.minhash_seed)
        for sub in ("docs", "sigs") if self.signatures else ("docs",):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        final = self.folder / "docs" / f"{rank:05d}.jsonl"
        ids, keys, dates, bands, lines, n_lines = [], [], [], [], [], []
        # the documents appear last (their presence marks the task's output complete): the
        # signatures are written inside the documents' atomic block, before it renames them
        with atomic_open(final, "w") as f:
            for doc in data or ():
                with self.track_time():
                    f.write(doc_to_json(doc) + "\n")
                self.stat_update("documents")
                self.stat_update("chars", value=len(doc.text))
                if not self.signatures:
                    yield doc
                    continue
                with self.track_time():
                    ids.append(str(doc.id))
                    keys.append(url_key(doc.metadata.get(self.url_field)))
                    dates.append(parse_date(doc.metadata.get(self.date_field)))
                    bands.append(document_bands(doc.text, a, b, self.bands, self.rows, self.n_grams))
                    lh = (np.zeros(0, np.uint64) if doc.metadata.get("domain") in self.skip_line_domains
                          else document_line_hashes(doc.text))
                    lines.append(lh)
                    n_lines.append(lh.size)
                yield doc
            if self.signatures:
                _atomic_npz(self.folder / "sigs" / f"{rank:05d}.npz",
                            ids=np.array(ids, dtype=str), url_keys=np.array(keys, dtype=np.uint64),
                            dates=np.array(dates, dtype=np.float64),
                            bands=np.array(bands, dtype=np.uint64).reshape(len(ids), self.bands),
                            line_hashes=np.concatenate(lines) if lines else np.zeros(0, np.uint64),
                            line_counts=np.array(n_lines, dtype=np.int64))


class StageReader(PipelineStep):
    """Reads FOLDER/docs/RANK.jsonl written by StageWriter (the same rank of an equally sized stage)."""

    name = "stage reader"
    type = "📖 - READER"

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = Path(folder)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = self.folder / "docs" / f"{rank:05d}.jsonl"
        if not path.is_file():
            raise HerdError(f"{path} is missing: the previous pipeline stage did not finish; re-run the pipeline to complete it.")
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                self.stat_update("documents")
                yield Document(text=row["text"], id=row["id"], metadata=row["metadata"])


class DedupPlan(PipelineStep):
    """One global pass over every task's signatures (SIG_FOLDER/sigs): which documents and lines to drop.

    Writes FOLDER/plan/RANK.npz (per document: reason code, duplicate-of id, line bucket),
    FOLDER/plan/lines.npz (frequent line hashes per bucket) and FOLDER/plan/summary.json.
    Runs as a single task (rank 0); it holds only signatures, ~130 bytes per document.
    """

    name = "dedup plan (URL, MinHash LSH, line counts)"
    type = "🫂 - DEDUP"

    def __init__(self, sig_folder: str, n_ranks: int, url_dedup: bool = True, minhash_dedup: bool = True,
                 line_dedup: bool = True, line_max_count: int = 6, line_bucket_docs: int = 30_000_000,
                 folder: str | None = None) -> None:
        super().__init__()
        self.sig_folder, self.n_ranks = Path(sig_folder), n_ranks
        self.folder = Path(folder) if folder else self.sig_folder
        self.url_dedup, self.minhash_dedup, self.line_dedup = url_dedup, minhash_dedup, line_dedup
        self.line_max_count, self.line_bucket_docs = line_max_count, line_bucket_docs

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if rank != 0:
            return
        sigs = []
        for r in range(self.n_ranks):
            path = self.sig_folder / "sigs" / f"{r:05d}.npz"
            if not path.is_file():
                raise HerdError(f"{path} is missing: the filter stage did not finish; re-run the pipeline to complete it.")
            with np.load(path) as z:
                sigs.append({k: z[k] for k in z.files})
        sizes = [s["ids"].size for s in sigs]
        ids = np.concatenate([s["ids"] for s in sigs]) if sigs else np.zeros(0, str)
        n = ids.size
        reason = np.zeros(n, dtype=np.int8)
        dup_of = np.arange(n)
        if self.url_dedup and n:
            keys = np.concatenate([s["url_keys"] for s in sigs])
            drop = url_duplicates(keys, np.concatenate([s["dates"] for s in sigs]))
            reason[drop] = URL_DUP
            # point each dropped page at the survivor of its URL
            survivor = {int(k): i for i, k in enumerate(keys) if not drop[i] and k}
            for i in np.flatnonzero(drop):
                dup_of[i] = survivor[int(keys[i])]
        if self.minhash_dedup and n:
            bands = np.concatenate([s["bands"] for s in sigs])
            drop, roots = cluster_duplicates(bands, active=reason == KEEP)
            reason[drop] = MINHASH_DUP
            dup_of[drop] = roots[drop]
        alive = reason == KEEP
        position = np.cumsum(alive) - 1  # index among surviving documents: defines line buckets
        bucket = np.where(alive, position // self.line_bucket_docs, -1)
        frequent: dict[int, np.ndarray] = {}
        if self.line_dedup and n:
            counts = np.concatenate([s["line_counts"] for s in sigs])
            hashes = np.concatenate([s["line_hashes"] for s in sigs])
            owner = np.repeat(np.arange(n), counts)
            mask = alive[owner]
            frequent = frequent_lines(hashes[mask], position[owner[mask]], self.line_bucket_docs, self.line_max_count)
        (self.folder / "plan").mkdir(parents=True, exist_ok=True)
        start = 0
        for r, size in enumerate(sizes):
            sl = slice(start, start + size)
            _atomic_npz(self.folder / "plan" / f"{r:05d}.npz", reason=reason[sl],
                        duplicate_of=ids[dup_of[sl]] if size else np.zeros(0, str), bucket=bucket[sl])
            start += size
        bucket_ids = np.array(sorted(frequent), dtype=np.int64)
        _atomic_npz(self.folder / "plan" / "lines.npz", buckets=bucket_ids,
                    counts=np.array([frequent[b].size for b in bucket_ids], dtype=np.int64),
                    hashes=np.concatenate([frequent[b] for b in bucket_ids]) if frequent else np.zeros(0, np.uint64))
        summary = {"documents": int(n), "url_duplicates": int((reason == URL_DUP).sum()),
                   "minhash_duplicates": int((reason == MINHASH_DUP).sum()),
                   "frequent_lines": int(sum(v.size for v in frequent.values())), "line_buckets": int(bucket.max() + 1) if n else 0}
        for key, value in summary.items():
            self.stat_update(key, value=value)
        atomic_write(self.folder / "plan" / "summary.json", json.dumps(summary, indent=1))
        return
        yield  # a generator that yields nothing: the plan writes files only


class ApplyDedup(PipelineStep):
    """Drops the documents DedupPlan marked and removes frequent lines from the rest.

    Stats follow herd's filters: total, forwarded, dropped, dropped_<reason>, chars_in,
    chars_dropped(_<reason>), plus lines_removed and chars_removed_lines. Dropped documents carry
    metadata filter_reason and duplicate_of, and go to `exclusion_writer` when one is given.
    """

    name = "apply dedup"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str, skip_line_domains: tuple[str, ...] = ("code",), exclusion_writer: Any = None) -> None:
        super().__init__()
        self.folder, self.skip_line_domains = Path(folder), tuple(skip_line_domains)
        self.exclusion_writer = exclusion_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = self.folder / "plan" / f"{rank:05d}.npz"
        if not path.is_file():
            raise HerdError(f"{path} is missing: the dedup plan stage did not finish; re-run the pipeline to complete it.")
        with np.load(path) as z:
            reason, dup_of, bucket = z["reason"], z["duplicate_of"], z["bucket"]
        with np.load(self.folder / "plan" / "lines.npz") as z:
            ends = np.cumsum(z["counts"])
            frequent = {int(b): z["hashes"][e - c:e] for b, c, e in zip(z["buckets"], z["counts"], ends)}
        empty = np.zeros(0, np.uint64)
        with (self.exclusion_writer or contextlib.nullcontext()) as writer:
            for i, doc in enumerate(data or ()):
                if i >= reason.size:
                    raise HerdError(f"the dedup plan for task {rank} covers {reason.size} documents but the stage has more; "
                                    "delete the pipeline's work folder and re-run it.")
                n_chars = len(doc.text)
                self.stat_update("total")
                self.stat_update("chars_in", value=n_chars)
                why = REASONS.get(int(reason[i]))
                if why is None and doc.metadata.get("domain") not in self.skip_line_domains:
                    text, n_removed, chars = remove_lines(doc.text, frequent.get(int(bucket[i]), empty))
                    if n_removed:
                        self.stat_update("lines_removed", value=n_removed)
                        self.stat_update("chars_removed_lines", value=chars)
                        doc.text = text
                        if not text.strip():
                            why = "line_dedup_empty"
                if why is None:
                    self.stat_update("forwarded")
                    self.update_doc_stats(doc)
                    yield doc
                    continue
                self.stat_update("dropped")
                self.stat_update(f"dropped_{why}")
                self.stat_update("chars_dropped", value=n_chars)
                self.stat_update(f"chars_dropped_{why}", value=n_chars)
                doc.metadata["filter_reason"] = why
                if why != "line_dedup_empty":
                    doc.metadata["duplicate_of"] = str(dup_of[i])
                if writer is not None:
                    writer.write(doc, rank)
