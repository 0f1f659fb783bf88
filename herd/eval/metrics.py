"""Scores: multiple-choice predictions, answer extraction and matching, token F1, standard errors and
confidence intervals. Pure functions of numbers and strings; no model here.

Conventions follow EleutherAI's lm-evaluation-harness (lm_eval/api/task.py, api/metrics.py,
filters/extraction.py) so herd's numbers can be compared with it:
- acc: argmax of the summed log-likelihoods of the choices; acc_norm: argmax of log-likelihood per
  character of the choice text; acc_bytes: per UTF-8 byte. Ties go to the first choice (np.argmax).
- standard error of a mean: sample standard deviation (n - 1) / sqrt(n).
- exact match after regexes to ignore and lower-casing (GSM8K chain of thought).
- DROP F1: answers split into spans, each normalized (lower case, no punctuation except inside
  numbers, no articles, numbers as floats) to a bag of tokens; predicted and gold bags aligned one
  to one (Hungarian assignment); a pair only scores when the gold numbers appear in the prediction;
  F1 averaged over the bags (Dua et al. 2019, the DROP evaluation script).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

import numpy as np

INVALID = "[invalid]"


# ---------------------------------------------------------------------------------------------
# multiple choice


def mc_predictions(lls: Sequence[float], choices: Sequence[str]) -> dict[str, int]:
    """Predicted choice index by raw log-likelihood, per character and per byte of the choice text."""
    lls_arr = np.asarray(lls, dtype=np.float64)
    chars = np.array([float(len(c)) for c in choices])
    nbytes = np.array([float(len(c.encode("utf-8"))) for c in choices])
    return {"acc": int(np.argmax(lls_arr)), "acc_norm": int(np.argmax(lls_arr / chars)),
            "acc_bytes": int(np.argmax(lls_arr / nbytes))}


# ---------------------------------------------------------------------------------------------
# aggregation


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation (n - 1) / sqrt(n); nan for n < 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


# ---------------------------------------------------------------------------------------------
# answer extraction and exact match


def regex_extract(text: str, pattern: str | re.Pattern, group_select: int = 0, fallback: str = INVALID) -> str:
    """The `group_select`-th match of `pattern` in `text` (the first non-empty group of a match with
    several), stripped; `fallback` when nothing matches. Same rule as lm-eval's RegexFilter."""
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    matches = regex.findall(text if isinstance(text, str) else "")
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        nonempty = [m for m in match if m]
        match = nonempty[0] if nonempty else fallback
    return match.strip()


def normalize_for_match(text: str, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = True) -> str:
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    return text.lower() if ignore_case else text


def exact_match(prediction: str, reference: str, regexes_to_ignore: Sequence[str] = (),
                ignore_case: bool = True) -> float:
    """1.0 when prediction and reference are equal after removing `regexes_to_ignore` (and case)."""
    return float(normalize_for_match(prediction, regexes_to_ignore, ignore_case)
                 == normalize_for_match(reference, regexes_to_ignore, ignore_case))


# ---------------------------------------------------------------------------------------------
# DROP-style F1

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normalize_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(ch for ch in token if ch not in _PUNCT)
    if _is_number(token):
        token = str(float(token))
    return " ".join(_ARTICLES.sub(" ", token).split())


def normalize_answer(text: str) -> str:
    """DROP's answer normalization: per token (split on spaces and hyphens), then rejoined."""
    tokens = [_normalize_token(t) for t in re.split(" |-", text)]
    return " ".join(t for t in tokens if t.strip()).strip()


def _bags(answer: str | Sequence[str]) -> tuple[list[str], list[set[str]]]:
    spans = [answer] if isinstance(answer, str) else list(answer)
    normalized = [normalize_answer(s) for s in spans]
    return normalized, [set(s.split()) for s in normalized]


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
    common = len(gold & predicted)
    precision = common / len(predicted) if predicted else 1.0
    recall = common / len(gold) if gold else 1.0
    return 0.0 if precision == 0.0 and recall == 0.0 else 2 * precision * recall / (precision + recall)


def _numbers_match(gold: set[str], predicted: set[str]) -> bool:
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in predicted if _is_number(w)})


def drop_scores(prediction: str | Sequence[str], gold: str | Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction against one gold answer (each a string or a list of spans)."""
    from scipy.optimize import linear_sum_assignment

    pred_spans, pred_bags = _bags(prediction)
    gold_spans, gold_bags = _bags(gold)
    em = float(set(pred_spans) == set(gold_spans) and len(pred_spans) == len(gold_spans))
    scores = np.zeros((len(gold_bags), len(pred_bags)))
    for i, g in enumerate(gold_bags):
        for j, p in enumerate(pred_bags):
            if _numbers_match(g, p):
                scores[i, j] = _bag_f1(p, g)
    rows, cols = linear_sum_assignment(-scores)
    best = np.zeros(max(len(gold_bags), len(pred_bags)))
    for r, c in zip(rows, cols):
        best[r] = max(best[r], scores[r, c])
    return em, round(float(np.mean(best)), 2)


def drop_max_scores(prediction: str, golds: Sequence[str | Sequence[str]]) -> tuple[float, float]:
    """Best (exact match, F1) over the gold answers (empty golds are skipped, as in DROP's script)."""
    best_em, best_f1 = 0.0, 0.0
    for gold in golds:
        spans = [gold] if isinstance(gold, str) else list(gold)
        if not spans or not spans[0].strip():
            continue
        em, f1 = drop_scores(prediction, spans)
        best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return best_em, best_f1
