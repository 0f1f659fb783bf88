"""The training step that tests/test_parallel.py runs in one process and under torchrun.

Run by torchrun (`torchrun --standalone --nproc-per-node 2 tests/parallel_worker.py OUT SCENARIO...`),
each rank builds the model for a scenario's ("dp", "tp") layout with herd.parallel, trains a
few AdamW steps on its part of a fixed global batch, and rank 0 saves the global losses, grad
norms and the gathered weights (at init and at the end) to OUT/SCENARIO.pt. The test computes
the same steps in a single process on the whole batch and compares.

The step is the pre-training math: mean token cross-entropy over the (global) batch, backward,
global grad-norm clipping, AdamW with weight decay.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.model import ModelArgs, Transformer
from herd.parallel import (all_reduce_mean, build_mesh, build_model, clip_grad_norm_, destroy, full_state_dict,
                           init_distributed, is_main, load_full_state_dict)
from herd.train.loss import chunked_cross_entropy, lm_head, token_logprobs

STEPS, BATCH, SEQ, SEED = 5, 4, 32, 1234

# name -> (dp, tp, parallelize options); dp * tp is the world size the scenario needs.
SCENARIOS: dict[str, tuple[int, int, dict]] = {
    "fsdp": (2, 1, {}),
    "tp": (1, 2, {}),
    "fsdp_tied": (2, 1, {"tied": True}),
    "tp_tied": (1, 2, {"tied": True}),
    "fsdp_ac": (2, 1, {"activation_checkpointing": True}),
    "fsdp_bf16": (2, 1, {"mixed_precision": "bf16"}),
    "fsdp_tp": (2, 2, {}),
    "fsdp_tp_tied": (2, 2, {"tied": True, "activation_checkpointing": True}),
    # The same training through herd's losses, computed inside forward (head=...): the chunked
    # cross-entropy (FSDP gathers the output matrix, TP computes vocabulary slices) and the
    # differentiable per-token log-probs (mean of -log p = the same loss, through DPO's path).
    "fsdp_chunked": (2, 1, {"loss": "chunked"}),
    "tp_chunked": (1, 2, {"loss": "chunked"}),
    "tp_tied_logprobs": (1, 2, {"tied": True, "loss": "logprobs"}),
    "fsdp_tp_tied_chunked": (2, 2, {"tied": True, "loss": "chunked"}),
}


def model_args(tied: bool = False) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                     max_seq_len=SEQ, tie_embeddings=tied)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """STEPS packed batches (inputs, targets, document_ids), each [BATCH, SEQ], the same on every rank."""
    g = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(STEPS):
        # Counting sequences with random starts and strides: learnable, so the loss moves.
        start = torch.randint(0, 256, (BATCH, 1), generator=g)
        stride = torch.randint(1, 4, (BATCH, 1), generator=g)
        seq = (start + stride * torch.arange(SEQ + 1)) % 256  # [B, S+1]
        cut = torch.randint(4, SEQ - 4, (BATCH, 1), generator=g)
        docs = (torch.arange(SEQ) >= cut).long()  # [B, S]: two packed documents per row
        out.append((seq[:, :-1], seq[:, 1:], docs))
    return out


def mean_loss(model: Transformer, inputs, targets, docs, loss: str = "plain") -> torch.Tensor:
    """Mean token cross-entropy of a (local) batch: from full logits, or herd's losses inside forward."""
    if loss == "plain":
        logits = model(inputs, document_ids=docs)  # [b, S, vocab]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    if loss == "chunked":  # slices of 24 tokens: several per batch, the last one short
        return model(inputs, document_ids=docs, head=lm_head(chunked_cross_entropy, targets, chunk=24)) / targets.numel()
    return -model(inputs, document_ids=docs, head=lm_head(token_logprobs, targets, chunk=24)).mean()


def train(model: Transformer, batches, loss: str = "plain") -> tuple[list[float], list[float]]:
    """AdamW steps on the given (local) batches; the global mean loss and grad norm per step."""
    # foreach: the multi-tensor step GPUs default to, which needs every parameter of one kind.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    losses, norms = [], []
    for inputs, targets, docs in batches:
        loss_value = mean_loss(model, inputs, targets, docs, loss)
        loss_value.backward()
        norms.append(clip_grad_norm_(model.parameters(), 1.0).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(all_reduce_mean(loss_value.detach()).item())
    return losses, norms


def local_batches(rank_in_dp: int, dp: int):
    """This data-parallel rank's rows of every global batch (tensor-parallel peers share them)."""
    rows = BATCH // dp
    return [tuple(t[rank_in_dp * rows:(rank_in_dp + 1) * rows] for t in b) for b in global_batches()]


def run_scenario(name: str, out_dir: Path) -> None:
    dp, tp, opts = SCENARIOS[name]
    opts = dict(opts)
    tied = opts.pop("tied", False)
    loss = opts.pop("loss", "plain")
    info = init_distributed()
    mesh = build_mesh(info, dp=dp, tp=tp)
    model = build_model(model_args(tied), mesh, info.device, seed=SEED, tp=tp, **opts)
    init = full_state_dict(model)
    # load_full_state_dict: full tensors into another sharded model (other seed) and back out.
    other = build_model(model_args(tied), mesh, info.device, seed=SEED + 1, tp=tp, **opts)
    load_full_state_dict(other, init)
    roundtrip = all(torch.equal(v, init[k]) for k, v in full_state_dict(other).items())
    del other
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    losses, norms = train(model, local_batches(dp_rank, dp), loss)
    final = full_state_dict(model)
    if is_main():
        torch.save({"losses": losses, "grad_norms": norms, "init": init, "final": final, "roundtrip": roundtrip,
                    "world_size": info.world_size}, out_dir / f"{name}.pt")


def main(argv: list[str]) -> None:
    out_dir = Path(argv[0])
    for name in argv[1:]:
        run_scenario(name, out_dir)
    destroy()


if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks share two cores
    main(sys.argv[1:])
