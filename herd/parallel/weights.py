"""Materialize a parallelized model's weights: only the local shards, identical for any layout.

A large model is built on the meta device (no memory), parallelized, then `materialize`d: each
rank allocates just its shards (`to_empty`) and fills them from a seed. To make the weights
the same whatever the layout (1 process, FSDP over 8 ranks, TP over 2, ...), every parameter is
generated in full, one tensor at a time in `named_parameters` order from one seeded generator,
and each rank keeps only its slice. On the CPU this is exactly what `Transformer.init_weights`
draws after `torch.manual_seed(seed)`; on GPUs the stream is the GPU's (the same for every
layout on the same kind of GPU, not equal to the CPU's). This costs one full-size tensor of
memory at a time (the 128K x 4096 embedding of an 8B model is 2 GB) and the time to draw every
weight once per rank, and buys reproducibility: a distributed run starts from the
single-process weights.

`load_full_state_dict` does the same for real weights (a Meta / Hugging Face checkpoint read
as full tensors on every rank).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from herd.errors import HerdError
from herd.model import ModelArgs, Transformer, init_std
from herd.parallel.parallelize import parallelize


def _local_part(full: Tensor, like: Tensor) -> Tensor:
    """The slice of the full tensor that `like` (a DTensor shard, or a plain tensor) holds here."""
    if isinstance(like, DTensor):
        # src_data_rank=None: every rank already has the full tensor, so just cut, no communication.
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full


@torch.no_grad()
def materialize(model: Transformer, device: torch.device | str, seed: int = 0, std: float = 0.02) -> Transformer:
    """Allocate `model`'s (local) parameters on `device` and initialize them from `seed`.

    The result equals `torch.manual_seed(seed); model.init_weights(std)` on an unsharded CPU model,
    sliced to this rank's shards, for any parallel layout. Works on unparallelized models too.
    """
    device = torch.device(device)
    model.to_empty(device=device)
    # CPU runs draw on the CPU; GPU runs draw on the GPU (seconds instead of minutes for 8B, and
    # still the same weights for every layout of the job, since all ranks draw the same stream).
    where = device if device.type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=where).manual_seed(seed)
    for name, p in model.named_parameters():
        full = torch.empty(p.shape, dtype=p.dtype, device=where)  # global shape
        s = init_std(name, p.ndim, model.args, std)
        if s is None:
            full.fill_(1.0)
        else:
            full.normal_(0.0, s, generator=gen)
        local = p.to_local() if isinstance(p, DTensor) else p
        local.copy_(_local_part(full, p))
    model.reset_buffers()
    return model


@torch.no_grad()
def load_full_state_dict(model: Transformer, state_dict: dict[str, Tensor]) -> None:
    """Copy full (unsharded) tensors into a possibly sharded model, each rank keeping its slice.

    Keys are herd's parameter names (Meta's). Every parameter must be present with its full shape.
    """
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state_dict))
    if missing:
        raise HerdError(f"the state dict lacks {len(missing)} parameter(s), e.g. '{missing[0]}'; "
                        "load a checkpoint of the same architecture.")
    for name, p in params.items():
        full = state_dict[name]
        if tuple(full.shape) != tuple(p.shape):
            raise HerdError(f"'{name}' has shape {tuple(full.shape)} in the state dict but {tuple(p.shape)} "
                            "in the model; load a checkpoint of the same architecture.")
        local = p.to_local() if isinstance(p, DTensor) else p
        local.copy_(_local_part(full, p))  # copy_ converts dtype and device of just this rank's slice


def build_model(args: ModelArgs, mesh: DeviceMesh | None, device: torch.device | str, *, seed: int = 0,
                tp: int = 1, compile: bool = False, activation_checkpointing: bool = False,
                mixed_precision: str = "fp32", weights: dict[str, Tensor] | None = None) -> Transformer:
    """Build a Transformer on the meta device, parallelize it, and materialize only the local shards.

    The weights are the single-process `torch.manual_seed(seed); model.init_weights()` ones, or,
    when `weights` (a full state dict, e.g. a memory-mapped checkpoint) is given, those: each rank
    copies just its slices, so no rank allocates the full model.
    """
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, mesh, tp=tp, compile=compile, activation_checkpointing=activation_checkpointing,
                mixed_precision=mixed_precision)
    if weights is None:
        return materialize(model, device, seed=seed)
    model.to_empty(device=torch.device(device))
    load_full_state_dict(model, weights)
    model.reset_buffers()
    return model


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter gathered to a full CPU tensor, on every rank (a collective: call on all ranks).

    For tests and small-model export; large checkpoints go through Distributed Checkpoint instead.
    """
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().cpu().clone()
    return out
