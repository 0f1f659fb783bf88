"""herd.eval.scorer: shared-context log-likelihoods equal plain forwards; rolling windows as lm-eval cuts them."""

from __future__ import annotations

import math
import random

import pytest
import torch

from herd.errors import HerdError
from herd.eval.scorer import ScorerConfig, _prefix_groups, loglikelihoods, rolling_windows
from herd.model import ModelArgs, Transformer

V = 97


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=16, max_seq_len=96)
    m = Transformer(args)
    m.init_weights(std=0.3)
    return m.eval()


def naive(model: Transformer, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One plain forward over context + continuation[:-1], as lm-eval's Hugging Face backend does it."""
    x = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0], dim=-1)
    rows = logp[len(ctx) - 1:len(ctx) - 1 + len(cont)]
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def random_requests(seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    shared = [rng.randrange(V) for _ in range(40)]
    reqs = []
    for i in range(14):
        if i < 6:
            ctx = [1] + shared + [rng.randrange(V) for _ in range(rng.randint(1, 9))]
        elif i == 6:
            ctx = [1] + shared  # a context that is exactly the shared prefix
        else:
            ctx = [1] + [rng.randrange(V) for _ in range(rng.randint(0, 20))]
        for _ in range(rng.randint(1, 4)):
            reqs.append((ctx, [rng.randrange(V) for _ in range(rng.randint(1, 7))]))
    return reqs


@pytest.mark.parametrize("cfg", [ScorerConfig(), ScorerConfig(batch_size=2, max_batch_tokens=24, min_shared_prefix=8),
                                 ScorerConfig(batch_size=1, max_batch_tokens=4, min_shared_prefix=1000)])
def test_scorer_equals_plain_forward(model, cfg):
    reqs = random_requests(0)
    got = loglikelihoods(model, reqs, cfg)
    for (ll, greedy), (ctx, cont) in zip(got, reqs):
        ref_ll, ref_greedy = naive(model, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_greedy_flag_is_true_for_the_models_own_continuation(model):
    ctx = [1, 5, 9, 2]
    cont = []
    x = list(ctx)
    for _ in range(5):  # the greedy continuation of ctx
        with torch.no_grad():
            nxt = int(model(torch.tensor([x]))[0, -1].argmax())
        cont.append(nxt)
        x.append(nxt)
    (ll, greedy), (_, other) = loglikelihoods(model, [(ctx, cont), (ctx, cont[:-1] + [(cont[-1] + 1) % V])])
    assert greedy and not other


def test_shared_prefix_groups():
    a = tuple([1] + [7] * 50 + [2, 3])
    b = tuple([1] + [7] * 50 + [4])
    c = tuple([1, 9, 9])
    groups = _prefix_groups([a, b, c], min_shared=32)
    assert (51, [1, 0]) in groups or (51, [0, 1]) in groups  # a and b share begin_of_text + 50 tokens
    assert (0, [2]) in groups
    # a context equal to the whole prefix still keeps one token of its own
    shared, members = _prefix_groups([a, a[:51]], min_shared=32)[0]
    assert shared == 50 and sorted(members) == [0, 1]


def test_rejects_requests_that_cannot_be_scored(model):
    with pytest.raises(HerdError, match="more than the context"):
        loglikelihoods(model, [([1] * 90, [2] * 10)])
    with pytest.raises(HerdError, match="empty continuation"):
        loglikelihoods(model, [([1], [])])
    with pytest.raises(HerdError, match="vocabulary"):
        loglikelihoods(model, [([1], [V])])


def test_rolling_windows_match_lm_eval():
    lm_utils = pytest.importorskip("lm_eval.utils")
    rng = random.Random(1)
    for n, max_len in [(1, 4), (10, 4), (12, 4), (25, 7), (3, 16)]:
        tokens = [rng.randrange(V) for _ in range(n)]
        ref = [lm_utils.make_disjoint_window(w) for w in
               lm_utils.get_rolling_token_windows(token_list=tokens, prefix_token=99, max_seq_len=max_len, context_len=1)]
        assert rolling_windows(tokens, 99, max_len) == [(list(a), list(b)) for a, b in ref]
        covered = [t for _, cont in rolling_windows(tokens, 99, max_len) for t in cont]
        assert covered == tokens  # each token predicted exactly once


def test_rolling_loglikelihood_equals_one_window_when_the_document_fits(model):
    tokens = list(range(3, 40))
    windows = rolling_windows(tokens, 1, model.args.max_seq_len)
    assert len(windows) == 1
    total = sum(ll for ll, _ in loglikelihoods(model, windows))
    assert total == pytest.approx(naive(model, [1], tokens)[0], abs=1e-4)
    # with a short context the windows still add up to a proper (different) log-likelihood
    short = sum(ll for ll, _ in loglikelihoods(model, rolling_windows(tokens, 1, 8), max_length=8))
    assert short < 0 and short != pytest.approx(total, abs=1e-3)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16, max_seq_len=16)
    m = Transformer(args)
    m.init_weights()
    with torch.no_grad():
        m.output.weight.zero_()  # every logit 0: p = 1/50 for every token
    tokens = list(range(40))
    lls = loglikelihoods(m.eval(), rolling_windows(tokens, 0, 16), max_length=16)
    ppl = math.exp(-sum(ll for ll, _ in lls) / len(tokens))
    assert ppl == pytest.approx(50.0, rel=1e-5)
