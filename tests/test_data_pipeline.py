"""The whole data pipeline on an offline corpus built from this machine's files: every stage runs on
datatrove's local executor, bad input is counted, shards decode (with raw tiktoken) to exactly the
clean documents, the mix hits its targets, the report explains the drops, and a run killed midway
then resumed writes byte-identical shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from herd.data.corpus import build_local_corpus
from herd.data.pack import is_validation
from herd.data.pipeline import DataConfig, run_pipeline
from herd.data.shards import ShardDataset, read_manifest

from conftest import official_tokenizer_dir

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZER = str(official_tokenizer_dir() / "tokenizer.model")
CONFIG = dict(tasks=4, val_fraction=0.05, shard_tokens=100_000, quality_threshold=0.2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("corpus")
    build_local_corpus(root / "local", max_mb=1.0, file_mb=0.1)
    bad = root / "bad"
    bad.mkdir()
    with open(bad / "broken.jsonl", "wb") as f:
        f.write(b'{"id": "ok1", "text": "A perfectly fine English sentence about the weather in spring, '
                b'written to pass every filter of the pipeline without trouble."}\n')
        f.write(b'{"id": "truncated", "text": "no closing\n')
        f.write(b'{"id": "latin1", "text": "caf\xe9 au lait"}\n')
        f.write(b'{"id": "empty", "text": ""}\n')
    return [str(root / "local"), str(bad)]


@pytest.fixture(scope="module")
def quality_model(inputs, tmp_path_factory) -> str:
    """A fastText quality classifier: corpus prose ("hq") against gibberish of random letters ("lq")."""
    import random

    from herd.data.filters.quality import ClassifierTrainConfig, train_classifier

    rng = random.Random(0)
    texts = []
    for f in sorted(Path(inputs[0]).glob("general-*.jsonl")):
        texts += [json.loads(line)["text"][:2000] for line in f.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if len(t.split()) >= 30]  # a few-word snippet can look like gibberish
    examples = []
    for t in texts:
        gibberish = " ".join("".join(rng.choice("etaoinshrdlu") for _ in range(rng.randint(2, 8)))
                             for _ in range(len(t.split())))
        examples += [(t, "hq"), (gibberish, "lq")]
    path = tmp_path_factory.mktemp("quality") / "quality.bin"
    metrics = train_classifier(examples, path, ClassifierTrainConfig(epoch=25))
    assert metrics["accuracy"] > 0.7  # a working classifier (chance 0.5; 1.0 seen)
    return str(path)


@pytest.fixture(scope="module")
def config(quality_model) -> dict:
    return dict(CONFIG, quality_model=quality_model)


@pytest.fixture(scope="module")
def clean_run(inputs, config, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    t0 = time.time()
    result = run_pipeline(inputs, out, TOKENIZER, DataConfig(workers=2, **config), log=lambda s: None)
    return result, time.time() - t0


def _enc() -> tiktoken.Encoding:
    ranks = load_tiktoken_bpe(TOKENIZER)
    return tiktoken.Encoding("llama3-ref", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})


def test_end_to_end_report_and_shards(clean_run):
    result, seconds = clean_run
    print(f"end-to-end pipeline on ~1 MB: {seconds:.1f} s")
    assert seconds < 120
    # every stage ran and the report explains it
    report = json.loads((result.output_dir / "report" / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert [s.split("/")[0] for s in stages] == ["01-filter", "02-plan", "03-dedup", "04-tokenize", "05-pack"]
    readers = [st for st in stages["01-filter"]["steps"] if "READER" in st["name"]]
    assert len(readers) == 2  # one per input folder
    problems = {k: sum(r["problems"].get(k, 0) for r in readers) for k in ("malformed_json", "non_utf8", "empty_documents")}
    # the truncated line, the non-UTF-8 line and the empty document: counted, never fatal
    assert problems == {"malformed_json": 1, "non_utf8": 1, "empty_documents": 1}, problems
    filter_steps = {st["name"]: st for st in stages["01-filter"]["steps"]}
    assert any("language" in n for n in filter_steps) and any("repetition" in n for n in filter_steps)
    dropped = sum(st["docs_dropped"] for st in stages["01-filter"]["steps"])
    assert dropped > 0 and report["examples"], "the local corpus has documents the filters drop, with examples"
    assert any("quality" in n for n in filter_steps)
    plots = [p for s in report["stages"] for p in s["plots"]]
    assert plots and all((result.output_dir / "report" / p).is_file() for p in plots)  # quality-score histogram
    md = (result.output_dir / "report" / "report.md").read_text()
    assert "Dedup plan and domain mix" in md and "| domain |" in md

    # shards decode to exactly the clean documents (raw tiktoken as the reference decoder)
    enc = _enc()
    clean = []
    for f in sorted((result.clean_dir / "docs").glob("*.jsonl")):
        clean += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
    by_text = {d["text"]: d for d in clean}
    assert "ok1" in {d["id"] for d in clean}
    val = [enc.decode(doc[1:-1].tolist()) for doc in ShardDataset(result.output_dir, "val").documents()]
    assert val == [d["text"] for d in clean if is_validation(d["id"], CONFIG["val_fraction"], 0)]
    train = ShardDataset(result.output_dir, "train")
    domains: dict[str, int] = {}
    for doc in train.documents():
        text = enc.decode(doc[1:-1].tolist())
        assert text in by_text and not is_validation(by_text[text]["id"], CONFIG["val_fraction"], 0)
        d = by_text[text]["metadata"]["domain"]
        domains[d] = domains.get(d, 0) + doc.size
    manifest = read_manifest(result.output_dir)
    assert manifest["splits"]["train"]["domains"] == dict(sorted(domains.items()))
    # achieved token shares match the targets (renormalized over the domains present)
    targets = {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08}
    present = {d: w for d, w in targets.items() if d in domains}
    total_w, total = sum(present.values()), sum(domains.values())
    for d, w in present.items():
        assert abs(domains[d] / total - w / total_w) < 0.03, (d, domains[d] / total, w / total_w)


def _snapshot(out: Path) -> dict[str, bytes]:
    files = sorted(p for split in ("train", "val") for p in (out / split).iterdir())
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_kill_midway_then_resume_is_byte_identical(inputs, config, clean_run, tmp_path):
    result, _ = clean_run
    out = tmp_path / "out"
    script = ("import sys, json\nfrom herd.data.pipeline import DataConfig, run_pipeline\n"
              "if __name__ == '__main__':\n"
              f"    run_pipeline(json.loads(sys.argv[1]), sys.argv[2], {TOKENIZER!r}, DataConfig(workers=1, **{config!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(inputs), str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    completions = None
    deadline = time.time() + 90
    try:  # kill once two of the four filter tasks are finished: the third is then in flight
        while time.time() < deadline and proc.poll() is None:
            found = list((out / "work").glob("filter-*/logs/completions")) if (out / "work").is_dir() else []
            if found and len(list(found[0].iterdir())) >= 2:
                completions = found[0]
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert completions is not None, "the pipeline finished or stalled before it could be interrupted"
    done_before = {p.name: p.stat().st_mtime_ns for p in completions.iterdir()}
    assert len(done_before) < 4 and not (out / "manifest.json").exists()

    resumed = run_pipeline(inputs, out, TOKENIZER, DataConfig(workers=2, **config), log=lambda s: None)
    # finished tasks were not redone, the rest were
    assert {p.name: p.stat().st_mtime_ns for p in completions.iterdir() if p.name in done_before} == done_before
    assert len(list(completions.iterdir())) == 4
    assert _snapshot(resumed.output_dir) == _snapshot(result.output_dir)
    a, b = read_manifest(resumed.output_dir), read_manifest(result.output_dir)
    a.pop("created"), b.pop("created")
    assert a["splits"] == b["splits"] and a["mix"] == b["mix"]


def test_cli_pack_inspect_and_bad_input(tmp_path, capsys):
    from herd.cli import main

    src = tmp_path / "clean.jsonl"
    src.write_text("\n".join(json.dumps({"id": f"d{i}", "text": f"Document number {i} says hello.", "source": "x"})
                             for i in range(30)) + "\n")
    out = tmp_path / "shards"
    assert main(["data", "pack", "--input", str(src), "--output", str(out), "--tokenizer", TOKENIZER,
                 "--val-fraction", "0.1"]) == 0
    assert main(["data", "inspect", str(out), "--seq-len", "8", "--window", "1"]) == 0
    text = capsys.readouterr().out
    assert "herd-shards-v1" in text and "windows of 8 tokens" in text and "Document number" in text
    ds = ShardDataset(out)
    assert ds.n_documents + ShardDataset(out, "val").n_documents == 30
    # a missing input is one clear error line and exit status 2, not a traceback
    assert main(["data", "run", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
