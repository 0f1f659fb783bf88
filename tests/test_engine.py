"""The generation engine against references: transformers' generate, repeated full forwards of the
model without a cache, and sampling filters checked on hand-computed distributions."""

from __future__ import annotations


import pytest
import torch

from herd.errors import HerdError
from herd.inference import Engine, SamplingParams
from herd.inference.sampling import (filtered_probs, min_p_filter, sample_token, sampling_probs, sampling_support,
                                     top_k_filter, top_p_filter)
from herd.model import ModelArgs, Transformer

VOCAB = 320


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded machine each OpenMP barrier of
    a decode step can wait out another process's time slice (25 ms instead of 0.1 ms per call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(n_layers: int = 2, max_seq_len: int = 128, **kw) -> Transformer:
    args = ModelArgs(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
                     max_seq_len=max_seq_len, **kw)
    model = Transformer(args).eval()
    model.init_weights(std=0.1)  # peaky distributions: no near-ties to flip greedy choices
    return model


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(1)
    return tiny_model()


def greedy_reference(model: Transformer, prompt: list[int], n: int, stops: set[int] = frozenset()) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence for every new token (no cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([seq]))[0, -1].argmax())
            if tok in stops:
                break
            seq.append(tok)
    return seq[len(prompt):]


def prompts_of(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0, max_new_tokens=40)


def test_greedy_matches_transformers_generate():
    transformers = pytest.importorskip("transformers")
    from herd.checkpoint import hf_config, to_hf_state_dict

    torch.manual_seed(2)
    model = tiny_model(use_scaled_rope=True, rope_scale_factor=8.0)  # GQA (4 query heads on 2 KV heads) + 3.1 rope
    cfg = transformers.LlamaConfig.from_dict(hf_config(model.args))
    hf = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.args), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    engine = Engine(model, max_batch_size=2)
    prompts = prompts_of([7, 12], seed=3)
    ours = engine.generate(prompts, GREEDY)
    for prompt, res in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=40, min_new_tokens=40, pad_token_id=0)
        assert res.tokens == ref[0, len(prompt):].tolist()
        assert len(res.tokens) == 40 and res.finish_reason == "length"


def test_cache_decode_logits_equal_full_forward(model):
    """Every logits row the engine computes (prefill and each decode step, in a left-padded batch)
    equals the full forward of that row's unpadded sequence at the same position."""
    seen: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    try:
        engine = Engine(model, max_batch_size=3)
        prompts = prompts_of([4, 9, 6], seed=4)
        res = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10))
    finally:
        handle.remove()
    assert len(seen) == 10  # one prefill and nine decode steps
    for i, (prompt, r) in enumerate(zip(prompts, res)):
        seq = torch.tensor([prompt + r.tokens])
        with torch.no_grad():
            full = model(seq)[0]  # [S, V]
        for step, out in enumerate(seen):
            torch.testing.assert_close(out[i, -1], full[len(prompt) - 1 + step], atol=1e-5, rtol=1e-5)


def test_batch_of_different_lengths_equals_each_alone(model):
    prompts = prompts_of([3, 11, 1, 7, 5], seed=5)
    alone = [Engine(model, max_batch_size=1).generate([p], GREEDY)[0].tokens for p in prompts]
    # Batches of 4 then 1: different padding in every row, and a second batch through the same cache.
    batched = Engine(model, max_batch_size=4).generate(prompts, GREEDY)
    assert [r.tokens for r in batched] == alone
    assert alone[1] == greedy_reference(model, prompts[1], 40)
    # A context where each request fits alone but not padded together: split into smaller batches.
    tight = Engine(model, max_batch_size=4, max_seq_len=52)
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (40, 12, 40, 12, 40)]
    got = tight.generate(prompts, params)
    assert [r.tokens for r in got] == [a[:n.max_new_tokens] for a, n in zip(alone, params)]


def test_stop_tokens_and_max_tokens(model):
    prompt = prompts_of([6], seed=6)[0]
    free = greedy_reference(model, prompt, 12)
    stop = free[4]
    first = free.index(stop)  # the first occurrence ends it
    engine = Engine(model, max_batch_size=2)
    stopped, capped = engine.generate(
        [prompt, prompt], [SamplingParams(temperature=0, max_new_tokens=12, stop_tokens=[stop]),
                           SamplingParams(temperature=0, max_new_tokens=7)])
    assert stopped.tokens == free[:first] and stopped.finish_reason == "stop" and stopped.stop_token == stop
    assert capped.tokens == free[:7] and capped.finish_reason == "length" and capped.stop_token is None
    # Streaming: one event per token per running request; a finished request sends nothing more.
    steps = list(engine.stream([prompt, prompt], [SamplingParams(temperature=0, max_new_tokens=3),
                                                  SamplingParams(temperature=0, max_new_tokens=5)]))
    assert [[e.index for e in s] for s in steps] == [[0, 1]] * 3 + [[1]] * 2
    assert [e.finish_reason for e in steps[2]] == ["length", None]
    assert [s[-1].token for s in steps] == free[:5]


def test_seeded_sampling_is_reproducible_per_request(model):
    prompts = prompts_of([5, 8], seed=7)
    p = SamplingParams(temperature=1.0, top_p=1.0, seed=123, max_new_tokens=20)
    a = Engine(model, max_batch_size=1).generate([prompts[0]], p)[0].tokens
    b = Engine(model, max_batch_size=2).generate(
        prompts, [p, SamplingParams(temperature=0.8, seed=9, max_new_tokens=20)])[0].tokens
    c = Engine(model, max_batch_size=1).generate([prompts[0]], SamplingParams(temperature=1.0, top_p=1.0, seed=124,
                                                                             max_new_tokens=20))[0].tokens
    assert a == b  # same seed: same sample, whatever else shares the batch
    assert a != c  # another seed: another sample


def test_logprobs_are_log_softmax_of_unmodified_full_forward_logits(model):
    prompts = prompts_of([5, 9], seed=8)
    # Sampling with a sharp temperature and top-k: log-probs must still come from the raw logits.
    p = SamplingParams(temperature=0.5, top_k=5, seed=1, max_new_tokens=12, logprobs=True)
    res = Engine(model, max_batch_size=2).generate(prompts, p)
    for prompt, r in zip(prompts, res):
        with torch.no_grad():
            full = model(torch.tensor([prompt + r.tokens]))[0]
        want = [torch.log_softmax(full[len(prompt) - 1 + j], -1)[t].item() for j, t in enumerate(r.tokens)]
        assert r.logprobs == pytest.approx(want, abs=1e-5)
    assert Engine(model, max_batch_size=1).generate([prompts[0]], GREEDY)[0].logprobs is None


# Sorted probabilities 0.5, 0.3, 0.15, 0.05, deliberately stored out of order.
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])
LOGITS = PROBS.log()


def _kept(x: torch.Tensor) -> list[int]:
    return torch.isfinite(x).nonzero().flatten().tolist()


def test_top_p_by_hand():
    # mass of the strictly more likely tokens: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95
    assert _kept(top_p_filter(LOGITS, 0.85)) == [0, 1, 3]  # 0.8 <= 0.85 keeps the 0.15 token
    assert _kept(top_p_filter(LOGITS, 0.7)) == [1, 3]
    assert _kept(top_p_filter(LOGITS, 0.45)) == [1]
    assert _kept(top_p_filter(LOGITS, 1e-6)) == [1]  # the top token always survives
    assert _kept(top_p_filter(LOGITS, 1.0)) == [0, 1, 2, 3]
    probs = sampling_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.85))
    torch.testing.assert_close(probs, torch.tensor([0.15, 0.5, 0.0, 0.3]) / 0.95)


def test_top_k_min_p_and_temperature_by_hand():
    assert _kept(top_k_filter(LOGITS, 2)) == [1, 3]
    assert _kept(top_k_filter(LOGITS, 10)) == [0, 1, 2, 3]
    assert _kept(min_p_filter(LOGITS, 0.5)) == [1, 3]  # keep p >= 0.25
    assert _kept(min_p_filter(LOGITS, 0.3)) == [0, 1, 3]  # keep p >= 0.15
    probs = sampling_probs(LOGITS, SamplingParams(temperature=1.0, top_p=1.0, top_k=2))
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.625, 0.0, 0.375]))
    # Temperature 2 takes square roots: p_i^(1/2) / sum_j p_j^(1/2).
    root = PROBS.sqrt()
    torch.testing.assert_close(sampling_probs(LOGITS, SamplingParams(temperature=2.0, top_p=1.0)), root / root.sum())
    # Batched rows are filtered independently.
    batch = torch.stack([LOGITS, LOGITS.flip(0)])
    assert top_k_filter(batch, 1).isfinite().tolist() == [[False, True, False, False], [False, False, True, False]]


def test_seeded_draws_follow_the_filtered_distribution():
    p = SamplingParams(temperature=1.0, top_p=0.85, seed=0)
    g = p.make_generator()
    draws = torch.multinomial(sampling_probs(LOGITS, p), 4000, replacement=True, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert freq[2] == 0
    torch.testing.assert_close(freq, torch.tensor([0.15, 0.5, 0.0, 0.3]) / 0.95, atol=0.03, rtol=0)


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties"])
def test_sampling_support_equals_the_filters(kind):
    """The engine's draw looks at a few hundred candidates instead of sorting the vocabulary; the
    distribution it draws from must equal the filters' (sampling_probs), or it must defer to them."""
    gen = torch.Generator().manual_seed(0)
    vocab = 5000
    grid = [dict(top_p=0.9), dict(top_p=0.5), dict(top_p=0.999), dict(top_p=1.0, top_k=40),
            dict(top_p=0.8, top_k=300), dict(top_p=1.0, min_p=0.05), dict(top_p=0.95, min_p=0.2),
            dict(top_p=1.0), dict(top_p=1.0, top_k=vocab + 1)]
    deferred, served = 0, set()
    for trial in range(4):
        if kind == "peaked":  # a trained LM's next-token logits: a few likely tokens, a long tail
            spikes = torch.where(torch.rand(vocab, generator=gen) < 0.01, 6.0, 0.0)
            logits = torch.randn(vocab, generator=gen) * 2.5 + spikes
        elif kind == "flat":  # a random model: the nucleus holds most of the vocabulary
            logits = torch.randn(vocab, generator=gen) * 0.1
        else:  # many equal logits, also at the k-th place
            logits = torch.randint(0, 4, (vocab,), generator=gen).float()
        for cfg in grid:
            params = SamplingParams(temperature=[1.0, 0.7, 1.3, 1.0][trial], **cfg)
            expected = sampling_probs(logits.unsqueeze(0), params)[0]
            if kind != "ties":  # the dense form speculative decoding uses, fast path or not
                torch.testing.assert_close(filtered_probs(logits, params), expected, atol=1e-6, rtol=1e-4)
            support = sampling_support(logits, params)
            if support is None:
                deferred += 1
                continue
            ids, weights = support
            got = torch.zeros(vocab).index_add_(0, ids, weights / weights.sum())
            if kind == "ties":  # which of equal tokens the nucleus ends on is arbitrary: compare mass per value
                values = logits.unique()
                got = torch.stack([got[logits == v].sum() for v in values])
                expected = torch.stack([expected[logits == v].sum() for v in values])
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
            assert ((got > 0) == (expected > 0)).all()
            served.add(str(cfg))
    if kind == "peaked":  # the fast path serves real LM distributions (a 0.999 nucleus may outgrow the candidates)
        assert len(served) >= len(grid) - 1 and deferred <= 4
    else:
        assert deferred > 0  # and steps aside when the candidates may not hold the nucleus, or at top-k ties


def test_sample_token_draws_follow_the_filtered_distribution():
    p = SamplingParams(temperature=1.0, top_p=0.85, seed=0)
    g = p.make_generator()
    draws = torch.tensor([sample_token(LOGITS, p, g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert freq[2] == 0
    torch.testing.assert_close(freq, torch.tensor([0.15, 0.5, 0.0, 0.3]) / 0.95, atol=0.03, rtol=0)
    # temperature only (the whole vocabulary) and a seeded generator repeats itself
    p = SamplingParams(temperature=2.0, top_p=1.0, seed=3)
    draws = [sample_token(LOGITS, p, p.make_generator()) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    g = p.make_generator()
    freq = torch.bincount(torch.tensor([sample_token(LOGITS, p, g) for _ in range(4000)]), minlength=4).float() / 4000
    torch.testing.assert_close(freq, PROBS.sqrt() / PROBS.sqrt().sum(), atol=0.03, rtol=0)


def test_nan_logits_are_an_error_not_tokens():
    torch.manual_seed(1)
    broken = tiny_model()
    with torch.no_grad():
        broken.norm.weight[0] = float("nan")  # every logit becomes NaN
    for params in (SamplingParams(temperature=0, max_new_tokens=2), SamplingParams(temperature=0.8, max_new_tokens=2)):
        with pytest.raises(HerdError, match="NaN logits"):
            Engine(broken, max_batch_size=1, max_seq_len=32).generate([[1, 2, 3]], params)


def test_bad_requests_raise_herd_error(model):
    engine = Engine(model, max_batch_size=1, max_seq_len=32)
    with pytest.raises(HerdError, match="more than the context of 32"):
        engine.generate([list(range(30))], SamplingParams(temperature=0, max_new_tokens=3))
    with pytest.raises(HerdError, match="empty"):
        engine.generate([[]], GREEDY)
    with pytest.raises(HerdError, match="outside the model's vocabulary"):
        engine.generate([[1, VOCAB]], SamplingParams(temperature=0, max_new_tokens=3))
    with pytest.raises(HerdError, match="temperature"):
        SamplingParams(temperature=-0.1)
    with pytest.raises(HerdError, match="top_p"):
        SamplingParams(top_p=0)


@pytest.mark.slow
def test_compiled_decode_matches_eager():
    from herd.inference.engine import compiler_available

    if not compiler_available():
        pytest.skip("no C++ compiler for inductor on CPU")
    torch.manual_seed(3)
    model = tiny_model(n_layers=1, max_seq_len=48)
    prompts = prompts_of([5, 9], seed=9)
    p = SamplingParams(temperature=0, max_new_tokens=16)
    eager = Engine(model, max_batch_size=2).generate(prompts, p)
    compiled = Engine(model, max_batch_size=2, compile=True)
    assert compiled.compiled
    assert [r.tokens for r in compiled.generate(prompts, p)] == [r.tokens for r in eager]
    assert compiled.compiled  # it really ran compiled, no fallback to eager
