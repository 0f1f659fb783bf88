"""Gradient-norm clipping that is right for any mix of plain, FSDP-sharded and TP-sharded grads.

torch.nn.utils.clip_grad_norm_ stacks per-parameter norms, which fails when gradients live on
different meshes (FSDP over "dp" for norm weights, FSDP x TP over ("dp", "tp") for matrices).
Here each gradient contributes its local sum of squares, summed over exactly the mesh
dimensions it is sharded on (replicated dimensions hold copies and must not be counted twice).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate


def grad_norm(parameters: Iterable[nn.Parameter]) -> Tensor:
    """The global L2 norm of all gradients, float32 scalar on the gradients' device, the same on every rank."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # Group by the process groups a gradient's squares must be summed over.
    groups: dict[tuple, list[Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            mesh = g.device_mesh
            if any(pl.is_partial() for pl in g.placements):  # not expected after backward; be exact anyway
                g = g.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in g.placements])
            # Every non-replicated mesh dimension splits the tensor: Shard, and FSDP-over-TP's
            # _StridedShard (which is not a Shard subclass, so is_shard() is False for it).
            dims = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
            key = (id(mesh), dims)
            groups.setdefault(key, [mesh, dims, []])[2].append(g.to_local())
        else:
            groups.setdefault((None, ()), [None, (), []])[2].append(g)
    total = None
    for mesh, dims, local in groups.values():
        sq = torch.stack([t.detach().float().pow(2).sum() for t in local]).sum()
        for d in dims:
            dist.all_reduce(sq, group=mesh.get_group(d))
        total = sq if total is None else total + sq.to(total.device)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale all gradients so their global L2 norm is at most max_norm; return the norm before clipping.

    A drop-in for torch.nn.utils.clip_grad_norm_ that also handles FSDP2 + tensor parallel.
    max_norm <= 0 only measures the norm.
    """
    params = [p for p in parameters if p.grad is not None]
    norm = grad_norm(params)
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(scale.to(g.device, g.dtype))
    return norm
