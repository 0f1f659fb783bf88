"""Apply parallelism to a built herd Transformer, in torchtitan's order:
tensor parallel -> activation checkpointing -> torch.compile -> FSDP2.

The model file knows nothing of this: each step rewrites the built modules in place.

- Tensor parallel (DTensor, the "tp" mesh dimension): Megatron-style. wq/wk/wv and w1/w3 are
  column-parallel (each rank holds a slice of the heads / hidden units), wo and w2 are
  row-parallel (partial sums are all-reduced), the embedding is sharded over the vocabulary and
  the output matrix over its rows, so each rank computes a slice of the logits which are then
  gathered. Attention reads its head counts from the weight shapes, so a shard runs the same code.
  Norm weights become replicated DTensors, so every parameter is a DTensor. Tied embeddings work:
  the shared matrix is vocabulary-sharded for both uses. (No sequence or loss parallelism yet:
  each TP rank holds the full activations and the full logits.)
- Activation checkpointing wraps each block's forward in torch.utils.checkpoint (non-reentrant):
  the block's activations are recomputed in backward. Parameter names do not change.
- torch.compile compiles each block in place (names unchanged, so checkpoints stay portable).
- FSDP2 (`fully_shard`, the "dp" mesh dimension) shards every block and then the root; with
  mixed_precision="bf16" parameters are gathered in bf16 and gradients reduced in fp32.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.utils.checkpoint import checkpoint

from herd.errors import HerdError
from herd.model import Transformer

MIXED_PRECISION = ("fp32", "bf16")


def parallelize(model: Transformer, mesh: DeviceMesh | None, *, tp: int = 1, compile: bool = False,
                activation_checkpointing: bool = False, mixed_precision: str = "fp32",
                reshard_after_forward: bool = True) -> Transformer:
    """Apply TP, activation checkpointing, compile and FSDP2 to `model` in place, and return it.

    mesh: the ("dp", "tp") mesh from build_mesh, or None in a single process (then only
        activation checkpointing and compile apply).
    tp: tensor-parallel degree; must equal mesh["tp"].size().
    mixed_precision: "fp32", or "bf16" for FSDP's bf16 parameters with fp32 gradient reduction
        (only when the model is FSDP-sharded, dp > 1; otherwise use autocast in the loop).
    reshard_after_forward: free gathered parameters after each block's forward (ZeRO-3); False
        keeps them until backward (ZeRO-2: more memory, one all-gather fewer per block).
    Build on the meta device and call herd.parallel.materialize afterwards to allocate only the
    local shards.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise HerdError(f"mixed precision '{mixed_precision}' is not supported; choose one of {', '.join(MIXED_PRECISION)}.")
    dp = 1
    if mesh is not None:
        if tuple(mesh.mesh_dim_names or ()) != ("dp", "tp"):
            raise HerdError(f"the mesh has dimensions {mesh.mesh_dim_names}, not ('dp', 'tp'); build it with herd.parallel.build_mesh.")
        dp, mesh_tp = mesh["dp"].size(), mesh["tp"].size()
        if tp != mesh_tp:
            raise HerdError(f"tp={tp} but the mesh has {mesh_tp} tensor-parallel ranks; pass tp=mesh['tp'].size().")
    elif tp > 1:
        raise HerdError(f"tensor parallel (tp={tp}) needs several processes; launch with torchrun and build a mesh.")
    if tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if activation_checkpointing:
        for block in model.layers:
            apply_activation_checkpointing(block)
    if compile:
        for block in model.layers:
            block.compile()  # in place (nn.Module.compile): parameter names stay the same
    if dp > 1:
        apply_fsdp(model, mesh["dp"], mixed_precision=mixed_precision, reshard_after_forward=reshard_after_forward)
    return model


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Shard attention, feed-forward, embedding and output over `tp_mesh` (see the module docstring)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    args, tp = model.args, tp_mesh.size()
    for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
                    ("feed-forward hidden size", args.hidden_dim), ("vocab_size", args.vocab_size)):
        if n % tp:
            raise HerdError(f"{what} {n} is not divisible by tp={tp}; choose a tensor-parallel degree that divides it.")
    # The embedding is sharded over its rows (the vocabulary): each rank looks up the ids it owns
    # and the partial results are all-reduced, so the blocks see the full, replicated activations.
    parallelize_module(model.tok_embeddings, tp_mesh,
                       RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    for block in model.layers:
        parallelize_module(block, tp_mesh, {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
        })
    # Transformer.logits calls F.linear on the output (or tied embedding) weight directly, so the
    # module hooks of a ColwiseParallel plan would never run. Shard the output matrix over its
    # rows (the same layout as the embedding, so a tied weight serves both) and give this model
    # a logits method that computes its vocabulary slice and gathers the full logits.
    if model.output is not None:
        w = model.output.weight
        model.output.weight = nn.Parameter(distribute_tensor(w, tp_mesh, [Shard(0)]), requires_grad=w.requires_grad)
    model.logits = types.MethodType(_tensor_parallel_logits, model)
    # The norms' weights stay whole; make them replicated DTensors too, so every parameter is a
    # DTensor on the mesh (a foreach/fused optimizer step and DCP reject a mix of the two kinds).
    for module in model.modules():
        if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            distribute_module(module, tp_mesh, input_fn=_replicate_inputs, output_fn=_local_output)


def _replicate_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False)
                 if isinstance(t, Tensor) and not isinstance(t, DTensor) else t for t in inputs)


def _local_output(module: nn.Module, output: Tensor, mesh: DeviceMesh) -> Tensor:
    return output.to_local() if isinstance(output, DTensor) else output


def _tensor_parallel_logits(self: Transformer, h: Tensor) -> Tensor:
    """Transformer.logits for a vocabulary-sharded output matrix: replicated h [..., dim] -> float32 logits [..., vocab]."""
    weight = self.tok_embeddings.weight if self.output is None else self.output.weight  # DTensor Shard(0) [vocab, dim]
    h = DTensor.from_local(h, weight.device_mesh, [Replicate()], run_check=False)
    logits = F.linear(h, weight)  # DTensor Shard(-1): this rank's vocabulary slice
    return logits.redistribute(placements=[Replicate()]).to_local().float()


def apply_activation_checkpointing(block: nn.Module) -> None:
    """Recompute `block`'s activations in backward instead of storing them (names unchanged).

    Replaces the instance's forward rather than wrapping the module (checkpoint_wrapper), so
    state-dict keys and optimizer state match a model without checkpointing.
    """
    inner = block.forward

    def forward(*args, **kwargs):
        # Llama has no dropout, so the RNG state need not be saved and restored for recompute.
        return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    block.forward = forward


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, *, mixed_precision: str = "fp32",
               reshard_after_forward: bool = True) -> None:
    """FSDP2: shard each block, then the root (embedding, final norm, output) over `dp_mesh`.

    Gradients are averaged over the dp ranks, so a loss that is the mean over the local batch
    gives the gradient of the mean over the global batch.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < n - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
