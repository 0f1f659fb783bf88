"""Line-level dedup, Llama 3's rule: drop lines that appear in more than `max_count` documents
within a bucket of `bucket_docs` consecutive documents (defaults 6 and 30M: "The Llama 3 Herd of Models", section 3.1.1).

This removes boilerplate the document-level passes cannot see: navigation menus, cookie
banners, license headers, "Share this article" lines. Like CCNet's paragraph dedup, every
occurrence of a frequent line is removed (not all but one), and blank lines are never counted.

Two passes that work across workers: a counting pass hashes each document's distinct normalized
lines (`document_line_hashes`); one global pass counts them per bucket (`frequent_lines`); a
filtering pass removes the frequent ones (`remove_lines`).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_SPACE = re.compile(r"\s+")


def normalize_line(line: str) -> str:
    """Lower-cased, whitespace-collapsed, stripped: formatting differences do not hide a repeat."""
    return _SPACE.sub(" ", line).strip().lower()


def line_hash(normalized: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalized.encode(), digest_size=8).digest(), "little")


def document_line_hashes(text: str) -> np.ndarray:
    """Distinct 64-bit hashes of the document's non-blank normalized lines, uint64 [k] (sorted)."""
    seen = {normalize_line(line) for line in text.split("\n")}
    seen.discard("")
    return np.unique(np.fromiter((line_hash(s) for s in seen), dtype=np.uint64, count=len(seen)))


def frequent_lines(hashes: np.ndarray, doc_index: np.ndarray, bucket_docs: int, max_count: int = 6) -> dict[int, np.ndarray]:
    """Per bucket, the sorted line hashes seen in more than `max_count` of its documents.

    `hashes` uint64 [m] (each document's distinct line hashes, concatenated), `doc_index` int64 [m]
    (the global position of the document each hash came from); bucket = doc_index // bucket_docs.
    """
    out: dict[int, np.ndarray] = {}
    if hashes.size == 0:
        return out
    buckets = np.asarray(doc_index, dtype=np.int64) // int(bucket_docs)
    for bucket in np.unique(buckets):
        values, counts = np.unique(hashes[buckets == bucket], return_counts=True)
        frequent = values[counts > max_count]
        if frequent.size:
            out[int(bucket)] = frequent
    return out


def remove_lines(text: str, frequent: np.ndarray) -> tuple[str, int, int]:
    """Text without the lines whose normalized hash is in `frequent` (sorted uint64).

    Returns (new text, lines removed, characters removed incl. their newlines).
    """
    if frequent.size == 0:
        return text, 0, 0
    kept, removed, chars = [], 0, 0
    for line in text.split("\n"):
        norm = normalize_line(line)
        if norm:
            h = np.uint64(line_hash(norm))
            i = int(np.searchsorted(frequent, h))
            if i < frequent.size and frequent[i] == h:
                removed += 1
                chars += len(line) + 1
                continue
        kept.append(line)
    if not removed:
        return text, 0, 0
    return "\n".join(kept), removed, min(chars, len(text))
