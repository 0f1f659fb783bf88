"""Packing and SFT batches: best-fit bins against a brute-force reference, the masked loss of a batch
against transformers' LlamaForCausalLM with labels -100 outside the mask (same converted weights,
fp32, 1e-5), a packed batch against its examples one by one, and a loader that resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from herd.checkpoint import hf_config, to_hf_state_dict
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer
from herd.posttrain import (IGNORE_INDEX, SFTBatchLoader, SFTDataConfig, SFTRows, build_sft_data, collate,
                            eval_batches, pack_bins)
from herd.tokenizer import Tokenizer
from herd.train.masks import attention_kwargs

transformers = pytest.importorskip("transformers")


def _best_fit_reference(lengths: list[int], capacity: int) -> list[int]:
    """Plain O(n^2) best-fit decreasing; returns the sorted free room of the bins."""
    rooms: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, r in enumerate(rooms) if r >= n]
        if fits:
            best = min(fits, key=lambda i: rooms[i])
            rooms[best] -= n
        else:
            rooms.append(capacity - n)
    return sorted(rooms)


@pytest.mark.parametrize("seed", range(4))
def test_pack_bins_is_best_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(16, 300))
    lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 400)))
    lengths = np.minimum(lengths, rng.integers(1, capacity + 1, size=lengths.size))  # many short, some long
    bins = pack_bins(lengths, capacity)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(lengths.size))  # every example exactly once
    assert all(lengths[b].sum() <= capacity for b in bins)
    assert sorted(capacity - int(lengths[b].sum()) for b in bins) == _best_fit_reference(lengths.tolist(), capacity)
    assert len(bins) >= -(-int(lengths.sum()) // capacity)
    with pytest.raises(HerdError, match="positions but a row has"):
        pack_bins(np.array([capacity + 1]), capacity)


@pytest.fixture(scope="module")
def tok(official_tokenizer_model) -> Tokenizer:
    return Tokenizer.from_file(official_tokenizer_model)


def _chat_file(path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    words = "the cat sat on a warm mat while dogs ran far away from home".split()
    with open(path, "w") as f:
        for i in range(n):
            turns = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
            for _ in range(int(rng.integers(1, 3))):
                turns.append({"role": "user", "content": " ".join(rng.choice(words, int(rng.integers(2, 12))))})
                turns.append({"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(1, 20))))})
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tok, tmp_path_factory):
    path = _chat_file(tmp_path_factory.mktemp("chats") / "chats.jsonl")
    return build_sft_data(SFTDataConfig(data=[str(path)], chat_style="meta", max_seq_len=128, val_fraction=0.0),
                          tok, progress=False)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=256)
    model = Transformer(args).eval()
    model.init_weights(std=0.1)  # sharper attention than training init, so masking mistakes show
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(args))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(dict(model.state_dict()), args), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return model, hf


def _masked_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over learned targets, and their count (a plain reference, no chunking)."""
    logits = model(batch.inputs, **attention_kwargs(batch.document_ids))
    losses = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
    return losses[batch.loss_mask.flatten()].sum(), int(batch.loss_mask.sum())


def _transformers_loss(hf, data, indices) -> torch.Tensor:
    """LlamaForCausalLM's own loss: the whole examples, right-padded, labels -100 outside the mask."""
    examples = [data.train.example(i) for i in indices]
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros(len(examples), width, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        ids_t = torch.from_numpy(ids.astype(np.int64))
        input_ids[b, :len(ids)] = ids_t
        attention[b, :len(ids)] = 1
        labels[b, :len(ids)] = torch.where(torch.from_numpy(mask), ids_t, torch.tensor(-100))
    return hf(input_ids=input_ids, attention_mask=attention, labels=labels).loss


def test_masked_batch_loss_equals_transformers(data, models):
    model, hf = models
    rows = SFTRows(data.train, 128, packing=False)
    indices = list(range(6))
    batch = collate(rows, indices)
    with torch.no_grad():
        total, count = _masked_loss(model, batch)
        want = _transformers_loss(hf, data, [int(rows.examples(i)[0]) for i in indices])
    assert count == sum(int(data.train.example(int(rows.examples(i)[0]))[1][1:].sum()) for i in indices)
    torch.testing.assert_close(total / count, want, atol=1e-5, rtol=1e-5)
    # labels() is the ignore_index form of the same thing
    labels = batch.labels()
    assert bool((labels[~batch.loss_mask] == IGNORE_INDEX).all())
    assert torch.equal(labels[batch.loss_mask], batch.targets[batch.loss_mask])


def test_packed_batch_equals_its_examples(data, models):
    model, hf = models
    rows = SFTRows(data.train, 128, packing=True)
    assert len(rows) < len(data.train) and rows.fill() > 0.8
    assert any(len(rows.examples(r)) > 2 for r in range(len(rows)))
    batch = collate(rows, list(range(len(rows))), length=128)
    assert batch.inputs.shape == (len(rows), 128)
    with torch.no_grad():
        total, count = _masked_loss(model, batch)
        singles = [collate(SFTRows(data.train, 128, packing=False), [i]) for i in range(len(data.train))]
        parts = [_masked_loss(model, b) for b in singles]
        want = _transformers_loss(hf, data, list(range(len(data.train))))
    assert count == sum(c for _, c in parts) == data.train.learned_tokens()
    torch.testing.assert_close(total, sum(t for t, _ in parts), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(total / count, want, atol=1e-5, rtol=1e-5)
    # without document masking the packed loss differs: the test sees attention crossing examples
    with torch.no_grad():
        logits = model(batch.inputs)
        crossing = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
    assert abs(float(crossing[batch.loss_mask.flatten()].sum()) - float(total)) > 1e-2


def test_training_loss_head_on_packed_batches(data, models):
    """What the SFT loop computes: herd's masked chunked loss inside forward, on packed rows, equals
    transformers' loss on the examples one by one."""
    from herd.train.loss import chunked_cross_entropy, lm_head

    model, hf = models
    rows = SFTRows(data.train, 128, packing=True)
    batch = collate(rows, list(range(len(rows))), length=128)
    with torch.no_grad():
        total = model(batch.inputs, **attention_kwargs(batch.document_ids),
                      head=lm_head(chunked_cross_entropy, batch.targets, batch.loss_mask, chunk=64))
        want = _transformers_loss(hf, data, list(range(len(data.train))))
    torch.testing.assert_close(total / batch.n_loss_tokens, want, atol=1e-5, rtol=1e-5)


def test_rows_carry_mask_document_ids_and_padding(data, tok):
    rows = SFTRows(data.train, 128, packing=True)
    r = max(range(len(rows)), key=lambda r: len(rows.examples(r)))
    batch = collate(rows, [r], pad_id=tok.pad_id, length=128)
    docs, inputs, targets, mask = batch.document_ids[0], batch.inputs[0], batch.targets[0], batch.loss_mask[0]
    n = int(rows.row_lengths[r])
    pos = 0
    for d, i in enumerate(rows.examples(r)):
        ids, m = data.train.example(int(i))
        k = len(ids) - 1
        assert inputs[pos:pos + k].tolist() == ids[:-1].tolist()
        assert targets[pos:pos + k].tolist() == ids[1:].tolist()
        assert mask[pos:pos + k].tolist() == m[1:].tolist()
        assert bool((docs[pos:pos + k] == d).all())
        pos += k
    assert pos == n
    assert not bool(mask[n:].any()) and bool((inputs[n:] == tok.pad_id).all())
    assert bool((docs[n:] == docs[n - 1]).all())  # padding joins the last example
    # a single-example row stays one document (the plain causal fast path)
    single = collate(SFTRows(data.train, 128, packing=False), [0, 1])
    assert attention_kwargs(single.document_ids) == {}


def test_loader_is_deterministic_resumes_and_splits_over_ranks(data):
    rows = SFTRows(data.train, 128, packing=True)
    a = SFTBatchLoader(rows, seed=3)
    seen = [a.next_batch(4) for _ in range(7)]  # wraps past one epoch
    assert a.epoch >= 1
    epoch0 = [i for b in seen for i in b.rows[:4]][:len(rows)]
    assert sorted(epoch0) == list(range(len(rows)))  # each row once per epoch
    b = SFTBatchLoader(rows, seed=3)
    for _ in range(3):
        b.next_batch(4)
    state = json.loads(json.dumps(b.state_dict()))
    c = SFTBatchLoader(rows, seed=3)
    c.load_state_dict(state)
    for want in seen[3:]:
        got = c.next_batch(4)
        assert got.rows == want.rows and torch.equal(got.inputs, want.inputs)
    ranks = [SFTBatchLoader(rows, seed=3, dp_rank=r, dp_size=2).next_batch(4) for r in range(2)]
    whole = seen[0]
    for field in ("inputs", "targets", "loss_mask", "document_ids"):
        assert torch.equal(torch.cat([getattr(x, field) for x in ranks]), getattr(whole, field))
    assert sum(x.n_loss_tokens for x in ranks) == whole.n_loss_tokens
    with pytest.raises(HerdError, match="seed"):
        SFTBatchLoader(rows, seed=4).load_state_dict(state)
    with pytest.raises(HerdError, match="rows"):
        SFTBatchLoader(SFTRows(data.train, 128, packing=False), seed=3).load_state_dict(state)
    with pytest.raises(HerdError, match="divisible by 2"):
        SFTBatchLoader(rows, dp_size=2).next_batch(3)
    micro = whole.micro_batches(3)
    assert [m.inputs.shape[0] for m in micro] == [3, 1]


def test_eval_batches_cover_every_row_once(data):
    rows = SFTRows(data.train, 128, packing=False)
    for dp in (1, 2):
        per_rank = [eval_batches(rows, 4, r, dp) for r in range(dp)]
        assert len({len(p) for p in per_rank}) == 1
        learned = sum(b.n_loss_tokens for p in per_rank for b in p)
        assert learned == data.train.learned_tokens()
        assert per_rank[0][-1].rows[-1] == -1 or len(rows) % 4 == 0
