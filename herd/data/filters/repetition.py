"""Gopher-style repetition statistics and the RepetitionFilter that drops repetitive documents.

Definitions (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from
Training Gopher", appendix A1, Table A1; thresholds are that table's):

Lines are the non-empty pieces of `text.strip()` split on runs of newlines; paragraphs are the
pieces split on two or more newlines (the same splits datatrove's GopherRepetitionFilter uses).
An element is a *duplicate* when an identical element occurred earlier in the document (the
first occurrence is not counted).

- dup_line_frac        = duplicate lines / lines
- dup_line_char_frac   = characters in duplicate lines / len(text)
- dup_para_frac        = duplicate paragraphs / paragraphs
- dup_para_char_frac   = characters in duplicate paragraphs / len(text)

Words are `text.split()` (whitespace tokens); "characters of words" means the sum of their
lengths (whitespace is not counted), denoted W below.

- top_{n}gram_frac (n = 2, 3, 4): the most frequent word n-gram occurs c times (ties: the one
  that occurs first, as datatrove's Counter.most_common); its characters (sum of its words'
  lengths) times c, over W, capped at 1. 0 when no n-gram occurs twice.
- dup_{n}gram_frac (n = 5 .. 10): mark every word position covered by at least one occurrence
  of an n-gram that occurs two or more times in the document; the characters of the marked
  words over W. Overlapping occurrences are not double-counted (the paper's wording).

Differences from datatrove's GopherRepetitionFilter, so numbers are comparable with care:
datatrove splits words with spacy (punctuation becomes words), divides n-gram characters by
len(text) (whitespace included) and, for duplicated n-grams, counts only repeated occurrences
found left to right with a jump of n words after each. herd follows the paper's definition
above, which is also what RedPajama-V2's `rps_doc_frac_chars_dupe_{n}grams` computes.

Coverage by duplicated n-grams can only shrink as n grows (every duplicated n-gram contains
duplicated (n-1)-grams), so the filter stops at the first n whose value is under every
remaining threshold: for clean documents only the 5-gram statistic is computed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, fields

from datatrove.data import Document
from datatrove.pipeline.writers.disk_base import DiskWriter

from herd.data.filters.base import HerdFilter

_LINES = re.compile(r"\n+")
_PARAGRAPHS = re.compile(r"\n{2,}")


@dataclass
class RepetitionConfig:
    """Thresholds of the Gopher repetition rules; a document is dropped when a statistic exceeds its threshold. None disables a rule."""

    dup_line_frac: float | None = 0.30
    """Max fraction of lines that repeat an earlier line."""
    dup_para_frac: float | None = 0.30
    """Max fraction of paragraphs that repeat an earlier paragraph."""
    dup_line_char_frac: float | None = 0.20
    """Max fraction of characters inside repeated lines."""
    dup_para_char_frac: float | None = 0.20
    """Max fraction of characters inside repeated paragraphs."""
    top_2gram_frac: float | None = 0.20
    """Max character fraction of the most frequent word 2-gram."""
    top_3gram_frac: float | None = 0.18
    """Max character fraction of the most frequent word 3-gram."""
    top_4gram_frac: float | None = 0.16
    """Max character fraction of the most frequent word 4-gram."""
    dup_5gram_frac: float | None = 0.15
    """Max character fraction covered by duplicated word 5-grams."""
    dup_6gram_frac: float | None = 0.14
    """Max character fraction covered by duplicated word 6-grams."""
    dup_7gram_frac: float | None = 0.13
    """Max character fraction covered by duplicated word 7-grams."""
    dup_8gram_frac: float | None = 0.12
    """Max character fraction covered by duplicated word 8-grams."""
    dup_9gram_frac: float | None = 0.11
    """Max character fraction covered by duplicated word 9-grams."""
    dup_10gram_frac: float | None = 0.10
    """Max character fraction covered by duplicated word 10-grams."""


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """(number of elements equal to an earlier one, their total characters)."""
    seen: set[str] = set()
    n_dup = chars_dup = 0
    for e in elements:
        if e in seen:
            n_dup += 1
            chars_dup += len(e)
        else:
            seen.add(e)
    return n_dup, chars_dup


def line_stats(text: str) -> dict[str, float]:
    """dup_line_frac, dup_line_char_frac, dup_para_frac, dup_para_char_frac of `text` (see module docstring)."""
    stripped = text.strip()
    if not stripped:
        return dict(dup_line_frac=0.0, dup_line_char_frac=0.0, dup_para_frac=0.0, dup_para_char_frac=0.0)
    lines = _LINES.split(stripped)
    paras = _PARAGRAPHS.split(stripped)
    n_line, c_line = _duplicates(lines)
    n_para, c_para = _duplicates(paras)
    total = len(text)
    return dict(dup_line_frac=n_line / len(lines), dup_line_char_frac=c_line / total,
                dup_para_frac=n_para / len(paras), dup_para_char_frac=c_para / total)


def _ngrams(words: list[str], n: int):
    # zip over shifted slices builds the n-gram tuples in C; str hashes are cached, so cheap
    return zip(*(words[i:] for i in range(n)))


def top_ngram_frac(words: list[str], n: int, word_chars: int | None = None) -> float:
    """Character fraction of the most frequent word n-gram (0 if none repeats)."""
    if len(words) < n:
        return 0.0
    word_chars = sum(map(len, words)) if word_chars is None else word_chars
    (gram, count), = Counter(_ngrams(words, n)).most_common(1)
    if count < 2 or word_chars == 0:
        return 0.0
    return min(1.0, count * sum(map(len, gram)) / word_chars)


def dup_ngram_frac(words: list[str], n: int, word_chars: int | None = None) -> float:
    """Character fraction of words covered by word n-grams that occur at least twice."""
    if len(words) <= n:  # two occurrences, even overlapping ones, need n + 1 words
        return 0.0
    word_chars = sum(map(len, words)) if word_chars is None else word_chars
    grams = list(_ngrams(words, n))
    counts = Counter(grams)
    if len(counts) == len(grams) or word_chars == 0:
        return 0.0
    covered = bytearray(len(words))
    ones = b"\x01" * n
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = ones
    return sum(len(w) for w, c in zip(words, covered) if c) / word_chars


def repetition_stats(text: str) -> dict[str, float]:
    """Every statistic of the module docstring for `text` (no early exit; for reports and tests)."""
    stats = line_stats(text)
    words = text.split()
    wc = sum(map(len, words))
    for n in (2, 3, 4):
        stats[f"top_{n}gram_frac"] = top_ngram_frac(words, n, wc)
    for n in range(5, 11):
        stats[f"dup_{n}gram_frac"] = dup_ngram_frac(words, n, wc)
    return stats


class RepetitionFilter(HerdFilter):
    """Drops documents whose Gopher repetition statistics exceed RepetitionConfig; reason = the statistic's name."""

    name = "👯 herd repetition"

    def __init__(self, config: RepetitionConfig | None = None, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.config = config or RepetitionConfig()
        limits = {f.name: getattr(self.config, f.name) for f in fields(RepetitionConfig)}
        self._line_rules = [(k, limits[k]) for k in
                            ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac")
                            if limits[k] is not None]
        self._top = [(n, limits[f"top_{n}gram_frac"]) for n in (2, 3, 4) if limits[f"top_{n}gram_frac"] is not None]
        self._dup = [(n, limits[f"dup_{n}gram_frac"]) for n in range(5, 11) if limits[f"dup_{n}gram_frac"] is not None]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        if not text.strip():
            return False, "empty"
        if self._line_rules:
            stats = line_stats(text)
            for key, limit in self._line_rules:
                if stats[key] > limit:
                    return False, key
        words = text.split()
        wc = sum(map(len, words))
        for n, limit in self._top:
            if top_ngram_frac(words, n, wc) > limit:
                return False, f"top_{n}gram_frac"
        for i, (n, limit) in enumerate(self._dup):
            frac = dup_ngram_frac(words, n, wc)
            if frac > limit:
                return False, f"dup_{n}gram_frac"
            # coverage shrinks with n: stop once no remaining threshold can be crossed
            if frac <= min(lim for _, lim in self._dup[i:]):
                break
        return True
