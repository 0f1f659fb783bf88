"""Dedup: URL normalization and most-recent survivor, MinHash LSH recall / false positives on a
planted near-duplicate set (similarities measured with plain Python sets), Llama 3's line rule."""

from __future__ import annotations

import random

import numpy as np
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor

from herd.data.dedup import (cluster_duplicates, document_bands, frequent_lines, hash_functions, normalize_url,
                             remove_lines, document_line_hashes, url_duplicates, url_key)
from herd.data.dedup.stages import ApplyDedup, DedupPlan, StageReader, StageWriter


def test_normalize_url_equivalences():
    same = ["http://WWW.Example.com:80/a/b/?y=2&x=1#frag", "https://example.com/a/b?x=1&y=2&utm_source=tw",
            "example.com/a/b/?x=1&y=2"]
    assert len({normalize_url(u) for u in same}) == 1
    assert normalize_url("http://example.com/a") != normalize_url("http://example.com/b")
    assert normalize_url("http://example.com:8080/") != normalize_url("http://example.com/")
    assert url_key(None) == 0 and url_key("") == 0 and url_key("http://a.org") != 0


def test_url_dedup_keeps_most_recent():
    urls = ["http://a.org/x", "https://www.a.org/x/", "http://b.org", None, None, "http://a.org/x#top", "http://b.org/"]
    dates = [10.0, 30.0, 5.0, -np.inf, -np.inf, 20.0, 5.0]
    drop = url_duplicates(np.array([url_key(u) for u in urls], dtype=np.uint64), np.array(dates))
    # a.org/x: index 1 is newest; b.org: tie -> earliest (2) survives; no-URL documents never dropped
    assert drop.tolist() == [True, False, False, False, False, True, True]


def _vocab(rng: random.Random, n: int = 4000) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(n)]


def _jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t):
        w = t.lower().split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def _mutate(rng: random.Random, words: list[str], vocab: list[str], k: int) -> list[str]:
    out = list(words)
    for pos in rng.sample(range(len(out)), k):
        out[pos] = rng.choice(vocab)
    return out


def test_minhash_recall_and_false_positives():
    rng = random.Random(0)
    vocab = _vocab(rng)
    weights = [1 / (i + 1) for i in range(len(vocab))]  # Zipf-like, so random documents share common words
    docs = [rng.choices(vocab, weights, k=rng.randint(200, 400)) for _ in range(300)]
    near, far = [], []
    for i in range(100):  # ~90% 5-gram overlap: replace 1 word in ~100
        src = docs[i]
        near.append((i, _mutate(rng, src, vocab, max(1, len(src) // 100))))
    for i in range(100, 150):  # ~0.4 overlap: LSH keeps both with probability ~0.99
        src = docs[i]
        far.append((i, _mutate(rng, src, vocab, len(src) // 10)))
    texts = [" ".join(d) for d in docs] + [" ".join(d) for _, d in near] + [" ".join(d) for _, d in far]
    sims_near = [_jaccard(texts[i], " ".join(d)) for i, d in near]
    sims_far = [_jaccard(texts[i], " ".join(d)) for i, d in far]
    assert 0.85 <= np.mean(sims_near) <= 0.95 and np.mean(sims_far) < 0.5

    a, b = hash_functions(14 * 8)
    bands = np.stack([document_bands(t, a, b, 14, 8) for t in texts])
    drop, roots = cluster_duplicates(bands)
    near_idx = np.arange(300, 400)
    recall = drop[near_idx].mean()
    # every detected copy points at its own original
    assert all(roots[300 + j] == near[j][0] for j in range(100) if drop[300 + j])
    false_pos = drop[:300].mean()  # originals and unrelated documents must all stay
    far_dropped = drop[400:].mean()
    print(f"MinHash 14x8: recall {recall:.3f} at mean J={np.mean(sims_near):.3f}; "
          f"FPR on distinct docs {false_pos:.3f}; dropped at mean J={np.mean(sims_far):.2f}: {far_dropped:.3f}")
    assert recall >= 0.95
    assert false_pos == 0.0
    assert far_dropped <= 0.1


def test_minhash_empty_and_digit_sensitive():
    a, b = hash_functions(16)
    assert not document_bands("", a, b, 4, 4).any()
    # digits are kept (datatrove maps them to 0): documents differing only in numbers are distinct
    x = " ".join(f"row {i} value {i * 7}" for i in range(50))
    y = " ".join(f"row {i} value {i * 7 + 1}" for i in range(50))
    drop, _ = cluster_duplicates(np.stack([document_bands(t, a, b, 4, 4) for t in (x, y, x)]))
    assert drop.tolist() == [False, False, True]


def _line_docs() -> list[str]:
    docs = []
    for i in range(40):
        lines = [f"Unique sentence number {i} about topic {i * 13}.", "Share this article on social media",
                 "  COPYRIGHT 2024   All rights reserved ", f"Another line only document {i} has."]
        if i < 6:
            lines.append("seen in exactly six documents")
        if i < 7:
            lines.append("seen in exactly seven documents")
        lines.append("")
        docs.append("\n".join(lines))
    return docs


def test_line_rule_removes_boilerplate_keeps_rest():
    docs = _line_docs()
    per_doc = [document_line_hashes(d) for d in docs]
    hashes = np.concatenate(per_doc)
    owner = np.repeat(np.arange(len(docs)), [h.size for h in per_doc])
    frequent = frequent_lines(hashes, owner, bucket_docs=30_000_000, max_count=6)
    assert list(frequent) == [0] and frequent[0].size == 3  # 2 boilerplate lines + the 7-document line
    for i, d in enumerate(docs):
        text, removed, chars = remove_lines(d, frequent[0])
        assert "Share this article" not in text and "COPYRIGHT" not in text and "seven documents" not in text
        assert f"Unique sentence number {i} " in text and f"only document {i} has." in text
        assert ("seen in exactly six documents" in text) == (i < 6)
        assert removed == (3 if i < 7 else 2) and chars == len(d) - len(text)
    # buckets: with 20-document buckets the 7-document line (all in bucket 0) still counts 7, but a
    # line in 5 documents of each bucket (10 overall) is kept
    extra = [d + ("\nhalf and half" if i % 20 < 5 else "") for i, d in enumerate(docs)]
    per_doc = [document_line_hashes(d) for d in extra]
    frequent = frequent_lines(np.concatenate(per_doc), np.repeat(np.arange(40), [h.size for h in per_doc]),
                              bucket_docs=20, max_count=6)
    assert frequent[0].size == 3 and frequent[1].size == 2
    assert "half and half" in remove_lines(extra[0], frequent[0])[0]


def test_dedup_stages_on_datatrove_executor(tmp_path):
    rng = random.Random(1)
    vocab = _vocab(rng, 500)
    base = [" ".join(rng.choices(vocab, k=150)) for _ in range(12)]
    docs = []
    for i, t in enumerate(base):
        docs.append(Document(text=t + "\nsubscribe to our newsletter", id=f"d{i}",
                             metadata={"url": f"http://site.org/{i}", "date": "2024-01-01", "domain": "general"}))
    docs.append(Document(text=base[0] + " extra", id="near0", metadata={"domain": "general"}))  # near copy of d0
    docs.append(Document(text="newer version", id="d3new", metadata={"url": "https://www.site.org/3/", "date": "2024-06-01"}))
    work = tmp_path / "work"
    chunks = [docs[:7], docs[7:]]

    def feed(data, rank, world_size):
        yield from chunks[rank]

    LocalPipelineExecutor([feed, StageWriter(str(work))], tasks=2, workers=1, logging_dir=str(tmp_path / "l1")).run()
    LocalPipelineExecutor([DedupPlan(str(work), n_ranks=2)], tasks=1, logging_dir=str(tmp_path / "l2")).run()
    kept = []

    def collect(data, rank, world_size):
        for d in data:
            kept.append(d)
            yield d

    LocalPipelineExecutor([StageReader(str(work)), ApplyDedup(str(work)), collect], tasks=2, workers=1,
                          logging_dir=str(tmp_path / "l3")).run()
    ids = [d.id for d in kept]
    assert "near0" not in ids and "d3" not in ids and "d3new" in ids and "d0" in ids
    assert len(ids) == 12
    assert all("newsletter" not in d.text for d in kept)
