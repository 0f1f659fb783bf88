"""Next-token losses computed from the final hidden states in slices of tokens, never the whole logits.

A plain `cross_entropy(model(tokens))` materializes float32 logits [tokens, vocab], keeps the
log-softmax for backward and writes a gradient of the same size: for a 32K vocabulary and 4K
tokens per micro-batch that is three 512 MB passes through memory (and 128K x 8K tokens for
Llama 3 is 4 GB each). The functions here go `chunk` tokens at a time:

- `chunked_cross_entropy` (training): the sum of token losses, optionally only over the tokens a
  loss mask keeps (SFT trains on replies only). Each slice's gradients for the hidden states and
  the output matrix (softmax minus one-hot) are computed right away in the forward pass, so
  nothing vocabulary-sized outlives one slice and backward is a multiply by the incoming scalar.
  Same three matmuls as the plain path, no recomputation. Masked-out tokens cost nothing.
- `token_logprobs` (DPO, PPO, evaluation): log p(target) of every token, differentiable for any
  upstream gradient. Forward keeps one log-sum-exp per token; backward recomputes each slice's
  logits (one extra matmul) because the weight of each token's gradient is only known then.
  `sequence_logprobs` sums them per sequence under a mask (what DPO compares).

Both take `model_head` arguments, the (hidden states, output matrix) pair that
`Transformer.forward(..., head=...)` passes, so they run inside the model's forward: under FSDP2
the output matrix is then the gathered full weight, and with tensor parallel (the output matrix a
DTensor sharded over the vocabulary) each rank works on its vocabulary slice and only per-token
scalars are all-reduced ("loss parallel"): no rank ever holds the full logits.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # target id of tokens that carry no loss (the convention of F.cross_entropy and transformers)


def _vocab_shard(weight: Tensor) -> tuple[Tensor, int, dist.ProcessGroup | None]:
    """(local rows of the output matrix, id of its first row, the group holding the other rows).

    A plain tensor is the whole vocabulary. A DTensor sharded on dim 0 over some mesh dimension
    (tensor parallel) is this rank's contiguous vocabulary slice; `to_local` is differentiable, so
    the slice's gradient flows back into the DTensor parameter.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(weight, DTensor):
        return weight, 0, None
    dims = [i for i, p in enumerate(weight.placements) if p.is_shard(0)]
    if len(dims) != 1 or any(not p.is_replicate() for i, p in enumerate(weight.placements) if i not in dims):
        raise ValueError(f"output matrix placements {weight.placements}: expected one Shard(0) (vocabulary-parallel)")
    mesh_dim = dims[0]
    group = weight.device_mesh.get_group(mesh_dim)
    rank, size = weight.device_mesh.get_local_rank(mesh_dim), weight.device_mesh.size(mesh_dim)
    vocab = weight.shape[0]
    rows = -(-vocab // size)  # torch.chunk sizes: ceil(V / size) rows per rank, the last may have fewer
    local = weight.to_local()
    return local, min(rank * rows, vocab), group


def _all_reduce(t: Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def _slice_stats(hc: Tensor, weight: Tensor, tc: Tensor, offset: int, group: dist.ProcessGroup | None):
    """Float32 logits of one token slice over this rank's vocabulary rows, the global max and
    sum of exp (all ranks), and each token's target logit (0 where another rank owns the target)."""
    logits = F.linear(hc, weight).float()  # [n, V_local]
    local_t = tc - offset
    owned = (local_t >= 0) & (local_t < weight.shape[0])
    target_logit = logits.gather(1, local_t.clamp(0, weight.shape[0] - 1).unsqueeze(1)).squeeze(1)  # [n]
    target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))
    peak = logits.amax(dim=-1)  # [n]
    if group is not None:
        peak = _all_reduce(peak, group, dist.ReduceOp.MAX)
        target_logit = _all_reduce(target_logit, group)
    return logits, peak, target_logit, local_t, owned


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk: int, offset: int, group) -> Tensor:
        # h [N, D], weight [V_local, D], targets int64 [N] (all kept); returns the summed loss (float32).
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        ctx.group = group
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = None  # float32 [V_local, D], created by the first slice's matmul (no zero-fill pass)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]  # [n, D], [n]
            logits, peak, target_logit, local_t, owned = _slice_stats(hc, weight, tc, offset, group)
            # One exp pass serves both the loss and the gradient: exp(logits - max) in place.
            probs = logits.sub_(peak.unsqueeze(1)).exp_()  # [n, V_local]
            denom = _all_reduce(probs.sum(dim=-1), group)  # [n]
            total += (peak + denom.log() - target_logit).sum()
            if want_h or want_w:
                # d(sum of losses)/d(logits) = softmax - onehot(target)
                dlogits = probs.div_(denom.unsqueeze(1))
                rows = torch.arange(tc.shape[0], device=tc.device)[owned]
                dlogits[rows, local_t[owned]] -= 1.0
                dlogits = dlogits.to(h.dtype)
                if want_h:
                    grad_h[start:start + chunk] = dlogits @ weight  # [n, D] (partial over the vocabulary slice)
                if want_w:
                    part_d, part_h = (dlogits, hc) if hc.dtype == torch.float32 else (dlogits.float(), hc.float())
                    if grad_w is None:
                        grad_w = part_d.t() @ part_h  # [V_local, D]
                    else:
                        grad_w.addmm_(part_d.t(), part_h)
        if want_h and group is not None:
            _all_reduce(grad_h, group)  # each rank holds its vocabulary slice's share of dL/dh
        if want_w and grad_w is None:  # no token kept: the weight still gets a (zero) gradient
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk: int, offset: int, group) -> Tensor:
        # h [N, D], weight [V_local, D], targets [N] -> log p(target) float32 [N]
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        out = torch.empty_like(lse)
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]
            logits, peak, target_logit, _, _ = _slice_stats(hc, weight, tc, offset, group)
            denom = _all_reduce(logits.sub_(peak.unsqueeze(1)).exp_().sum(dim=-1), group)
            lse[start:start + chunk] = peak + denom.log()
            out[start:start + chunk] = target_logit - lse[start:start + chunk]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk, ctx.offset, ctx.group = chunk, offset, group
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for start in range(0, h.shape[0], ctx.chunk):
            hc, tc, g = h[start:start + ctx.chunk], targets[start:start + ctx.chunk], grad_out[start:start + ctx.chunk]
            logits = F.linear(hc, weight).float()  # [n, V_local]
            # d log p(t) / d logits = onehot(t) - softmax; times the upstream gradient of each token
            dlogits = logits.sub_(lse[start:start + ctx.chunk].unsqueeze(1)).exp_().mul_(-g.float().unsqueeze(1))
            local_t = tc - ctx.offset
            owned = (local_t >= 0) & (local_t < weight.shape[0])
            rows = torch.arange(tc.shape[0], device=tc.device)[owned]
            dlogits[rows, local_t[owned]] += g.float()[owned]
            if want_h:
                grad_h[start:start + ctx.chunk] = dlogits.to(h.dtype) @ weight
            if want_w:
                grad_w.addmm_(dlogits.t(), hc.float())
        if want_h and ctx.group is not None:
            _all_reduce(grad_h, ctx.group)
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None, None, None


def _flatten(h: Tensor, targets: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Rows of h [..., D] and targets [...] that carry a loss: mask True and target != IGNORE."""
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)  # [N, D], [N]
    keep = t2 != IGNORE
    if mask is not None:
        keep &= mask.reshape(-1).to(torch.bool)
    if bool(keep.all()):
        return h2, t2
    idx = keep.nonzero().squeeze(1)
    return h2.index_select(0, idx), t2.index_select(0, idx)


def chunked_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None = None,
                          chunk: int = 4096) -> Tensor:
    """Sum over kept tokens of cross_entropy(h @ weight.T, targets), without the full logits.

    h: final hidden states [..., D]; weight: the output matrix [V, D] (a plain tensor, or a
    vocabulary-sharded DTensor under tensor parallel); targets: int64 [...] (IGNORE = no loss);
    mask: bool [...] or None, True where a token's loss counts. Returns a float32 scalar (the sum:
    divide by the kept-token count for the mean).
    """
    h2, t2 = _flatten(h, targets, mask)
    local, offset, group = _vocab_shard(weight)
    return _ChunkedCrossEntropy.apply(h2, local, t2, chunk if chunk > 0 else max(h2.shape[0], 1), offset, group)


def token_logprobs(h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 4096) -> Tensor:
    """log p(targets) under softmax(h @ weight.T): float32 [...] (targets' shape), differentiable.

    IGNORE targets give 0. Arguments as in chunked_cross_entropy.
    """
    shape = targets.shape
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    ignored = t2 == IGNORE
    local, offset, group = _vocab_shard(weight)
    out = _TokenLogprobs.apply(h2, local, t2.masked_fill(ignored, 0), chunk if chunk > 0 else max(h2.shape[0], 1),
                               offset, group)
    return out.masked_fill(ignored, 0.0).view(shape)


def sequence_logprobs(h: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None = None,
                      chunk: int = 4096) -> Tensor:
    """Per-sequence sum of log p(target) over the tokens `mask` keeps: float32 [B] for h [B, S, D].

    The quantity DPO compares between the policy and the reference (a sum, not a mean).
    """
    lp = token_logprobs(h, weight, targets, chunk)  # [B, S]
    if mask is not None:
        lp = lp * mask.to(lp.dtype)
    return lp.sum(dim=-1)


def lm_head(fn: Callable[..., Tensor], *args, **kwargs) -> Callable[[Tensor, Tensor], Tensor]:
    """A `head` for Transformer.forward: fn(hidden, output_weight, *args, **kwargs) runs inside forward.

        loss_sum = model(inputs, head=lm_head(chunked_cross_entropy, targets, mask, chunk=4096))
    """
    return functools.partial(_call_head, fn, args, kwargs)


def _call_head(fn, args, kwargs, h: Tensor, weight: Tensor) -> Tensor:
    return fn(h, weight, *args, **kwargs)


def cross_entropy_sum(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum of token losses from full logits [..., V]: the plain reference the chunked losses equal."""
    t = targets.reshape(-1)
    if mask is not None:
        t = t.masked_fill(~mask.reshape(-1).to(torch.bool), IGNORE)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), t, reduction="sum", ignore_index=IGNORE)
