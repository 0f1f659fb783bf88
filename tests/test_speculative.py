"""Speculative decoding: greedy output identical to plain decoding, and sampled output distributed as
the target's own (chi-square against exactly enumerated target probabilities), with a control that
shows the statistical test rejects a wrong acceptance rule."""

from __future__ import annotations

import math

import pytest
import torch

import herd.inference.speculative as spec
from herd.errors import HerdError
from herd.inference import Engine, SamplingParams
from herd.inference.sampling import sampling_probs
from herd.inference.speculative import SpeculativeDecoder, verify
from herd.model import ModelArgs, Transformer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add waits
    yield
    torch.set_num_threads(before)


def make(seed: int, vocab: int = 64, scale: float = 3.0, **kw) -> Transformer:
    args = ModelArgs(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32,
                               max_seq_len=96, tie_embeddings=True), **kw})
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=0.1)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(scale)
    return model.eval()


def noisy_copy(model: Transformer, noise: float, seed: int) -> Transformer:
    """A draft that agrees with the target often but not always."""
    draft = make(0, model.args.vocab_size)
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    return draft


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper critical value of chi-square at alpha ~1e-4 (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """Pearson statistic over cells with expected count >= 5 (the rest pooled into one cell)."""
    stat, df, rest_obs, rest_exp = 0.0, -1, 0.0, 0.0
    for cell, p in probs.items():
        e = p * n
        o = counts.get(cell, 0)
        if e >= 5:
            stat += (o - e) ** 2 / e
            df += 1
        else:
            rest_obs, rest_exp = rest_obs + o, rest_exp + e
    rest_obs += sum(c for cell, c in counts.items() if cell not in probs)
    if rest_exp >= 5:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
        df += 1
    return stat, df


# ---------------------------------------------------------------------------------------------
# Greedy


@pytest.mark.parametrize("noise, k", [(0.0, 4), (0.3, 3), (1.5, 5)])
def test_greedy_is_token_for_token_plain_greedy(noise, k):
    target = make(1)
    draft = noisy_copy(target, noise, seed=2) if noise < 1 else make(7)  # 1.5: an unrelated draft
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (int(n),), generator=gen).tolist() for n in torch.randint(1, 12, (16,), generator=gen)]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    want = Engine(target, max_batch_size=16, max_seq_len=40).generate(prompts, params)
    decoder = SpeculativeDecoder(target, draft, k=k, max_seq_len=40)
    got = decoder.generate(prompts, params)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    rate = decoder.stats.acceptance_rate
    if noise == 0:
        assert rate == 1.0 and decoder.stats.tokens_per_round > k  # k drafts + the bonus token per round
    else:  # rejections happened, and the output is still exactly greedy's
        assert 0.1 < rate < 1.0


def test_greedy_stop_tokens_and_logprobs_match_engine():
    target = make(1)
    draft = noisy_copy(target, 0.3, seed=2)
    prompts = [[1, 2, 3], [5], [9, 8, 7, 6]]
    plain = Engine(target, max_batch_size=3, max_seq_len=40).generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=20))
    stop = plain[0].tokens[5]  # a token the first reply really produces
    params = SamplingParams(temperature=0, max_new_tokens=20, stop_tokens=[stop], logprobs=True)
    want = Engine(target, max_batch_size=3, max_seq_len=40).generate(prompts, params)
    got = SpeculativeDecoder(target, draft, k=4, max_seq_len=40).generate(prompts, params)
    for g, w in zip(got, want):
        assert (g.tokens, g.finish_reason, g.stop_token) == (w.tokens, w.finish_reason, w.stop_token)
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sampling keeps the target distribution


def test_acceptance_rule_keeps_target_marginal_and_control_fails():
    """The first emitted token of a round is distributed as p_1, whatever q is (pure rule, 20k rounds)."""
    g = torch.Generator().manual_seed(0)
    V, k, n = 5, 3, 20_000
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, -1)
    counts, control = {}, {}
    for _ in range(n):
        draft = torch.multinomial(q, 1, generator=g).flatten().tolist()
        a, extra = verify(p, q, draft, greedy=False, generator=g)
        first = draft[0] if a > 0 else extra
        counts[first] = counts.get(first, 0) + 1
        control[draft[0]] = control.get(draft[0], 0) + 1  # "always accept": the draft's own distribution
    probs = {i: float(p[0, i]) for i in range(V)}
    stat, df = chi2(counts, probs, n)
    assert stat < chi2_critical(df)
    stat_c, df_c = chi2(control, probs, n)
    assert stat_c > chi2_critical(df_c)


def _target_pair_distribution(target: Transformer, prompt: list[int], params: SamplingParams) -> dict:
    """P(t1, t2 | prompt) under the target sampling alone, enumerated exactly."""
    with torch.no_grad():
        p1 = sampling_probs(target(torch.tensor([prompt]))[0, -1:], params)[0]
        out = {}
        for t1 in torch.nonzero(p1).flatten().tolist():
            p2 = sampling_probs(target(torch.tensor([prompt + [t1]]))[0, -1:], params)[0]
            for t2 in torch.nonzero(p2).flatten().tolist():
                out[(t1, t2)] = float(p1[t1] * p2[t2])
    return out


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=2),
                                    SamplingParams(temperature=0.8, top_k=4, top_p=0.95, max_new_tokens=2)])
def test_sampled_pairs_follow_the_target_distribution(params, monkeypatch):
    target = make(1, vocab=8, scale=1.5, dim=16, n_layers=1, n_heads=2, n_kv_heads=1)
    draft = make(4, vocab=8, scale=1.5, dim=16, n_layers=1, n_heads=2, n_kv_heads=1)
    prompt = [1, 2, 3]
    probs = _target_pair_distribution(target, prompt, params)
    decoder = SpeculativeDecoder(target, draft, k=2, max_seq_len=16)
    n = 1500
    torch.manual_seed(0)

    def sample_counts() -> dict:
        counts: dict = {}
        for _ in range(n):
            cell = tuple(decoder.generate([prompt], params)[0].tokens)
            counts[cell] = counts.get(cell, 0) + 1
        return counts

    stat, df = chi2(sample_counts(), probs, n)
    assert df >= 5 and stat < chi2_critical(df)
    assert 0.05 < decoder.stats.acceptance_rate < 0.95  # both branches of the rule ran

    # Control: accepting every draft token (no rejection step) gives the draft's distribution,
    # which this test must reject.
    monkeypatch.setattr(spec, "verify", lambda p, q, d, greedy, generator=None:
                        (len(d), int(torch.multinomial(p[len(d)], 1, generator=generator))))
    stat_c, df_c = chi2(sample_counts(), probs, n)
    assert stat_c > chi2_critical(df_c)


def test_draft_with_fewer_vocabulary_rows_still_gives_greedy_output():
    """Presets pad the embedding differently (herd-1m: 4096 rows, herd-15m: 8192) around one tokenizer."""
    target = make(1, vocab=96)
    draft = make(2, vocab=64)
    prompts = [[1, 2, 3], [60, 61]]
    params = SamplingParams(temperature=0, max_new_tokens=16)
    want = Engine(target, max_batch_size=2, max_seq_len=40).generate(prompts, params)
    got = SpeculativeDecoder(target, draft, k=3, max_seq_len=40).generate(prompts, params)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    with pytest.raises(HerdError, match="at least 1"):
        SpeculativeDecoder(target, draft, k=0)
