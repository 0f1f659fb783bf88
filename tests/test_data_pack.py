"""Token shards, mixing and packing: shards decode back to exactly the written documents, in order,
with correct boundaries; training windows come from memmaps; domain mixing hits its targets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from herd.data.shards import ShardDataset, ShardWriter, check_tokenizer, file_sha256, read_manifest
from herd.errors import HerdError

from conftest import official_tokenizer_dir

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    """The official Llama 3 BPE through raw tiktoken (a reference independent of herd's tokenizer)."""
    ranks = load_tiktoken_bpe(str(official_tokenizer_dir() / "tokenizer.model"))
    return tiktoken.Encoding("llama3-test", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})


@pytest.fixture(scope="module")
def info() -> dict:
    path = official_tokenizer_dir() / "tokenizer.model"
    return {"path": str(path), "sha256": file_sha256(path), "n_words": 128256, "bos_id": 128000, "eos_id": 128001}


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["llama", "herd", "token", "shard", "über", "données", "数据", "x = 1", "\n", "def f():", "  "]
    return ["".join(rng.choice(words) + rng.choice([" ", "", "\n"]) for _ in range(rng.randint(0, 120)))
            for _ in range(n)]


def _write(out: Path, enc, info, texts, shard_tokens, split="train"):
    with ShardWriter(out, split, info, shard_tokens=shard_tokens, seed=7) as w:
        for i, t in enumerate(texts):
            w.add(enc.encode(t), domain="code" if i % 3 == 0 else "general")
    return w


def test_shards_decode_back_in_order_with_boundaries(tmp_path, enc, info):
    texts = _texts(60)
    _write(tmp_path, enc, info, texts, shard_tokens=400)
    _write(tmp_path, enc, info, texts[:5], shard_tokens=400, split="val")
    manifest = read_manifest(tmp_path)
    assert manifest["format"] == "herd-shards-v1" and manifest["seed"] == 7
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 2, "small shard_tokens must roll several shards"
    assert train["documents"] == 60 and manifest["splits"]["val"]["documents"] == 5
    expected_tokens = sum(len(enc.encode(t)) + 2 for t in texts)
    assert train["tokens"] == expected_tokens == sum(train["domains"].values())
    assert train["domains"]["code"] == sum(len(enc.encode(t)) + 2 for i, t in enumerate(texts) if i % 3 == 0)

    ds = ShardDataset(tmp_path, "train")
    assert all(isinstance(t, np.memmap) for t in ds._tokens), "shards must be memory-mapped, not loaded"
    docs = list(ds.documents())
    assert len(docs) == 60
    for text, doc in zip(texts, docs):
        assert doc[0] == 128000 and doc[-1] == 128001
        assert 128000 not in doc[1:-1] and 128001 not in doc[1:-1]
        assert enc.decode(doc[1:-1].tolist()) == text
    # raw file layout: little-endian uint32 tokens, uint64 offsets ending in the token count
    first = train["shards"][0]
    raw = np.fromfile(tmp_path / f"{first['name']}.tokens", dtype="<u4")
    offs = np.fromfile(tmp_path / f"{first['name']}.offsets", dtype="<u8")
    assert offs[0] == 0 and offs[-1] == raw.size == first["tokens"] and offs.size == first["documents"] + 1
    assert (raw[offs[:-1]] == 128000).all() and (raw[offs[1:] - 1] == 128001).all()
    assert [enc.decode(x[1:-1].tolist()) for x in ShardDataset(tmp_path, "val").documents()] == texts[:5]


def test_windows_match_reference_stream(tmp_path, enc, info):
    texts = _texts(80, seed=1)
    _write(tmp_path, enc, info, texts, shard_tokens=500)
    ds = ShardDataset(tmp_path)
    # independent reference: per shard, the list of documents as python lists
    shards, cur, n = [], [], 0
    for t in texts:
        doc = [128000] + enc.encode(t) + [128001]
        cur.append(doc)
        n += len(doc)
        if n >= 500:
            shards.append(cur)
            cur, n = [], 0
    if cur:
        shards.append(cur)
    seq = 37
    assert ds.num_windows(seq) == sum((sum(map(len, s)) - 1) // seq for s in shards)
    ref = []  # (tokens, doc ids) of every window, shard by shard
    for s in shards:
        stream = [t for d in s for t in d]
        owner = [k for k, d in enumerate(s) for _ in d]
        for j in range((len(stream) - 1) // seq):
            a = j * seq
            ids = owner[a:a + seq + 1]
            ref.append((stream[a:a + seq + 1], [x - ids[0] for x in ids]))
    rng = random.Random(0)
    for i in rng.sample(range(len(ref)), 25) + [0, len(ref) - 1]:
        x, y, d = ds.get(i, seq)
        assert x.dtype == np.int64 and x.shape == y.shape == d.shape == (seq,)
        assert x.tolist() == ref[i][0][:-1] and y.tolist() == ref[i][0][1:]
        assert d.tolist() == ref[i][1][:-1]
    # window() may cross a shard boundary: ids keep counting documents
    b = int(ds._starts[1])
    tokens, doc_ids = ds.window(b - 3, 10)
    full = [t for s in shards for d in s for t in d]
    assert tokens.tolist() == full[b - 3:b + 7]
    assert doc_ids[2] + 1 == doc_ids[3]  # the last token of shard 0 and the first of shard 1
    with pytest.raises(HerdError):
        ds.get(ds.num_windows(seq), seq)


def test_check_tokenizer_and_corrupt_shards(tmp_path, enc, info):
    _write(tmp_path, enc, info, _texts(10), shard_tokens=10_000)
    manifest = read_manifest(tmp_path)
    check_tokenizer(manifest, info)  # same tokenizer: fine
    with pytest.raises(HerdError, match="another tokenizer"):
        check_tokenizer(manifest, {**info, "sha256": "0" * 64})
    with pytest.raises(HerdError, match="vocabulary"):
        check_tokenizer(manifest, {**info, "n_words": 32000})
    tok = tmp_path / "train" / "00000.tokens"
    tok.write_bytes(tok.read_bytes()[:-4])
    with pytest.raises(HerdError, match="truncated"):
        ShardDataset(tmp_path)
    with pytest.raises(HerdError, match="no shard manifest"):
        ShardDataset(tmp_path / "nowhere")


# ---- mixing and packing ------------------------------------------------------------------------

from datatrove.data import Document  # noqa: E402
from datatrove.pipeline.filters import LambdaFilter  # noqa: E402

from herd.data.mix import Bypass, assign_domain, parse_rules, parse_weights, plan_mix  # noqa: E402
from herd.data.pack import is_validation, pack_documents  # noqa: E402


def test_plan_mix_hits_targets_deterministically():
    rng = np.random.default_rng(0)
    # very unequal supply: lots of general and code, little math and multilingual
    supply = {"general": 3000, "code": 2000, "math": 150, "multilingual": 120}
    domains = [d for d, n in supply.items() for _ in range(n)]
    lengths = rng.integers(50, 400, size=len(domains))
    weights = parse_weights("general=0.5,math=0.25,code=0.17,multilingual=0.08")
    order, report = plan_mix(lengths, domains, weights, seed=3, max_repeat=4.0)
    got = {d: 0 for d in supply}
    for i in order:
        got[domains[i]] += int(lengths[i])
    total = sum(got.values())
    for d, w in weights.items():
        assert abs(got[d] / total - w) < 0.01, (d, got[d] / total)
        assert report["domains"][d]["tokens"] == got[d]
        available = int(lengths[np.array(domains) == d].sum())
        assert got[d] <= 4.0 * available + 400  # never more than max_repeat passes (plus one document)
    # math is the scarce domain: it is repeated ~4 times; general is cut
    assert report["domains"]["math"]["repeat"] > 3.5 and report["domains"]["general"]["repeat"] < 1
    again, _ = plan_mix(lengths, domains, weights, seed=3, max_repeat=4.0)
    other, _ = plan_mix(lengths, domains, weights, seed=4, max_repeat=4.0)
    assert np.array_equal(order, again) and not np.array_equal(order, other)
    # a domain without documents: the other weights are renormalized
    no_ml = [d for d in domains if d != "multilingual"]
    order, report = plan_mix(lengths[:len(no_ml)], no_ml, weights, seed=0)
    assert "multilingual" not in report["domains"]
    assert abs(report["domains"]["general"]["share"] - 0.5 / 0.92) < 0.01


def test_domain_rules_and_weight_errors():
    rules = parse_rules("github=code,arxiv=math")
    assert assign_domain("a.txt", {"source": "GitHub-dump"}, rules) == "code"
    assert assign_domain("paper", {"source": "arxiv"}, rules) == "math"
    assert assign_domain("lib/x.rs", {}, rules) == "code"
    assert assign_domain("doc", {"language": "fr"}, rules) == "multilingual"
    assert assign_domain("doc", {"language": "en"}, rules) == "general"
    assert assign_domain("doc", {"domain": "math", "language": "de"}, rules) == "math"
    for bad in ("general", "general=x", "general=-1", "general=0"):
        with pytest.raises(HerdError):
            parse_weights(bad)


def test_bypass_keeps_order_and_skips_code():
    docs = [Document(text=f"doc {i}" + (" drop" if i % 3 == 0 else ""), id=str(i),
                     metadata={"domain": "code" if i % 4 == 0 else "general"}) for i in range(20)]
    inner = LambdaFilter(lambda d: "drop" not in d.text)
    out = [d.id for d in Bypass(inner, ("code",)).run(iter(docs))]
    expected = [d.id for d in docs if d.metadata["domain"] == "code" or "drop" not in d.text]
    assert out == expected  # code documents with "drop" survive, in their original places
    assert inner.stats["dropped"].total == sum(1 for d in docs if d.metadata["domain"] != "code" and "drop" in d.text)


def test_validation_split_is_stable_and_sized():
    ids = [f"doc-{i}" for i in range(20000)]
    held = [is_validation(i, 0.05, seed=1) for i in ids]
    assert abs(sum(held) / len(ids) - 0.05) < 0.006
    assert held == [is_validation(i, 0.05, seed=1) for i in ids]
    assert held != [is_validation(i, 0.05, seed=2) for i in ids]
    assert not any(is_validation(i, 0.0) for i in ids[:100])


def test_pack_documents_round_trip(tmp_path, enc):
    texts = _texts(40, seed=5)
    docs = [Document(text=t, id=f"d{i}", metadata={"domain": "general"}) for i, t in enumerate(texts)]
    path = pack_documents(iter(docs), tmp_path, official_tokenizer_dir() / "tokenizer.model", val_fraction=0.2,
                          shard_tokens=300)
    manifest = read_manifest(path.parent)
    assert manifest["tokenizer"]["sha256"] == "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
    val_ids = [f"d{i}" for i in range(40) if is_validation(f"d{i}", 0.2)]
    assert 0 < len(val_ids) < 40
    decoded = {s: [enc.decode(d[1:-1].tolist()) for d in ShardDataset(tmp_path, s).documents()] for s in ("train", "val")}
    assert decoded["val"] == [texts[int(i[1:])] for i in val_ids]
    assert decoded["train"] == [t for i, t in enumerate(texts) if f"d{i}" not in val_ids]  # no mix: input order
    assert not (tmp_path / "work").exists()


def _herd_cli(*argv: str, cwd: Path | None = None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "herd", *argv], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_pack_missing_input_leaves_nothing(tmp_path):
    out = tmp_path / "shards"
    r = _herd_cli("data", "pack", "--input", str(tmp_path / "nope.jsonl"), "--output", str(out),
                  "--tokenizer", str(official_tokenizer_dir() / "tokenizer.model"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herd: error:") and "nope.jsonl" in lines[0], r.stderr
    leftovers = [p for p in tmp_path.rglob("*") if p.name != "nope.jsonl"]
    assert leftovers == [], leftovers  # no .npy.tmp, no work/ folder, no empty output folder


def test_tokenizer_is_found_from_anywhere_and_checked(tmp_path, monkeypatch):
    """Shards made with a relative tokenizer path stay usable from another folder: the manifest
    records an absolute path and the sha256, and a copy of the tokenizer sits beside the shards."""
    from herd.data.shards import find_tokenizer

    src = official_tokenizer_dir() / "tokenizer.model"
    made_in = tmp_path / "made_in"
    made_in.mkdir()
    (made_in / "tok.model").write_bytes(src.read_bytes())
    monkeypatch.chdir(made_in)
    docs = [Document(text=t, id=f"d{i}", metadata={}) for i, t in enumerate(_texts(10))]
    pack_documents(iter(docs), "shards", "tok.model", val_fraction=0.0)
    monkeypatch.chdir(tmp_path)
    shards = made_in / "shards"
    rec = read_manifest(shards)["tokenizer"]
    assert Path(rec["path"]).is_absolute() and rec["path"] == str(made_in / "tok.model")
    assert file_sha256(shards / "tokenizer.model") == file_sha256(src) == rec["sha256"]
    assert find_tokenizer(shards) == shards / "tokenizer.model"
    (shards / "tokenizer.model").unlink()  # no copy: the recorded absolute path works from any folder
    assert find_tokenizer(shards) == made_in / "tok.model"
    (made_in / "tok.model").write_bytes(b"changed")  # the file at the path is no longer the one used
    with pytest.raises(HerdError, match="neither beside the shards"):
        find_tokenizer(shards)
    with pytest.raises(HerdError, match="is not the tokenizer the shards"):
        find_tokenizer(shards, override=made_in / "tok.model")
    assert find_tokenizer(shards, override=src) == src


def test_pretrain_from_another_folder_keeps_the_tokenizer(tmp_path, monkeypatch):
    """Old manifests stored the tokenizer path relative to where the data was made; a run from
    elsewhere silently dropped the tokenizer. Now the copy beside the shards is found, the export
    carries it, and a run whose tokenizer cannot be found stops with one line."""
    from herd.train.config import TrainConfig
    from herd.train.loop import pretrain

    made_in = tmp_path / "made_in"
    made_in.mkdir()
    (made_in / "tok.model").write_bytes((official_tokenizer_dir() / "tokenizer.model").read_bytes())
    monkeypatch.chdir(made_in)
    docs = [Document(text=t, id=f"d{i}", metadata={}) for i, t in enumerate(_texts(80))]
    pack_documents(iter(docs), "shards", "tok.model", val_fraction=0.0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from herd.configs import PRESETS

    # a tiny model with the official 128K vocabulary (the tokenizer these shards were made with)
    monkeypatch.setitem(PRESETS, "tiny-128k", dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=128256,
                                                   multiple_of=16, max_seq_len=64, tie_embeddings=True))
    cfg = dict(preset="tiny-128k", data=str(made_in / "shards"), out="run", steps=2, batch_size=2, seq_len=16,
               eval_every=0, eval_batches=0, sample_tokens=4, checkpoint_every=0, tensorboard=False, threads=1)
    summary = pretrain(TrainConfig(**cfg))
    assert "sample" in summary  # the tokenizer was found: samples and a tokenizer in final/
    assert file_sha256(elsewhere / "run" / "final" / "tokenizer.model") == read_manifest(made_in / "shards")["tokenizer"]["sha256"]
    # the old manifest form: a relative path, no copy beside the shards -> one clear error, nothing trained
    manifest_path = made_in / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tokenizer"]["path"] = "tok.model"
    del manifest["tokenizer"]["copy"]
    manifest_path.write_text(json.dumps(manifest))
    (made_in / "shards" / "tokenizer.model").unlink()
    with pytest.raises(HerdError, match="tokenizer the shards .* were made with"):
        pretrain(TrainConfig(**{**cfg, "out": "run2"}))
    assert not (elsewhere / "run2").exists()
    monkeypatch.chdir(made_in)  # from the folder the data was made in, the relative path still resolves
    assert pretrain(TrainConfig(**{**cfg, "out": str(elsewhere / "run3")})).get("sample") is not None
