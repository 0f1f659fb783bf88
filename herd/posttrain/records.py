"""Reading chat records from files: jsonl (.gz / .zst), JSON arrays and parquet, or folders of them.

`data_files(paths)` lists the files (a folder is searched recursively, in sorted order; files of
other kinds inside a folder are counted as skipped) and `iter_records(files, report)` yields
`(where, record)` pairs, where is "file:line" (jsonl), "file:item" (a JSON array) or "file:row"
(parquet). Records are plain dicts as written; herd.posttrain.render decides what they mean.
Malformed lines and unreadable files are counted in the DataReport and reading goes on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from herd.data.readers import JSONL_SUFFIXES, PARQUET_SUFFIXES, decompressed_lines
from herd.errors import HerdError
from herd.posttrain.report import DataReport

try:
    from zstandard import ZstdError
except ImportError:  # zstandard is a dependency; without it .zst files fail as unreadable
    ZstdError = OSError

_READ_ERRORS = (OSError, EOFError, ValueError, ZstdError)
SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES


def _supported(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def _is_json(name: str) -> bool:
    """.json(.gz/.zst): may hold one JSON array of records instead of one record per line."""
    return name.lower().endswith((".json", ".json.gz", ".json.zst"))


def data_files(paths: str | os.PathLike | Iterable[str | os.PathLike], report: DataReport | None = None) -> list[Path]:
    """The data files of `paths` (files, or folders searched recursively), each once, in the order given.

    A file named directly must be jsonl(.gz/.zst), json or parquet; inside a folder other files
    (a README) are skipped and counted in `report`, hidden ones (.git/, .gitattributes, the
    temporaries of an unfinished atomic write) ignored.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise HerdError(f"data path {path} does not exist; pass existing jsonl/parquet files or folders.")
        if path.is_file():
            if not _supported(path.name):
                raise HerdError(f"{path} is not a jsonl(.gz/.zst), json or parquet file; convert it to one of "
                                "those (TRL's {'messages': [...]} or {'prompt', 'completion'} records).")
            found = [path]
        else:
            found = []
            # hidden files and folders (.git, temporaries of an atomic write) are not data
            files = [q for q in path.rglob("*") if q.is_file()
                     and not any(part.startswith(".") for part in q.relative_to(path).parts)]
            for p in sorted(files):
                if _supported(p.name):
                    found.append(p)
                elif report is not None:
                    report.count("skipped_files", str(p), "not jsonl/json/parquet")
            if not found:
                raise HerdError(f"folder {path} holds no .jsonl(.gz/.zst), .json or .parquet file; point --data "
                                "at the chat data files.")
        out.extend(p for p in found if p not in out)
    return out


def iter_records(files: Iterable[Path], report: DataReport) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of every file; counts files, records and malformed lines."""
    for path in files:
        report.files += 1
        if path.name.lower().endswith(PARQUET_SUFFIXES):
            yield from _parquet_records(path, report)
        else:
            yield from _json_records(path, report)


def _json_records(path: Path, report: DataReport) -> Iterator[tuple[str, Any]]:
    line_no = 0
    try:
        with open(path, "rb") as f:
            lines = decompressed_lines(f, path.name)
            first = next(lines, b"")
            if _is_json(path.name) and first.lstrip().startswith(b"["):  # one array of records
                yield from _json_array(path, first + b"".join(lines), report)
                return
            for line_no, raw in enumerate([first] if first else [], 1):
                yield from _json_line(path, line_no, raw, report)
            for line_no, raw in enumerate(lines, 2):
                yield from _json_line(path, line_no, raw, report)
    except _READ_ERRORS as e:  # unreadable file, truncated or corrupt gzip / zstd stream
        report.count("unreadable_files", f"{path}:{line_no}", f"{type(e).__name__}: {e}")


def _json_line(path: Path, line_no: int, raw: bytes, report: DataReport) -> Iterator[tuple[str, Any]]:
    if not raw.strip():
        return
    where = f"{path}:{line_no}"
    report.records += 1
    try:
        record = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        report.count("malformed_json", where, str(e))
        return
    if not isinstance(record, dict):
        report.count("malformed_json", where, f"a JSON {type(record).__name__}, not an object")
        return
    yield where, record


def _json_array(path: Path, data: bytes, report: DataReport) -> Iterator[tuple[str, Any]]:
    try:
        items = json.loads(data.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        report.records += 1
        report.count("malformed_json", f"{path}:1", f"not a JSON array of records ({e})")
        return
    for i, record in enumerate(items):
        report.records += 1
        where = f"{path}:item {i}"
        if isinstance(record, dict):
            yield where, record
        else:
            report.count("malformed_json", where, f"a JSON {type(record).__name__}, not an object")


def _parquet_records(path: Path, report: DataReport) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    report.records += 1
                    yield f"{path}:row {row}", record
                    row += 1
    except (OSError, pa.ArrowException, ValueError) as e:
        report.count("unreadable_files", f"{path}:row {row}", f"{type(e).__name__}: {e}")
