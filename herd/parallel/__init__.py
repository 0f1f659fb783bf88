"""Distributed training for herd: process groups, the ("dp", "tp") mesh, and parallelizing a model.

Launch with torchrun; every helper also works, as a no-op, in a single plain process:

    info = init_distributed()                       # gloo on CPU, nccl on CUDA
    mesh = build_mesh(info, dp=info.world_size // 2, tp=2)
    model = build_model(args, mesh, info.device, seed=0, tp=2)  # meta -> TP/AC/compile/FSDP2 -> local shards
    ...
    clip_grad_norm_(model.parameters(), 1.0)        # right for FSDP and TP shards
    loss_for_logging = all_reduce_mean(loss)
"""

from herd.parallel.dist import (DistInfo, all_reduce_mean, barrier, build_mesh, destroy, init_distributed,
                                is_main)
from herd.parallel.grads import clip_grad_norm_, grad_norm
from herd.parallel.parallelize import (apply_activation_checkpointing, apply_fsdp, apply_tensor_parallel,
                                       parallelize)
from herd.parallel.weights import build_model, full_state_dict, load_full_state_dict, materialize

__all__ = [
    "DistInfo", "init_distributed", "build_mesh", "is_main", "barrier", "all_reduce_mean", "destroy",
    "parallelize", "apply_tensor_parallel", "apply_activation_checkpointing", "apply_fsdp",
    "materialize", "build_model", "load_full_state_dict", "full_state_dict",
    "clip_grad_norm_", "grad_norm",
]
