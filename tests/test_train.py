"""Pre-training parts against hand-computed references: schedules, the chunked loss, document
masking (packed = per-document), and the batch loader (deterministic, disjoint per rank, resumable)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from herd.configs import get_preset
from herd.data.shards import ShardDataset
from herd.errors import HerdError
from herd.model import Transformer
from herd.train.config import parse_stages, stage_value
from herd.train.data import BatchLoader
from herd.train.loss import chunked_cross_entropy as linear_cross_entropy
from herd.train.masks import attention_kwargs
from herd.train.metrics import flops_per_token
from herd.train.optim import lr_at, param_groups
from helpers import make_shards


# ---------------------------------------------------------------------------------------------
# schedules (values worked out by hand from the formulas in the docstring of lr_at)

def test_cosine_schedule_by_hand():
    kw = dict(peak=1.0, total=110, warmup=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))  # 0.8682
    assert lr_at(110, **kw) == pytest.approx(0.1)  # the floor
    assert lr_at(500, **kw) == pytest.approx(0.1)  # stays there


def test_wsd_and_anneal_by_hand():
    # wsd over 100 steps, 20% decay: peak until step 80, then linear to the 0.1 floor at 100.
    kw = dict(peak=2.0, total=100, warmup=10, schedule="wsd", min_lr_ratio=0.1, decay_fraction=0.2)
    assert lr_at(50, **kw) == pytest.approx(2.0)
    assert lr_at(79, **kw) == pytest.approx(2.0)
    assert lr_at(90, **kw) == pytest.approx(2.0 + (0.2 - 2.0) * 0.5)  # 1.1
    # cosine over a 90-step main phase, then 10 annealing steps from the floor (0.1) to 0.
    kw = dict(peak=1.0, total=100, warmup=10, schedule="cosine", min_lr_ratio=0.1, anneal_steps=10)
    assert lr_at(50, **kw) == pytest.approx(0.55)  # halfway through 10..90
    assert lr_at(90, **kw) == pytest.approx(0.1)
    assert lr_at(95, **kw) == pytest.approx(0.05)
    assert lr_at(99, **kw) == pytest.approx(0.01)
    assert lr_at(5, peak=3e-4, total=10, warmup=0, schedule="constant") == pytest.approx(3e-4)


def test_stages_parse_and_lookup():
    stages = parse_stages("500:256, 0:128", "--seq-len-stages")
    assert stages == [(0, 128), (500, 256)]
    assert [stage_value(stages, s, 64) for s in (0, 499, 500, 10_000)] == [128, 128, 256, 256]
    with pytest.raises(HerdError, match="STEP:VALUE"):
        parse_stages("0-128", "--seq-len-stages")


def test_weight_decay_groups():
    model = Transformer(get_preset("herd-1m", n_layers=1))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "tok_embeddings.weight" in no_decay["names"] and "norm.weight" in no_decay["names"]
    assert "layers.0.attention.wq.weight" in decay["names"] and "layers.0.feed_forward.w2.weight" in decay["names"]
    assert len(decay["names"]) + len(no_decay["names"]) == len(list(model.parameters()))


def test_flops_per_token_by_hand():
    args = get_preset("herd-1m")  # dim 128, 4 layers, 4 heads of 32, 2 KV heads, hidden 384, vocab 4096
    attn = 128 * 128 * 2 + 128 * 64 * 2  # wq + wo, wk + wv
    ffn = 3 * 128 * 384
    non_emb = 4 * (attn + ffn) + 9 * 128  # 8 block norms + the final norm
    expected = 6 * (non_emb + 4096 * 128) + 12 * 4 * 4 * 32 * 256
    assert flops_per_token(args, 256) == expected


# ---------------------------------------------------------------------------------------------
# loss and document masking

def test_linear_cross_entropy_matches_full_logits():
    h = torch.randn(3, 17, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 24, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 17))
    loss = linear_cross_entropy(h, w, t, chunk=8)  # 51 tokens in slices of 8 (the last one short)
    (loss / 51).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(F.linear(h, w).reshape(-1, 50), t.reshape(-1), reduction="sum")
    (ref / 51).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gw.double(), w.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("use_flex", [False, True])
def test_packed_loss_equals_per_document_losses(use_flex):
    """Two rows of packed documents: every token's loss equals that of its document forwarded alone."""
    torch.manual_seed(0)
    model = Transformer(get_preset("herd-1m", n_layers=2))
    model.init_weights()
    lengths = [[9, 14, 9], [20, 12]]  # documents per row, 32 tokens each
    docs = [[torch.randint(0, 4096, (n,)) for n in row] for row in lengths]
    stream = torch.stack([torch.cat(row) for row in docs])  # [2, 32]
    doc_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])
    inputs, targets, ids = stream[:, :-1], stream[:, 1:], doc_ids[:, :-1]
    kwargs = attention_kwargs(ids, use_flex=use_flex)
    with torch.no_grad():
        logits = model.logits(model.features(inputs, **kwargs))  # [2, 31, V]
        packed = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [2, 31]
        total_within = 0.0
        for r, row in enumerate(docs):
            start = 0
            for doc in row:
                alone = F.cross_entropy(model(doc[None, :-1])[0], doc[1:], reduction="none")  # [n - 1]
                n = doc.numel()
                got = packed[r, start:start + n - 1]  # targets inside this document
                torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4)
                total_within += float(alone.sum())
                start += n
        # the summed chunked loss over the in-document targets equals the per-document sum
        same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]  # target belongs to the input's document
        h = model.features(inputs, **kwargs)[same_doc]  # [N, dim]
        chunked = linear_cross_entropy(h, model.tok_embeddings.weight, targets[same_doc], chunk=7)
    assert chunked.item() == pytest.approx(total_within, rel=1e-5)
    # without the mask the packed losses differ (the test can fail)
    with torch.no_grad():
        unmasked = F.cross_entropy(model(inputs).transpose(1, 2), targets, reduction="none")
    assert not torch.allclose(unmasked[0, 10:22], packed[0, 10:22], atol=1e-3)


def test_single_document_rows_take_the_causal_fast_path():
    assert attention_kwargs(torch.zeros(2, 8, dtype=torch.long)) == {}
    assert "document_ids" in attention_kwargs(torch.tensor([[0, 0, 1, 1]]), use_flex=False)
    assert attention_kwargs(torch.tensor([[0, 0, 1, 1]]), enabled=False) == {}


# ---------------------------------------------------------------------------------------------
# batches

def test_loader_is_deterministic_disjoint_and_resumable(tmp_path):
    ds = ShardDataset(make_shards(tmp_path / "d"), "train")
    n = ds.num_windows(16)
    single = BatchLoader(ds, seed=3)
    ranks = [BatchLoader(ds, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    seen = []
    for _ in range(2 * n // 8 + 3):  # more than two epochs
        whole = single.next_batch(8, 16)
        halves = [loader.next_batch(8, 16) for loader in ranks]
        torch.testing.assert_close(torch.cat([h.inputs for h in halves]), whole.inputs)
        torch.testing.assert_close(torch.cat([h.document_ids for h in halves]), whole.document_ids)
        seen.extend(whole.indices)
    assert sorted(seen[:n]) == list(range(n))  # the first epoch visits every window once
    assert seen[:n] != seen[n:2 * n]  # and the next epoch is reshuffled
    # resuming from a saved position continues with exactly the same batches
    state = single.state_dict()
    expected = [single.next_batch(8, 16).inputs for _ in range(3)]
    resumed = BatchLoader(ds, seed=3)
    resumed.load_state_dict(state)
    for want in expected:
        torch.testing.assert_close(resumed.next_batch(8, 16).inputs, want)
    torch.testing.assert_close(whole.targets[:, :-1], whole.inputs[:, 1:])
    with pytest.raises(HerdError, match="does not split over 3"):
        BatchLoader(ds, dp_size=3).next_batch(8, 16)
