"""herd/train/loss.py against plain PyTorch and transformers: masked chunked cross-entropy, per-token
and per-sequence log-probs (values and gradients for any upstream gradient), and the losses run
inside the model's forward equal the same losses from full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from herd.model import ModelArgs, Transformer
from herd.train.loss import (IGNORE, chunked_cross_entropy, cross_entropy_sum, lm_head, sequence_logprobs,
                             token_logprobs)


def _leaves(n=3, s=17, d=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, s, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n, s), generator=g)
    mask = torch.rand(n, s, generator=g) > 0.4
    return h, w, t, mask


@pytest.mark.parametrize("chunk", [5, 4096, 0])
def test_masked_chunked_cross_entropy_equals_plain(chunk):
    h, w, t, mask = _leaves()
    got = chunked_cross_entropy(h, w, t, mask, chunk=chunk)
    gh, gw = torch.autograd.grad(got * 0.7, (h, w))
    logits = h @ w.t()
    want = F.cross_entropy(logits.reshape(-1, 50), t.reshape(-1).masked_fill(~mask.reshape(-1), -100),
                           reduction="sum")
    wh, ww = torch.autograd.grad(want * 0.7, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gh, wh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-6)
    assert gh[~mask].abs().max() == 0  # masked-out tokens get no gradient at all


def test_ignore_targets_and_empty_mask():
    h, w, t, mask = _leaves()
    t2 = t.masked_fill(~mask, IGNORE)
    torch.testing.assert_close(chunked_cross_entropy(h, w, t2), chunked_cross_entropy(h, w, t, mask))
    torch.testing.assert_close(cross_entropy_sum(h @ w.t(), t, mask), chunked_cross_entropy(h, w, t, mask),
                               rtol=1e-6, atol=1e-4)
    none = chunked_cross_entropy(h, w, t, torch.zeros_like(mask))
    assert none.item() == 0
    none.backward()
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_token_and_sequence_logprobs_values_and_gradients():
    h, w, t, mask = _leaves()
    t = t.masked_fill(torch.arange(17) == 0, IGNORE)  # an ignored column gives 0
    got = token_logprobs(h, w, t, chunk=6)
    ref = torch.log_softmax(h @ w.t(), -1).gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = ref.masked_fill(t == IGNORE, 0.0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # An arbitrary upstream gradient per token (what DPO's sigmoid passes back) reaches h and w exactly.
    up = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad((got * up).sum(), (h, w)),
                               torch.autograd.grad((ref * up).sum(), (h, w)), rtol=1e-4, atol=1e-5)
    seq = sequence_logprobs(h, w, t, mask, chunk=6)
    torch.testing.assert_close(seq, (ref * mask).sum(-1), rtol=1e-5, atol=1e-4)
    assert seq.shape == (3,)


def test_losses_inside_forward_equal_transformers():
    """Through Transformer.forward(head=...): the masked summed loss and per-sequence log-probs equal
    those of transformers' LlamaForCausalLM on the same converted weights, and the parameter
    gradients equal herd's own full-logits path."""
    transformers = pytest.importorskip("transformers")
    from herd.checkpoint import hf_config, to_hf_state_dict

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=64)
    model = Transformer(args)
    model.init_weights()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(args))).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), args), strict=False)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 21), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = torch.rand(2, 20, generator=g) > 0.5

    loss = model(inputs, head=lm_head(chunked_cross_entropy, targets, mask, chunk=7))
    with torch.no_grad():
        labels = tokens.clone()
        labels[:, 1:] = targets.masked_fill(~mask, -100)
        labels[:, 0] = -100
        hf_mean = hf(tokens, labels=labels).loss  # transformers shifts labels itself and takes the mean
        hf_logp = torch.log_softmax(hf(tokens).logits[:, :-1].float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(loss / mask.sum(), hf_mean, rtol=1e-5, atol=1e-5)
    seq = model(inputs, head=lm_head(sequence_logprobs, targets, mask, chunk=7))
    torch.testing.assert_close(seq, (hf_logp * mask).sum(-1), rtol=1e-5, atol=1e-4)

    grads = torch.autograd.grad(loss, list(model.parameters()))
    plain = cross_entropy_sum(model(inputs), targets, mask)
    for got, want in zip(grads, torch.autograd.grad(plain, list(model.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
