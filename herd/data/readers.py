"""Readers: jsonl (.gz / .zst), parquet and folders of text or source files -> datatrove Documents.

Each reader is a datatrove BaseDiskReader, so it runs first in a pipeline on any datatrove
executor (the executor shards input files across tasks). `iter_documents(paths)` reads the same
formats in plain Python, for tests and small runs.

Bad input never stops a run and is never lost silently. Every problem is counted as a datatrove
stat of the reader (merged into the executor's stats.json, read by herd.data.report), logged
with its file and line (the first `MAX_LOGGED` per reader), and kept in `reader.problems`:

    unreadable_files     a file that cannot be opened or decompressed (the documents read
                         before the failure are kept)
    malformed_json       a jsonl line that is not a JSON object (dropped)
    bad_text_field       a record whose text is not a string (dropped)
    empty_documents      a record or file whose text is missing or only whitespace (dropped)
    non_utf8             a line or file with bytes that are not UTF-8: decoded with U+FFFD
                         replacement characters and KEPT, with metadata["decode_errors"] = True
                         (later filters judge it; the report shows how many there were)
    binary_files         a text-folder file holding NUL bytes (dropped: not text)
    too_large_files      a text-folder file over max_bytes (dropped)

Documents carry: text; id (jsonl/parquet: the record's `id_key` if present, else
"<file>:<line or row>"; folders: the path relative to the folder); metadata with every other
field of the record (e.g. url, source, date), plus "file_path" for jsonl/parquet and
"source", "url" (file://...), "path" and "extension" for folder files.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.logging import logger

from herd.errors import HerdError

try:
    from zstandard import ZstdError
except ImportError:  # zstandard is a dependency; without it .zst files fail as unreadable
    ZstdError = OSError

MAX_LOGGED = 20
_READ_ERRORS = (OSError, EOFError, ValueError, ZstdError)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
PROBLEMS = ("unreadable_files", "malformed_json", "bad_text_field", "empty_documents", "non_utf8",
            "binary_files", "too_large_files")


class _ProblemCounting:
    """Shared bookkeeping: count a problem as a stat, log the first few, keep a capped list."""

    def _problem(self: Any, kind: str, where: str, detail: str = "") -> None:
        self.stat_update(kind)
        if not hasattr(self, "problems"):
            self.problems = []
        if len(self.problems) < 1000:
            self.problems.append((kind, where, detail))
        if len(self.problems) <= MAX_LOGGED:
            logger.warning(f"{self.name}: {kind} at {where}{': ' + detail if detail else ''}")

    def _make_document(self: Any, text: Any, record: dict, where: str, default_id: str) -> Document | None:
        if not isinstance(text, str):
            if text is None:
                self._problem("empty_documents", where, f"no '{self.text_key}' field")
            else:
                self._problem("bad_text_field", where, f"'{self.text_key}' is {type(text).__name__}, not a string")
            return None
        if not text.strip():
            self._problem("empty_documents", where)
            return None
        doc_id = record.pop(self.id_key, None)
        metadata = record.pop("metadata", None)
        metadata = dict(metadata) if isinstance(metadata, dict) else ({} if metadata is None else {"metadata": metadata})
        metadata.update(record)
        if self.default_metadata:
            metadata = {**self.default_metadata, **metadata}
        return Document(text=text, id=str(doc_id) if doc_id is not None else default_id, metadata=metadata)


def decompressed_lines(f: Any, name: str) -> Iterator[bytes]:
    """Byte lines of a raw, .gz or .zst file; a truncated or corrupt stream raises after its last good line."""
    low = name.lower()
    if low.endswith(".gz"):
        yield from gzip.GzipFile(fileobj=f)  # raises EOFError when truncated
        return
    if not low.endswith(".zst"):
        yield from f
        return
    import zstandard

    # decompressobj instead of stream_reader: it tells a complete frame (eof) from a truncated one
    dobj, buf = zstandard.ZstdDecompressor().decompressobj(), b""
    for chunk in iter(lambda: f.read(1 << 20), b""):
        while chunk:
            buf += dobj.decompress(chunk)
            chunk = b""
            if dobj.eof and dobj.unused_data:  # concatenated frames
                chunk, dobj = dobj.unused_data, zstandard.ZstdDecompressor().decompressobj()
        *lines, buf = buf.split(b"\n")
        yield from (line + b"\n" for line in lines)
    if buf:
        yield buf
    if not dobj.eof:
        raise EOFError("zstd stream ended before the end of its frame (truncated file)")


class JsonlReader(_ProblemCounting, BaseDiskReader):
    """jsonl files, optionally .gz or .zst (by suffix): one JSON object per line, text under `text_key`."""

    name = "📖 herd jsonl"

    def __init__(self, data_folder: Any, glob_pattern: str | None = None, text_key: str = "text", id_key: str = "id",
                 default_metadata: dict | None = None, limit: int = -1, file_progress: bool = False, **kwargs: Any):
        super().__init__(data_folder, glob_pattern=glob_pattern, text_key=text_key, id_key=id_key,
                         default_metadata=default_metadata, limit=limit, file_progress=file_progress, **kwargs)
        self.problems: list[tuple[str, str, str]] = []

    def read_file(self, filepath: str) -> DocumentsPipeline:
        file_path = self.data_folder.resolve_paths(filepath)
        line_no = 0
        try:
            with self.data_folder.open(filepath, "rb", compression=None) as f:
                for line_no, raw in enumerate(decompressed_lines(f, filepath), 1):
                    if not raw.strip():
                        continue
                    where = f"{filepath}:{line_no}"
                    try:
                        line = raw.decode("utf-8")
                        bad_bytes = False
                    except UnicodeDecodeError:
                        line = raw.decode("utf-8", errors="replace")
                        bad_bytes = True
                        self._problem("non_utf8", where, "decoded with replacement characters")
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        self._problem("malformed_json", where, str(e))
                        continue
                    if not isinstance(record, dict):
                        self._problem("malformed_json", where, f"a JSON {type(record).__name__}, not an object")
                        continue
                    doc = self._make_document(record.pop(self.text_key, None), record, where, where)
                    if doc is None:
                        continue
                    doc.metadata.setdefault("file_path", file_path)
                    if bad_bytes:
                        doc.metadata["decode_errors"] = True
                    yield doc
        except _READ_ERRORS as e:  # unreadable file, truncated or corrupt gzip / zstd stream
            self._problem("unreadable_files", f"{filepath}:{line_no}", f"{type(e).__name__}: {e}")


class ParquetReader(_ProblemCounting, BaseDiskReader):
    """Parquet files: one row per document, text in column `text_key`, other columns -> metadata."""

    name = "📖 herd parquet"

    def __init__(self, data_folder: Any, glob_pattern: str | None = None, text_key: str = "text", id_key: str = "id",
                 default_metadata: dict | None = None, limit: int = -1, file_progress: bool = False,
                 batch_size: int = 1000, **kwargs: Any):
        super().__init__(data_folder, glob_pattern=glob_pattern, text_key=text_key, id_key=id_key,
                         default_metadata=default_metadata, limit=limit, file_progress=file_progress, **kwargs)
        self.batch_size = batch_size
        self.problems: list[tuple[str, str, str]] = []

    def read_file(self, filepath: str) -> DocumentsPipeline:
        import pyarrow as pa
        import pyarrow.parquet as pq

        file_path = self.data_folder.resolve_paths(filepath)
        row = 0
        try:
            with self.data_folder.open(filepath, "rb") as f, pq.ParquetFile(f) as pqf:
                for batch in pqf.iter_batches(batch_size=self.batch_size):
                    for record in batch.to_pylist():
                        where = f"{filepath}:{row}"
                        doc = self._make_document(record.pop(self.text_key, None), record, where, where)
                        row += 1
                        if doc is not None:
                            doc.metadata.setdefault("file_path", file_path)
                            yield doc
        except (OSError, pa.ArrowException, ValueError) as e:
            self._problem("unreadable_files", f"{filepath}:{row}", f"{type(e).__name__}: {e}")


class TextFolderReader(_ProblemCounting, BaseDiskReader):
    """A folder of plain-text or source files, one document per file, id = path relative to the folder."""

    name = "📖 herd text files"

    def __init__(self, data_folder: Any, extensions: Iterable[str] | None = None, source: str | None = None,
                 max_bytes: int = 10_000_000, glob_pattern: str | None = None, default_metadata: dict | None = None,
                 limit: int = -1, file_progress: bool = False, **kwargs: Any):
        super().__init__(data_folder, glob_pattern=glob_pattern, default_metadata=default_metadata, limit=limit,
                         file_progress=file_progress, **kwargs)
        # ".py" and "py" both mean Python files; None reads every file
        self.extensions = {"." + e.lstrip(".").lower() for e in extensions} if extensions else None
        self.source = source or Path(str(self.data_folder.path).rstrip("/")).name
        self.max_bytes = max_bytes
        self.problems: list[tuple[str, str, str]] = []

    def read_file(self, filepath: str) -> DocumentsPipeline:
        ext = os.path.splitext(filepath)[1].lower()
        if self.extensions is not None and ext not in self.extensions:
            return
        try:
            size = self.data_folder.size(filepath)
            if size > self.max_bytes:
                self._problem("too_large_files", filepath, f"{size} bytes > max_bytes {self.max_bytes}")
                return
            with self.data_folder.open(filepath, "rb") as f:
                raw = f.read()
        except OSError as e:
            self._problem("unreadable_files", filepath, f"{type(e).__name__}: {e}")
            return
        if b"\x00" in raw:
            self._problem("binary_files", filepath, "contains NUL bytes")
            return
        metadata: dict[str, Any] = {}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            metadata["decode_errors"] = True
            self._problem("non_utf8", filepath, "decoded with replacement characters")
        if not text.strip():
            self._problem("empty_documents", filepath)
            return
        full = self.data_folder.resolve_paths(filepath)
        metadata.update(source=self.source, url=Path(os.path.abspath(full)).as_uri() if self.data_folder.is_local()
                        else full, path=filepath, extension=ext.lstrip("."))
        if self.default_metadata:
            metadata = {**self.default_metadata, **metadata}
        yield Document(text=text, id=filepath, metadata=metadata)


class AutoReader(_ProblemCounting, BaseDiskReader):
    """A folder of mixed files: each file read by its own suffix (jsonl[.gz|.zst] / .json / .ndjson
    as JSON lines, .parquet as parquet, anything else as one text document), so one stray README
    does not turn every jsonl file into a document of raw JSON."""

    name = "📖 herd auto (per file)"

    def __init__(self, data_folder: Any, glob_pattern: str | None = None, text_key: str = "text", id_key: str = "id",
                 default_metadata: dict | None = None, limit: int = -1, file_progress: bool = False,
                 extensions: Iterable[str] | None = None, source: str | None = None, max_bytes: int = 10_000_000,
                 batch_size: int = 1000, **kwargs: Any):
        super().__init__(data_folder, glob_pattern=glob_pattern, text_key=text_key, id_key=id_key,
                         default_metadata=default_metadata, limit=limit, file_progress=file_progress, **kwargs)
        self.extensions = {"." + e.lstrip(".").lower() for e in extensions} if extensions else None
        self.source = source or Path(str(self.data_folder.path).rstrip("/")).name
        self.max_bytes, self.batch_size = max_bytes, batch_size
        self.problems: list[tuple[str, str, str]] = []

    def read_file(self, filepath: str) -> DocumentsPipeline:
        kind = _suffix_format(filepath)
        reader = {"jsonl": JsonlReader, "parquet": ParquetReader, "text": TextFolderReader}[kind]
        yield from reader.read_file(self, filepath)  # the readers share these attributes


def _suffix_format(name: str) -> str:
    low = name.lower()
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def make_reader(path: str | Path, format: str = "auto", **kwargs: Any) -> BaseDiskReader:
    """The datatrove reader step for a folder (or one file): format "jsonl", "parquet", "text" or "auto".

    "auto" decides per file by its suffix (jsonl / parquet / text): a folder of one kind gets that
    kind's reader, a mixed folder the AutoReader. Extra keyword arguments go to the reader
    (text_key, id_key, default_metadata, extensions, ...).
    """
    path = Path(path)
    if not path.exists():
        raise HerdError(f"input {path} does not exist; pass an existing file or folder.")
    folder, pattern = (path, None) if path.is_dir() else (path.parent, path.name)
    if format == "auto":
        names = [path.name] if pattern else [p.name for p in path.rglob("*") if p.is_file()]
        kinds = {_suffix_format(n) for n in names}
        format = kinds.pop() if len(kinds) == 1 else "mixed"
    readers: dict[str, Callable[..., BaseDiskReader]] = {
        "jsonl": JsonlReader, "parquet": ParquetReader, "text": TextFolderReader, "mixed": AutoReader}
    if format not in readers:
        raise HerdError(f"unknown input format '{format}'; use one of auto, jsonl, parquet, text.")
    return readers[format](str(folder), glob_pattern=pattern, **kwargs)


def iter_documents(paths: str | Path | Iterable[str | Path], format: str = "auto",
                   problems: dict[str, int] | None = None, **kwargs: Any) -> Iterator[Document]:
    """Documents of every file or folder in `paths`, in sorted file order, without an executor.

    If `problems` is a dict, the counts of bad input (see the module docstring) are added to it.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in paths:
        reader = make_reader(path, format, **kwargs)
        try:
            files = reader.data_folder.list_files(glob_pattern=reader.glob_pattern)
            for file in files:
                yield from reader.read_file(file)
        finally:
            if problems is not None:
                for kind, _, _ in reader.problems:
                    problems[kind] = problems.get(kind, 0) + 1
