"""How well a guard agrees with labels: unsafe-vs-safe precision / recall / F1 and per-category scores.

Binary: a conversation is positive when its label is unsafe; predicted positive when the guard
flags it (herd.safety.verdict.GuardResult.flagged: score >= threshold, or the text's verdict, and
unparseable answers always). Also the false-positive rate (the model cards' third column) and the
average precision of the score (area under the precision-recall curve as scikit-learn's
average_precision_score computes it: sum over thresholds of (R_n - R_{n-1}) * P_n).

Per category (multi-label, one-vs-rest): gold positive when the label names the category,
predicted positive when the guard flags the conversation and names the category. Micro averages
pool the counts of every category; macro averages the F1 of categories that occur in the labels.
A metric with a zero denominator is 0 (scikit-learn's zero_division=0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Counts:
    """Confusion counts of one binary question."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, gold: bool, pred: bool) -> None:
        if gold and pred:
            self.tp += 1
        elif pred:
            self.fp += 1
        elif gold:
            self.fn += 1
        else:
            self.tn += 1

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def false_positive_rate(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def support(self) -> int:
        """Gold positives."""
        return self.tp + self.fn

    def to_dict(self) -> dict:
        return {"precision": round(self.precision, 6), "recall": round(self.recall, 6), "f1": round(self.f1, 6),
                "support": self.support, "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


def average_precision(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the precision-recall curve of `scores` ranking `labels` (scikit-learn's definition:
    one point per distinct score, ties counted together). 0 when there is no positive."""
    positives = sum(bool(x) for x in labels)
    if positives == 0:
        return 0.0
    pairs = sorted(zip(scores, labels), key=lambda p: -p[0])
    ap, tp, fp, prev_recall, i = 0.0, 0, 0, 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:  # a block of tied scores is one threshold
            tp += bool(pairs[j][1])
            fp += not pairs[j][1]
            j += 1
        recall = tp / positives
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall, i = recall, j
    return ap


@dataclass
class GuardMetrics:
    """Binary and per-category agreement of a guard with labels."""

    binary: Counts = field(default_factory=Counts)
    categories: dict[str, Counts] = field(default_factory=dict)
    average_precision: float | None = None
    """Of the unsafe score (None when the guard gave no scores)."""
    threshold: float | None = None

    @property
    def micro(self) -> Counts:
        total = Counts()
        for c in self.categories.values():
            total.tp, total.fp, total.fn, total.tn = total.tp + c.tp, total.fp + c.fp, total.fn + c.fn, total.tn + c.tn
        return total

    @property
    def macro_f1(self) -> float:
        present = [c.f1 for c in self.categories.values() if c.support]
        return sum(present) / len(present) if present else 0.0

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "unsafe": {**self.binary.to_dict(),
                                                        "false_positive_rate": round(self.binary.false_positive_rate, 6),
                                                        "average_precision": None if self.average_precision is None
                                                        else round(self.average_precision, 6)},
                "categories": {code: c.to_dict() for code, c in self.categories.items()},
                "micro": self.micro.to_dict(), "macro_f1": round(self.macro_f1, 6)}

    def table(self, names: dict[str, str] | None = None) -> str:
        """A plain-text report: the binary line, then one line per category and the averages."""
        names = names or {}
        b = self.binary
        lines = [f"unsafe vs safe{'' if self.threshold is None else f' (score >= {self.threshold:g})'}: "
                 f"precision {b.precision:.3f}  recall {b.recall:.3f}  F1 {b.f1:.3f}  "
                 f"false-positive rate {b.false_positive_rate:.3f}  (n={b.tp + b.fp + b.fn + b.tn}, unsafe {b.support})"]
        if self.average_precision is not None:
            lines.append(f"average precision of the unsafe score: {self.average_precision:.3f}")
        lines.append(f"{'category':<34} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}")
        for code, c in self.categories.items():
            label = f"{code} {names.get(code, '')}".strip()[:34]
            lines.append(f"{label:<34} {c.precision:>9.3f} {c.recall:>7.3f} {c.f1:>6.3f} {c.support:>8d}")
        m = self.micro
        lines.append(f"{'micro average':<34} {m.precision:>9.3f} {m.recall:>7.3f} {m.f1:>6.3f} {m.support:>8d}")
        lines.append(f"{'macro F1 (categories with support)':<34} {'':>9} {'':>7} {self.macro_f1:>6.3f}")
        return "\n".join(lines)


def guard_metrics(unsafe: Sequence[bool], gold: Sequence[Sequence[str]], flagged: Sequence[bool],
                  predicted: Sequence[Sequence[str]], codes: Sequence[str],
                  scores: Sequence[float | None] | None = None, threshold: float | None = None) -> GuardMetrics:
    """Metrics of a guard over labelled conversations.

    unsafe: each conversation's label. gold: the codes it violates (may be empty for an unsafe label
    without categories). flagged: whether the guard flagged it. predicted: the codes the guard named.
    codes: the categories to report (the guard's). scores: unsafe scores for the average precision
    (left out when any is None).
    """
    m = GuardMetrics(categories={c: Counts() for c in codes}, threshold=threshold)
    for u, g, f, p in zip(unsafe, gold, flagged, predicted, strict=True):
        m.binary.add(bool(u), bool(f))
        for code, counts in m.categories.items():
            counts.add(code in g, bool(f) and code in p)
    if scores is not None and len(scores) == len(unsafe) and all(s is not None for s in scores):
        m.average_precision = average_precision([bool(u) for u in unsafe], [float(s) for s in scores])  # type: ignore[arg-type]
    return m
