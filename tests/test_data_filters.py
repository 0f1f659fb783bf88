"""herd.data.filters: each rule at its threshold's edge (one document just kept, one just dropped),
statistics against hand-computed values, line rules against datatrove's GopherRepetitionFilter."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import GopherRepetitionFilter

from herd.data.filters.dirty_words import DirtyWordsConfig, DirtyWordsFilter, load_word_list
from herd.data.filters.kl import KLConfig, KLFilter, TokenDistribution, fit_token_distribution
from herd.data.filters.language import LanguageConfig, LanguageFilter, LanguageIdentifier, lid_model_path
from herd.data.filters.repetition import RepetitionConfig, RepetitionFilter, repetition_stats
from herd.errors import HerdError


def doc(text: str, i: int = 0) -> Document:
    return Document(text=text, id=str(i))


def run_filter(f, text: str):
    """(kept?, reason, metadata) of one document through the filter's datatrove run loop."""
    d = doc(text)
    out = list(f.run([d]))
    return bool(out), d.metadata.get("filter_reason"), d.metadata


def only(**limits) -> RepetitionConfig:
    """A RepetitionConfig with every rule off except the given ones."""
    cfg = RepetitionConfig(**{f.name: None for f in fields(RepetitionConfig)})
    for k, v in limits.items():
        setattr(cfg, k, v)
    return cfg


# ------------------------------------------------------------------ repetition statistics


def test_repetition_stats_hand_computed():
    text = "a b c d e a b c d e x\n\nfoo\nfoo"
    s = repetition_stats(text)
    # len(text) = 21 + 2 + 3 + 1 + 3 = 30; lines: [a..x, foo, foo] -> one duplicate "foo" (3 chars)
    assert s["dup_line_frac"] == pytest.approx(1 / 3)
    assert s["dup_line_char_frac"] == pytest.approx(3 / 30)
    # paragraphs: ["a b c d e a b c d e x", "foo\nfoo"] -> no duplicate
    assert s["dup_para_frac"] == 0 and s["dup_para_char_frac"] == 0
    # words: a b c d e a b c d e x foo foo -> W = 11 + 6 = 17 characters
    assert s["top_2gram_frac"] == pytest.approx(2 * 2 / 17)  # "a b" twice (ties: first counted wins, same value)
    assert s["top_3gram_frac"] == pytest.approx(2 * 3 / 17)
    assert s["top_4gram_frac"] == pytest.approx(2 * 4 / 17)
    # "a b c d e" occurs twice: covers both copies = 10 characters; no 6-gram repeats
    assert s["dup_5gram_frac"] == pytest.approx(10 / 17)
    assert s["dup_6gram_frac"] == 0


def test_dup_ngram_overlapping_occurrences_not_double_counted():
    # "x x x x x x" : the 5-gram (x x x x x) occurs twice overlapping; all 6 words covered once
    s = repetition_stats("x x x x x x yy")
    assert s["dup_5gram_frac"] == pytest.approx(6 / 8)
    # top 2-gram "x x" occurs 5 times * 2 chars = 10 > W = 8: capped at 1
    assert s["top_2gram_frac"] == 1.0


@pytest.mark.parametrize("n_dup,n_lines,kept", [(3, 10, True), (4, 13, False)])
def test_dup_line_frac_edge(n_dup, n_lines, kept):
    lines = [f"unique line number {i}" for i in range(n_lines - n_dup)] + ["unique line number 0"] * n_dup  # 3/10 = 0.30 (kept), 4/13 = 0.3077 (dropped)
    ok, reason, _ = run_filter(RepetitionFilter(only(dup_line_frac=0.30)), "\n".join(lines))
    assert ok is kept and (kept or reason == "dup_line_frac")


@pytest.mark.parametrize("unique_len,kept", [(58, True), (57, False)])
def test_dup_line_char_frac_edge(unique_len, kept):
    # len = unique_len + 2 newlines + 2 * 20; duplicate chars = 20 -> 20/100 = 0.2 kept, 20/99 dropped
    text = "u" * unique_len + "\n" + "d" * 20 + "\n" + "d" * 20
    ok, reason, _ = run_filter(RepetitionFilter(only(dup_line_char_frac=0.20)), text)
    assert ok is kept and (kept or reason == "dup_line_char_frac")


@pytest.mark.parametrize("n_para,n_dup,kept", [(10, 3, True), (13, 4, False)])
def test_dup_para_frac_edge(n_para, n_dup, kept):
    paras = [f"paragraph {i} says something" for i in range(n_para - n_dup)] + ["paragraph 0 says something"] * n_dup
    ok, reason, _ = run_filter(RepetitionFilter(only(dup_para_frac=0.30)), "\n\n".join(paras))
    assert ok is kept and (kept or reason == "dup_para_frac")


UNIQUE4 = ["aaaa", "bbbb", "cccc", "dddd", "eeee", "ffff", "gggg", "hhhh"]


@pytest.mark.parametrize("last,kept", [("hhhh", True), ("hhh", False)])
def test_top_2gram_edge(last, kept):
    # "ab cd" twice = 8 chars; W = 8 + 32 = 40 -> 0.20 kept; last word 3 chars: W = 39 -> 0.205 dropped
    text = "ab cd ab cd " + " ".join(UNIQUE4[:-1] + [last])
    assert repetition_stats(text)["top_2gram_frac"] == pytest.approx(8 / (36 + len(last)))
    ok, reason, _ = run_filter(RepetitionFilter(only(top_2gram_frac=0.20)), text)
    assert ok is kept and (kept or reason == "top_2gram_frac")


@pytest.mark.parametrize("last,kept", [("w18", True), ("v", False)])
def test_dup_5gram_edge(last, kept):
    # "a b c d e" twice covers 10 chars; 18 distinct 3-char fillers + `last`: W = 10 + 54 + len(last)
    # -> 10/67 = 0.1493 kept, 10/65 = 0.1538 dropped (threshold 0.15)
    filler = [f"w{i:02d}" for i in range(18)] + [last]
    text = "a b c d e " + " ".join(filler[:9]) + " a b c d e " + " ".join(filler[9:])
    assert repetition_stats(text)["dup_5gram_frac"] == pytest.approx(10 / (64 + len(last)))
    ok, reason, _ = run_filter(RepetitionFilter(only(dup_5gram_frac=0.15)), text)
    assert ok is kept and (kept or reason == "dup_5gram_frac")


def test_default_repetition_keeps_prose_drops_spam():
    prose = ("The quick brown fox jumps over the lazy dog. A second sentence follows with other words, "
             "and a third one closes the paragraph about nothing in particular.\n\nAnother paragraph here.")
    assert run_filter(RepetitionFilter(), prose)[0]
    spam = "\n".join(["buy cheap watches now click here"] * 5 + ["best deals online"])
    ok, reason, _ = run_filter(RepetitionFilter(), spam)
    assert not ok and reason in {"dup_para_frac", "dup_line_frac", "dup_line_char_frac"}
    ok, reason, _ = run_filter(RepetitionFilter(), "   \n ")
    assert not ok and reason == "empty"


def test_line_and_paragraph_rules_agree_with_datatrove():
    # line and paragraph statistics use datatrove's definitions: the same keep/drop decisions
    docs = []
    for k in range(12):
        lines = [f"line {i} of document {k} with some words" for i in range(10)]
        lines += [lines[0]] * (k % 6) + ["x" * (k * 7)]
        sep = "\n\n" if k % 2 else "\n"
        docs.append(sep.join(lines))
    kw = dict(dup_line_frac=0.30, dup_para_frac=0.30, dup_line_char_frac=0.20, dup_para_char_frac=0.20)
    theirs = GopherRepetitionFilter(**kw, top_n_grams=(), dup_n_grams=())
    ours = RepetitionFilter(only(**kw))
    mine = [ours.filter(doc(t)) for t in docs]
    ref = [theirs.filter(doc(t)) for t in docs]
    assert [m is True for m in mine] == [r is True for r in ref]
    assert any(m is True for m in mine) and any(m is not True for m in mine)


# ------------------------------------------------------------------ dirty words


def test_default_word_list_loads():
    words = load_word_list()
    assert "porn" in words and "the" not in words and len(words) > 50


@pytest.mark.parametrize("n_words,kept", [(200, True), (199, False)])
def test_dirty_words_edge(n_words, kept):
    # 2 dirty words: 2/200 = 0.01 (not above max_fraction) kept; 2/199 dropped
    words = ["word"] * (n_words - 2) + ["Porn!", "XXX"]
    ok, reason, meta = run_filter(DirtyWordsFilter(DirtyWordsConfig(max_fraction=0.01)), " ".join(words))
    assert meta["dirty_word_fraction"] == pytest.approx(2 / n_words)
    assert ok is kept and (kept or reason == "dirty_words")


def test_dirty_words_min_count_and_custom_list(tmp_path):
    # one dirty word in 10 is 10% but below min_count 2: kept
    assert run_filter(DirtyWordsFilter(), "sex " + "word " * 9)[0]
    lst = tmp_path / "words.txt"
    lst.write_text("# my list\nBanana\nred apple\n", encoding="utf-8")
    f = DirtyWordsFilter(DirtyWordsConfig(word_list=str(lst), max_fraction=0.2, min_count=1))
    ok, _, meta = run_filter(f, "I ate a red apple and a banana today")  # 2 + 1 of 9 words
    assert meta["dirty_word_fraction"] == pytest.approx(3 / 9) and not ok
    assert run_filter(f, "porn porn porn")[0]  # not on the custom list
    with pytest.raises(HerdError, match="dirty-word list"):
        DirtyWordsFilter(DirtyWordsConfig(word_list=str(tmp_path / "missing.txt")))


# ------------------------------------------------------------------ language


def test_language_filter_offline_model():
    assert lid_model_path().is_file()
    f = LanguageFilter(LanguageConfig(languages=["en"], min_score=0.5))
    ok, _, meta = run_filter(f, "This is a simple English sentence about the weather and the garden today.")
    assert ok and meta["language"] == "en" and meta["language_score"] > 0.5
    ok, reason, meta = run_filter(f, "Le chat dort sur le canapé pendant que nous préparons le dîner ce soir.")
    assert not ok and reason == "language" and meta["language"] == "fr"
    assert run_filter(LanguageFilter(LanguageConfig(min_score=0.5)), "Der Hund schläft heute im Garten.")[0]


def test_language_min_score_edge():
    text = "This is a simple English sentence about the weather."
    lang, score = LanguageIdentifier().predict(text)
    assert lang == "en"
    at = LanguageFilter(LanguageConfig(languages=["en"], min_score=round(score, 4) - 1e-4))
    above = LanguageFilter(LanguageConfig(languages=["en"], min_score=score + 1e-4))
    assert run_filter(at, text)[0]
    ok, reason, _ = run_filter(above, text)
    assert not ok and reason == "language_score"


# ------------------------------------------------------------------ token KL


def test_kl_hand_computed():
    dist = TokenDistribution({"a": 3, "b": 1}, oov_count=0, alpha=1.0)
    # q = (C + 1) / (4 + 1 * 3): a 4/7, b 2/7, oov 1/7
    expect = 0.5 * math.log(0.5 / (4 / 7)) + 0.5 * math.log(0.5 / (2 / 7))
    assert dist.kl("a b") == pytest.approx(expect)
    # "A z z": words lowercased; z is out of vocabulary
    expect = (1 / 3) * math.log((1 / 3) / (4 / 7)) + (2 / 3) * math.log((2 / 3) / (1 / 7))
    assert dist.kl("A z z") == pytest.approx(expect)
    assert dist.kl("") == 0.0


def test_kl_filter_edge_and_percentile(tmp_path):
    sample = [f"the cat sat on the mat number {w} and the dog barked at the cat" for w in
              ("one", "two", "three", "four", "five", "six", "seven", "eight")] * 5
    dist = fit_token_distribution(sample, vocab_size=100)
    path = tmp_path / "dist.json"
    dist.save(path)
    loaded = TokenDistribution.load(path)
    weird = "zebra quantum xylophone " * 10
    kl = loaded.kl(weird)
    assert kl == pytest.approx(dist.kl(weird)) and kl > dist.percentile_threshold(100)
    ok, _, meta = run_filter(KLFilter(KLConfig(str(path), max_kl=kl, min_tokens=1)), weird)
    assert ok and meta["kl_divergence"] == pytest.approx(kl, abs=1e-4)
    ok, reason, _ = run_filter(KLFilter(KLConfig(str(path), max_kl=kl - 1e-6, min_tokens=1)), weird)
    assert not ok and reason == "kl_divergence"
    # percentile: a typical sample document is kept, the outlier dropped; short docs are not judged
    f = KLFilter(KLConfig(str(path), max_percentile=99.0, min_tokens=5))
    assert run_filter(f, sample[0])[0] and not run_filter(f, weird)[0]
    assert run_filter(f, "zebra quantum")[0]
    with pytest.raises(HerdError):
        TokenDistribution.load(tmp_path / "nope.json")


def test_filter_early_exits_match_full_statistics():
    # the filter stops early (first failing rule, n-gram coverage shrinking with n); its decisions
    # must equal thresholding every statistic computed in full
    import random

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    cfg = RepetitionConfig()
    limits = {f.name: getattr(cfg, f.name) for f in fields(RepetitionConfig)}
    f = RepetitionFilter(cfg)
    n_dropped = 0
    for _ in range(300):
        words = [rng.choice(vocab[: rng.randint(5, 40)]) for _ in range(rng.randint(10, 200))]
        if rng.random() < 0.5:  # plant a repeated span
            i, n = rng.randrange(len(words)), rng.randint(5, 12)
            words += words[i:i + n] * rng.randint(1, 3)
        text = "\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12))
        full = repetition_stats(text)
        expect = all(full[k] <= v for k, v in limits.items())
        assert (f.filter(doc(text)) is True) == expect
        n_dropped += not expect
    assert 0 < n_dropped < 300


def test_kl_with_herd_tokenizer(official_tokenizer_model):
    # token ids of herd's tokenizer (the official Llama 3 tokenizer.model) instead of words
    from herd.tokenizer import Tokenizer

    dist = fit_token_distribution(["the cat sat on the mat"] * 5 + ["a dog barked at night"],
                                  tokenizer_path=str(official_tokenizer_model))
    ids = Tokenizer.from_file(official_tokenizer_model).encode("the cat sat")
    assert dist.tokenize("the cat sat") == [str(i) for i in ids]
    assert dist.kl("the cat sat on the mat") < dist.kl("zebra quantum xylophone")
