"""The pre-training loss: next-token cross-entropy, summed, computed over the vocabulary in slices.

A plain `cross_entropy(model(tokens))` materializes float32 logits [tokens, vocab], keeps the
log-softmax for backward and writes a gradient of the same size: for a 32K vocabulary and 4K
tokens per micro-batch that is three 512 MB passes through memory. `linear_cross_entropy` goes
`chunk` tokens at a time from the final hidden states: it computes the slice's logits, its loss,
and, when gradients are needed, the slice's gradients for the hidden states and the output
matrix right away (the softmax minus the one-hot target), so nothing vocabulary-sized outlives
one slice and backward is a multiply by the incoming scalar. Same three matmuls as the plain
path, no recomputation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        # h [N, D], weight [V, D], targets int64 [N]; returns the summed loss (float32 scalar).
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = None  # float32 [V, D], created by the first slice's matmul (no zero-fill pass)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]  # [n, D], [n]
            logits = F.linear(hc, weight).float()  # [n, V]
            target_logit = logits.gather(1, tc.unsqueeze(1)).squeeze(1)  # [n]
            peak = logits.amax(dim=-1, keepdim=True)  # [n, 1]
            # One exp pass serves both the loss and the gradient: exp(logits - max) in place.
            probs = logits.sub_(peak).exp_()  # [n, V]
            denom = probs.sum(dim=-1, keepdim=True)  # [n, 1]
            lse = peak.squeeze(1) + denom.squeeze(1).log()  # [n]
            total += (lse - target_logit).sum()
            if want_h or want_w:
                # d(sum of losses)/d(logits) = softmax - onehot(target)
                dlogits = probs.div_(denom)
                dlogits[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
                dlogits = dlogits.to(h.dtype)
                if want_h:
                    grad_h[start:start + chunk] = dlogits @ weight  # [n, D]
                if want_w:
                    part_d, part_h = (dlogits, hc) if hc.dtype == torch.float32 else (dlogits.float(), hc.float())
                    if grad_w is None:
                        grad_w = part_d.t() @ part_h  # [V, D]
                    else:
                        grad_w.addmm_(part_d.t(), part_h)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 4096) -> Tensor:
    """Sum over tokens of cross_entropy(h @ weight.T, targets) without the full logits.

    h: hidden states [..., D]; weight: output matrix [V, D]; targets: int64 [...].
    Returns a float32 scalar (the sum; divide by the token count for the mean).
    """
    h2 = h.reshape(-1, h.shape[-1])  # [N, D]
    t2 = targets.reshape(-1)  # [N]
    chunk = chunk if chunk > 0 else h2.shape[0]
    return _LinearCrossEntropy.apply(h2, weight, t2, chunk)


def output_weight(model: torch.nn.Module) -> Tensor:
    """The output matrix [V, D] of a herd Transformer (the embedding when tied)."""
    return model.tok_embeddings.weight if model.output is None else model.output.weight


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of token losses from full logits [..., V] (the path for wrapped / parallel models)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")
