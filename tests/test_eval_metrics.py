"""herd.eval.metrics against hand-computed values and lm-eval's own implementations."""

from __future__ import annotations

import math

import pytest

from herd.eval.metrics import (INVALID, drop_max_scores, drop_scores, exact_match, mc_predictions, mean_stderr,
                               regex_extract, wilson_interval)
from herd.eval.tasks.generation import GSM8K_FLEXIBLE, GSM8K_IGNORE, GSM8K_STRICT


def test_acc_and_acc_norm_differ_when_a_long_choice_has_more_total_but_less_per_character():
    # "a": -10 in total, -10 per character; "abcdefgh": -12 in total, -1.5 per character
    preds = mc_predictions([-10.0, -12.0], ["a", "abcdefgh"])
    assert preds["acc"] == 0 and preds["acc_norm"] == 1
    # bytes differ from characters for non-ASCII text: "éé" is 2 characters but 4 bytes
    preds = mc_predictions([-3.0, -5.0], ["éé", "abcd"])  # per char -1.5 vs -1.25; per byte -0.75 vs -1.25
    assert preds["acc_norm"] == 1 and preds["acc_bytes"] == 0


def test_ties_go_to_the_first_choice():
    assert mc_predictions([-1.0, -1.0, -1.0], ["x", "y", "z"])["acc"] == 0


def test_stderr_and_wilson_by_hand():
    # mean 0.75, sample variance ((3 * 0.25^2) + 0.75^2) / 3 = 0.25, so stderr 0.5 / 2
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)
    assert math.isnan(mean_stderr([1.0]))
    lo, hi = wilson_interval(8, 10)  # p = 0.8: centre 0.99207 / 1.38415, half 1.96 * 0.16 / 1.38415
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_stderr_matches_lm_eval():
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    values = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert mean_stderr(values) == pytest.approx(lm_metrics.mean_stderr(values))


GENERATIONS = [
    "Natalia sold 48 clips. The answer is 72.",
    "She pays $1,200 in total. The answer is $1,200.",
    "So 5 + 4 = 9. the answer is 9",
    "First 3 then 17, finally 25.5",
    "no digits here",
    "The answer is -3.\n\nQ: next",
]


def test_gsm8k_extraction_matches_lm_eval_regex_filter():
    extraction = pytest.importorskip("lm_eval.filters.extraction")
    strict = extraction.RegexFilter(regex_pattern=GSM8K_STRICT)
    flexible = extraction.RegexFilter(regex_pattern=GSM8K_FLEXIBLE, group_select=-1)
    ref_strict = strict.apply([[g] for g in GENERATIONS], None)
    ref_flexible = flexible.apply([[g] for g in GENERATIONS], None)
    assert [regex_extract(g, GSM8K_STRICT) for g in GENERATIONS] == [r[0] for r in ref_strict]
    assert [regex_extract(g, GSM8K_FLEXIBLE, group_select=-1) for g in GENERATIONS] == [r[0] for r in ref_flexible]
    assert regex_extract("nothing", GSM8K_STRICT) == INVALID


def test_exact_match_matches_lm_eval():
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    pairs = [("1,200", "1200"), ("$18", "18"), ("72.", "72"), ("#### 5", "5"), ("Nine", "nine"), ("7", "8")]
    for pred, ref in pairs:
        want = lm_metrics.exact_match_hf_evaluate([pred], [ref], regexes_to_ignore=list(GSM8K_IGNORE),
                                                  ignore_case=True)["exact_match"]
        assert exact_match(pred, ref, GSM8K_IGNORE) == want


DROP_CASES = [
    ("12 points", ("12",)),
    ("the Lions", ("Lions",)),
    ("Swedish", ("swedish",)),
    ("1,200", ("1200",)),
    ("36-yard field goal", ("36",)),
    ("Jason Hanson and Connor Barth", ("Jason Hanson", "Connor Barth")),
    ("Calvin Johnson", ("Jason Hanson", "Connor Barth")),
    ("3.0", ("3",)),
    ("", ("touchdown",)),
    ("a touchdown pass", ("touchdown",)),
    ("Tampa Bay, Detroit", ("Detroit", "Tampa Bay", "Lions")),
]


def test_drop_scores_match_lm_eval_drop_metric():
    drop_utils = pytest.importorskip("lm_eval.tasks.drop.utils")
    for pred, gold in DROP_CASES:
        em_ref, f1_ref = drop_utils.get_metrics(pred, gold)
        em, f1 = drop_scores(pred, list(gold))
        assert (em, f1) == (pytest.approx(float(em_ref)), pytest.approx(float(f1_ref))), (pred, gold)


def test_drop_best_over_golds_by_hand():
    # "12 points" vs gold "12": tokens {12.0, points} vs {12.0}: P 1/2, R 1, F1 2/3 -> rounded 0.67
    assert drop_max_scores("12 points", [["7"], ["12"]]) == (0.0, 0.67)
    assert drop_max_scores("Swedish", [["swedish"]]) == (1.0, 1.0)
    assert drop_max_scores("anything", [[""]]) == (0.0, 0.0)  # empty golds do not count
