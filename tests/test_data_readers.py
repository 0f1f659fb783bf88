"""herd.data.readers: jsonl (.gz/.zst), parquet and text folders; bad input counted, never a crash, never lost."""

from __future__ import annotations

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.writers import JsonlWriter

from herd.data.readers import iter_documents, make_reader
from herd.data.report import add_report_args, run_report, write_report
from herd.errors import HerdError


def _records(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return b"".join(json.dumps({"text": " ".join(str(rng.random()) for _ in range(30)), "id": f"r{i}",
                                "url": f"http://example.com/{i}"}).encode() + b"\n" for i in range(n))


@pytest.fixture
def messy_jsonl(tmp_path):
    lines = [
        json.dumps({"text": "hello world", "id": "a", "url": "http://x", "metadata": {"source": "web"}}).encode(),
        b'{"text": "broken',                      # malformed JSON
        json.dumps({"text": "  "}).encode(),     # empty document
        b'{"text": "caf\xe9 latte"}',             # not UTF-8 (latin-1 byte)
        b"[1, 2]",                                # JSON, but not an object
        json.dumps({"text": 5}).encode(),        # text is not a string
        json.dumps({"body": "no text key"}).encode(),  # missing text
        json.dumps({"text": "second good one"}).encode(),
    ]
    d = tmp_path / "jsonl"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return d


def test_jsonl_bad_lines_counted_and_good_ones_kept(messy_jsonl):
    problems: dict[str, int] = {}
    docs = list(iter_documents(messy_jsonl, problems=problems))
    assert [d.text for d in docs] == ["hello world", "caf\ufffd latte", "second good one"]
    assert docs[0].id == "a" and docs[0].metadata["url"] == "http://x" and docs[0].metadata["source"] == "web"
    assert docs[1].metadata["decode_errors"] is True and docs[1].id == "a.jsonl:4"
    assert problems == {"malformed_json": 2, "empty_documents": 2, "non_utf8": 1, "bad_text_field": 1}
    # every input line is accounted for: 3 documents + 5 dropped lines (non_utf8 is kept, not dropped)
    assert len(docs) + problems["malformed_json"] + problems["empty_documents"] + problems["bad_text_field"] == 8


def test_compressed_jsonl_and_truncation(tmp_path):
    data = _records(200)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.compress(data) + zstandard.compress(_records(10, 1)))
    docs = list(iter_documents(tmp_path))
    assert len(docs) == 410 and docs[0].id == "r0" and docs[0].metadata["url"] == "http://example.com/0"
    expected = [json.loads(line)["text"] for line in data.splitlines()]
    assert [d.text for d in docs[:200]] == expected and [d.text for d in docs[200:400]] == expected

    cut = tmp_path / "cut"
    cut.mkdir()
    gz = gzip.compress(data)
    (cut / "t.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (cut / "u.jsonl.zst").write_bytes(b"definitely not zstd")
    problems: dict[str, int] = {}
    docs = list(iter_documents(cut, problems=problems))
    assert problems == {"unreadable_files": 2}
    assert 0 < len(docs) < 200 and [d.text for d in docs] == expected[: len(docs)]


def test_parquet_reader(tmp_path):
    pq.write_table(pa.table({"text": ["p1", "", None, "p4"], "url": ["u1", "u2", "u3", "u4"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"not a parquet file")
    problems: dict[str, int] = {}
    docs = list(iter_documents(tmp_path, problems=problems))
    assert [(d.text, d.metadata["url"], d.id) for d in docs] == [("p1", "u1", "a.parquet:0"), ("p4", "u4", "a.parquet:3")]
    assert problems == {"empty_documents": 2, "unreadable_files": 1}


def test_text_folder_reader(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("print('hi')\n")
    (root / "sub" / "b.txt").write_bytes(b"bad \xff bytes")
    (root / "empty.txt").write_text(" \n")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02")
    (root / "big.txt").write_text("x" * 2000)
    problems: dict[str, int] = {}
    docs = list(iter_documents(root, problems=problems, max_bytes=1000))
    assert [d.id for d in docs] == ["a.py", "sub/b.txt"]
    meta = docs[0].metadata
    assert meta["source"] == "corpus" and meta["extension"] == "py" and meta["path"] == "a.py"
    assert meta["url"] == (root / "a.py").as_uri()
    assert docs[1].text == "bad \ufffd bytes" and docs[1].metadata["decode_errors"]
    assert problems == {"non_utf8": 1, "empty_documents": 1, "binary_files": 1, "too_large_files": 1}
    only_py = list(iter_documents(root, format="text", extensions=["py"]))
    assert [d.id for d in only_py] == ["a.py"]


def test_missing_input_is_a_herd_error(tmp_path):
    with pytest.raises(HerdError, match="does not exist"):
        list(iter_documents(tmp_path / "nope"))
    with pytest.raises(HerdError, match="unknown input format"):
        make_reader(tmp_path, format="csv")


def test_reader_in_datatrove_pipeline_stats_reach_report(messy_jsonl, tmp_path):
    out = tmp_path / "run"
    LocalPipelineExecutor(pipeline=[make_reader(messy_jsonl), JsonlWriter(str(out / "kept"))],
                          tasks=1, workers=1, logging_dir=str(out / "logs" / "read")).run()
    kept = [json.loads(line) for line in gzip.open(next((out / "kept").glob("*.jsonl.gz")), "rt")]
    assert [r["text"] for r in kept] == ["hello world", "caf\ufffd latte", "second good one"]
    report = write_report(out, tmp_path / "report")
    (reader,) = [s for s in report["stages"][0]["steps"] if "READER" in s["name"]]
    assert reader["problems"] == {"malformed_json": 2, "bad_text_field": 1, "empty_documents": 2, "non_utf8": 1}
    assert reader["docs_in"] == 8 and reader["docs_kept"] == 3 and reader["docs_dropped"] == 5
    assert "malformed_json 2" in (tmp_path / "report" / "report.md").read_text()
    import argparse

    parser = argparse.ArgumentParser()
    add_report_args(parser)
    assert run_report(parser.parse_args([str(out)])) == 0
    assert json.loads((out / "report" / "report.json").read_text())["stages"][0]["steps"][0]["docs_in"] == 8
