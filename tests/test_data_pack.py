"""Token shards, mixing and packing: shards decode back to exactly the written documents, in order,
with correct boundaries; training windows come from memmaps; domain mixing hits its targets."""

from __future__ import annotations

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
