"""Continuous batching, the paged KV pool, prefix caching, chunked prefill and preemption.

The reference for every output is greedy decoding by full forwards of the model without any cache
(and, through tests/test_engine.py, transformers' generate): whatever the scheduler does, each
request must get exactly the tokens it gets alone.
"""

from __future__ import annotations

import pytest
import torch

from herd.inference import Engine, SamplingParams
from herd.inference.kv_pool import BlockManager
from herd.inference.sampling import apply_penalties
from tests.test_engine import VOCAB, greedy_reference, prompts_of, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(11)
    return tiny_model(max_seq_len=256)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, **kw)


def run_all(engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]) -> dict[int, list[int]]:
    """Drive the step loop, adding requests at the given steps; returns tokens per request id."""
    out: dict[int, list[int]] = {}
    step = 0
    while engine.has_work() or any(k >= step for k in arrivals):
        for prompt, p in arrivals.get(step, []):
            out[engine.add_request(prompt, p)] = []
        for e in engine.step():
            if e.finish_reason != "stop":
                out[e.index].append(e.token)
        step += 1
    return out


def test_requests_joining_and_leaving_mid_batch_match_each_alone(model):
    prompts = prompts_of([5, 17, 3, 40, 9, 22, 1, 13], seed=21)
    lengths = [30, 4, 18, 9, 25, 2, 12, 7]
    engine = Engine(model, max_batch_size=3, block_size=8, prefill_chunk=16)
    arrivals: dict[int, list] = {}
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        arrivals.setdefault(2 * i, []).append((p, greedy(n)))  # one new request every other step
    got = run_all(engine, arrivals)
    for rid, (p, n) in enumerate(zip(prompts, lengths)):
        assert got[rid] == greedy_reference(model, p, n), rid
    assert engine.blocks.leaked() == 0 and engine.blocks.num_free() == engine.blocks.usable


def test_short_request_does_not_wait_for_a_long_one(model):
    engine = Engine(model, max_batch_size=4, block_size=8)
    long_id = engine.add_request(prompts_of([6], seed=1)[0], greedy(100))
    for _ in range(5):
        engine.step()
    short_id = engine.add_request(prompts_of([6], seed=2)[0], greedy(3))
    finished_at = {}
    step = 5
    while engine.has_work():
        step += 1
        for e in engine.step():
            if e.finish_reason:
                finished_at[e.index] = step
    assert finished_at[short_id] <= 5 + 3 + 1  # admitted at once, three tokens later it is done
    assert finished_at[long_id] > finished_at[short_id]


def test_prefix_cache_reuses_blocks_and_keeps_outputs(model):
    system = prompts_of([40], seed=3)[0]  # a shared "system prompt" of 5 full blocks of 8
    a, b = system + [7, 8, 9], system + [10, 11]
    engine = Engine(model, max_batch_size=2, block_size=8)
    first = engine.generate([a], greedy(10))[0]
    assert first.cached_tokens == 0
    second = engine.generate([b], greedy(10))[0]
    assert second.cached_tokens == 40
    assert second.tokens == greedy_reference(model, b, 10)
    # A chat turn: the whole previous exchange (prompt + reply) is a prefix of the next prompt.
    turn2 = a + first.tokens + [3, 4, 5]
    third = engine.generate([turn2], greedy(6))[0]
    assert third.cached_tokens == (len(a) + len(first.tokens)) // 8 * 8
    assert third.tokens == greedy_reference(model, turn2, 6)
    # Without the prefix cache: same tokens, nothing cached.
    plain = Engine(model, max_batch_size=2, block_size=8, prefix_cache=False)
    again = plain.generate([turn2], greedy(6))[0]
    assert again.cached_tokens == 0 and again.tokens == third.tokens


def test_concurrent_requests_share_cached_blocks(model):
    system = prompts_of([32], seed=4)[0]
    engine = Engine(model, max_batch_size=4, block_size=8)
    engine.generate([system + [1]], greedy(2))
    ids = [engine.add_request(system + [t], greedy(20)) for t in (5, 6, 7)]
    out = {i: [] for i in ids}
    first = engine.step()  # admits all three on the 4 cached blocks: one token left each, so they decode at once
    assert [e.cached_tokens for e in first] == [32, 32, 32]
    for e in first:
        out[e.index].append(e.token)
    shared = engine.blocks.match_prefix(system, 4)
    assert len(shared) == 4 and all(engine.blocks.ref[b] == 3 for b in shared)
    while engine.has_work():
        for e in engine.step():
            out[e.index].append(e.token)
    for i, t in zip(ids, (5, 6, 7)):
        assert out[i] == greedy_reference(model, system + [t], 20)
    assert engine.blocks.leaked() == 0


def test_chunked_prefill_equals_one_shot(model):
    prompt = prompts_of([100], seed=5)[0]
    want = greedy_reference(model, prompt, 8)
    for chunk in (7, 32, 512):
        engine = Engine(model, max_batch_size=2, block_size=16, prefill_chunk=chunk)
        assert engine.generate([prompt], greedy(8))[0].tokens == want, chunk
    # While a long prompt prefills in chunks, a running request keeps decoding every step.
    engine = Engine(model, max_batch_size=2, block_size=16, prefill_chunk=10)
    short = engine.add_request(prompts_of([4], seed=6)[0], greedy(30))
    engine.step()
    engine.add_request(prompt, greedy(4))
    for _ in range(8):  # 100 prompt tokens in chunks of at most 10 (minus the decode row's share)
        assert [e.index for e in engine.step()][:1] == [short]


def test_preemption_with_a_small_pool_still_matches(model):
    prompts = prompts_of([20, 25, 30, 18], seed=7)
    # 12 blocks of 8 = 96 tokens for 4 requests that grow to ~60-70 tokens each: must preempt.
    engine = Engine(model, max_batch_size=4, block_size=8, cache_tokens=96, max_seq_len=96)
    res = engine.generate(prompts, greedy(40))
    assert engine.scheduler.preemptions > 0
    for p, r in zip(prompts, res):
        assert r.tokens == greedy_reference(model, p, 40)
    assert engine.blocks.leaked() == 0


def test_abort_frees_blocks_at_once(model):
    engine = Engine(model, max_batch_size=2, block_size=8)
    rid = engine.add_request(prompts_of([30], seed=8)[0], greedy(50))
    engine.step()
    engine.step()
    assert engine.blocks.num_free() < engine.blocks.usable
    assert engine.abort(rid) and not engine.has_work()
    assert engine.blocks.leaked() == 0 and engine.blocks.num_free() == engine.blocks.usable
    assert not engine.abort(rid)


def test_stream_consumer_stopping_early_releases_everything(model):
    engine = Engine(model, max_batch_size=2)
    for _ in engine.stream(prompts_of([5, 6], seed=9), greedy(30)):
        break
    assert not engine.has_work() and engine.blocks.leaked() == 0


def test_block_manager_lru_eviction_and_hash_checks():
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable blocks
    a = bm.allocate(2)
    h1 = bm.publish(a[0], None, [1, 2])
    bm.publish(a[1], h1, [3, 4])
    assert bm.match_prefix([1, 2, 3, 4, 5], 2) == a
    assert bm.match_prefix([1, 2, 3, 9], 2) == a[:1]  # second block differs
    assert bm.match_prefix([9, 2, 3, 4], 2) == []  # chained: a different first block spoils the rest
    bm.release(a)
    assert bm.num_free() == 3 and bm.match_prefix([1, 2, 3, 4], 2) == a  # freed but still cached
    fresh = bm.allocate(2)  # the never-used block first, then the least recently freed (a[0])
    assert a[0] in fresh and a[1] not in fresh
    assert bm.match_prefix([1, 2, 3, 4], 2) == []  # its first block was evicted
    bm.release(fresh)
    assert bm.leaked() == 0


def test_penalties_by_hand():
    logits = torch.zeros(6)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [2, 2, 2, 4], p)
    assert out.tolist() == [0, 0, -(0.5 + 3 * 0.25), 0, -(0.5 + 0.25), 0]
    # Greedy with a frequency penalty never repeats a token when the logits are flat.
    model = tiny_model(n_layers=1)
    with torch.no_grad():
        model.output.weight.zero_()
    res = Engine(model).generate([[1, 2]], greedy(6, frequency_penalty=1.0))[0]
    assert len(set(res.tokens)) == 6


def test_top_logprobs_and_prompt_logprobs_equal_full_forward(model):
    prompt = prompts_of([21], seed=12)[0]
    engine = Engine(model, max_batch_size=2, block_size=8)
    engine.generate([prompt], greedy(3))  # warm the prefix cache: prompt logprobs must bypass it
    p = greedy(4, logprobs=True, top_logprobs=3, prompt_logprobs=True)
    events = [e for step in engine.stream([prompt], p) for e in step]
    tokens = [e.token for e in events]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0], -1)  # [S, V]
    plp = events[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(prompt)
    for t in range(1, len(prompt)):
        got, top = plp[t]
        assert got == pytest.approx(lp[t - 1, prompt[t]].item(), abs=1e-5)
        assert top[0][0] == int(lp[t - 1].argmax())
    for j, e in enumerate(events):
        row = lp[len(prompt) - 1 + j]
        assert e.logprob == pytest.approx(row[e.token].item(), abs=1e-5)
        assert [i for i, _ in e.top_logprobs] == row.topk(3).indices.tolist()
    assert events[0].cached_tokens == 0


def test_vocabulary_check_uses_vocab(model):
    from herd.errors import HerdError

    with pytest.raises(HerdError, match="outside the model's vocabulary"):
        Engine(model).add_request([VOCAB + 3], greedy(2))


def test_context_that_is_not_a_whole_number_of_blocks(model):
    prompt = prompts_of([13], seed=13)[0]
    engine = Engine(model, max_batch_size=2, block_size=8, max_seq_len=21)  # 3 blocks, 21 usable positions
    assert engine.generate([prompt], greedy(8))[0].tokens == greedy_reference(model, prompt, 8)
