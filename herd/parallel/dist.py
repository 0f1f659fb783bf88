"""Process-group setup and the few collectives the training loops need.

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and starts gloo on CPU or NCCL on CUDA; run without torchrun it returns a
one-process DistInfo and starts no process group, so every helper here also works, as a no-op,
in a plain `python` run. `build_mesh` lays the ranks out as a 2-D ("dp", "tp") DeviceMesh:
tensor-parallel groups are the inner dimension, so they stay inside one node (NVLink) when
tp <= GPUs per node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from herd.errors import HerdError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    """Global rank, 0 .. world_size - 1."""
    world_size: int = 1
    """Number of processes in the job."""
    local_rank: int = 0
    """Rank on this node (picks the GPU)."""
    device: torch.device = torch.device("cpu")
    """The device this process computes on (cuda:local_rank, or cpu)."""
    backend: str | None = None
    """'nccl' or 'gloo'; None when no process group was started (one process)."""

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group from torchrun's environment, or describe a single process.

    backend: override the choice (gloo on CPU, nccl on CUDA), e.g. 'gloo' to test on a GPU box.
    Safe to call twice: a second call describes the group that already exists.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    if world_size <= 1:
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return DistInfo(device=device)
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise HerdError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not; "
                        "launch with `torchrun --nproc-per-node N ...`, which sets them all.")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise HerdError(f"local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                            "launch at most that many processes per node with --nproc-per-node.")
        torch.cuda.set_device(local_rank)  # before the group starts, so NCCL binds the right GPU
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        # On GPUs, NCCL serves CUDA tensors and gloo the CPU ones (a loss or timing the loop
        # reduces as a CPU scalar, checkpoint metadata), so no collective depends on placement.
        spec = "cuda:nccl,cpu:gloo" if backend == "nccl" else backend
        dist.init_process_group(backend=spec, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def build_mesh(info: DistInfo, dp: int, tp: int = 1) -> DeviceMesh | None:
    """A 2-D ("dp", "tp") mesh over all ranks, or None in a single process.

    dp <= 0 means "whatever is left": world_size // tp.
    """
    if tp < 1:
        raise HerdError(f"--tp {tp} is not a positive number of tensor-parallel ranks; use 1 to turn it off.")
    if dp <= 0:
        dp = max(info.world_size // tp, 1)
    if dp * tp != info.world_size:
        raise HerdError(f"--dp {dp} x --tp {tp} = {dp * tp} does not match the {info.world_size} launched "
                        f"process(es); choose dp and tp whose product is the world size "
                        f"(torchrun --nproc-per-node x nodes).")
    if not info.is_distributed:
        return None
    return init_device_mesh(info.device.type, (dp, tp), mesh_dim_names=("dp", "tp"))


def is_main() -> bool:
    """True on global rank 0 (and in a single process): the rank that logs and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The mean of `tensor` over the ranks of `group` (all ranks by default), as a new tensor.

    With equal local batches, the mean of the per-rank mean losses is the global mean loss.
    Tensor-parallel ranks hold the same loss, so averaging over all ranks is still right.
    """
    if not dist.is_initialized():
        return tensor.detach().clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out / dist.get_world_size(group)


def destroy() -> None:
    """Tear the process group down (a no-op in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()
