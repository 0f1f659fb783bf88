"""DirtyWordsFilter: drops documents whose fraction of "dirty" words exceeds a threshold.

Words are the lowercase letter runs of the text (`[^\\W\\d_]+`, Unicode-aware), so punctuation
and digits never glue onto a word. The word list is a plain text file, one word or phrase per
line ('#' comments allowed); phrases of up to a few words are matched on consecutive words.
The default list (dirty_words_en.txt next to this file) is short and English; pass your own
with `word_list`. Llama 3 used dirty-word counting without publishing its list or threshold
("The Llama 3 Herd of Models", section 3.1.1); the default `max_fraction` 0.01 (1 word in 100) drops pornographic spam
while keeping, e.g., medical text that mentions anatomy once or twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.writers.disk_base import DiskWriter

from herd.data.filters.base import HerdFilter
from herd.errors import HerdError

DEFAULT_WORD_LIST = Path(__file__).with_name("dirty_words_en.txt")
_WORDS = re.compile(r"[^\W\d_]+")


@dataclass
class DirtyWordsConfig:
    """Dirty-word counting."""

    word_list: str = ""
    """Path of the word list (one word or phrase per line); empty = herd's default English list."""
    max_fraction: float = 0.01
    """Drop a document when dirty words / all words exceeds this (a phrase counts as its word count)."""
    min_count: int = 2
    """Never drop a document with fewer dirty words than this (one stray word is not spam)."""


def load_word_list(path: str | Path | None = None) -> set[str]:
    """The lowercase entries of a word-list file (default: herd's English list)."""
    path = Path(path) if path else DEFAULT_WORD_LIST
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise HerdError(f"cannot read the dirty-word list {path} ({e.strerror}); pass an existing file "
                        "with one word per line.") from e
    return {" ".join(_WORDS.findall(line.lower())) for line in lines
            if line.strip() and not line.lstrip().startswith("#")} - {""}


def dirty_word_count(words: list[str], vocab: set[str], max_phrase: int = 1) -> int:
    """Words of `words` (lowercase) that are listed; a listed phrase of n words adds n per occurrence."""
    count = sum(map(vocab.__contains__, words))
    if max_phrase > 1:
        heads = {e.split(" ", 1)[0] for e in vocab if " " in e}
        if not heads.isdisjoint(words):  # only then pay for the per-word phrase scan
            for i, w in enumerate(words):
                if w in heads:
                    for n in range(2, max_phrase + 1):
                        if " ".join(words[i:i + n]) in vocab:
                            count += n
    return count


class DirtyWordsFilter(HerdFilter):
    """Annotates metadata["dirty_word_fraction"]; drops (reason "dirty_words") past the threshold."""

    name = "🔞 herd dirty words"

    def __init__(self, config: DirtyWordsConfig | None = None, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.config = config or DirtyWordsConfig()
        self.vocab = load_word_list(self.config.word_list or None)
        self.max_phrase = max((e.count(" ") + 1 for e in self.vocab), default=1)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        words = _WORDS.findall(doc.text.lower())
        if not words:
            doc.metadata["dirty_word_fraction"] = 0.0
            return True
        count = dirty_word_count(words, self.vocab, self.max_phrase)
        frac = count / len(words)
        doc.metadata["dirty_word_fraction"] = frac
        if count >= self.config.min_count and frac > self.config.max_fraction:
            return False, "dirty_words"
        return True
