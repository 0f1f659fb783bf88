"""What a training run hands back besides its loss curve: text samples and the exported final model.

Shared by every training loop (pretrain now, SFT / DPO next): they sample from the model being
trained at eval time, and end by writing OUT/final in a weight format with the tokenizer beside it.
Both work on a plain model in one process and on a sharded model under torchrun.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from herd.model import ModelArgs
from herd.parallel import barrier
from herd.train.state import full_model, unwrap


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_ids: Sequence[int] = (), temperature: float = 0.0,
                    seed: int | None = None) -> list[tuple[list[int], int | None]]:
    """Greedy continuations of several prompts: (new token ids, the stop id that ended it or None) each.

    temperature > 0 samples instead (top-p 0.95, seeded; one process only): a minutes-old model's
    greedy text loops on its likeliest phrase, a sample shows more of what it learned.

    One process: herd's inference Engine, all prompts in one batch (KV cache). Sharded models: a
    plain full-forward loop per prompt that every rank runs in lock step (each forward needs all
    of them). The model runs in eval mode (no dropout); its train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[list[int], int | None]] = []
    try:
        if not dist.is_initialized():
            from herd.inference.engine import Engine
            from herd.inference.sampling import SamplingParams

            longest = max(len(p) for p in prompts)
            engine = Engine(unwrap(model), max_batch_size=len(prompts), max_seq_len=longest + max_new_tokens)
            params = SamplingParams(temperature=temperature, top_p=0.95, seed=seed, max_new_tokens=max_new_tokens,
                                    stop_tokens=list(stop_ids))
            out = [(list(r.tokens), r.stop_token) for r in engine.generate([list(p) for p in prompts], params)]
            del engine
        else:
            for prompt in prompts:
                ids, stop = list(prompt), None
                for _ in range(max_new_tokens):
                    next_id = int(model(torch.tensor([ids], device=device), last_only=True)[0, -1].argmax())
                    if next_id in stop_ids:
                        stop = next_id
                        break
                    ids.append(next_id)
                out.append((ids[len(prompt):], stop))
    finally:
        model.train(was_training)
    return out


def greedy_sample(model: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
                  stop_ids: Sequence[int] = (), temperature: float = 0.0, seed: int | None = None) -> list[int]:
    """Continuation of prompt_ids (new token ids only), ending before the first stop id (see greedy_generate)."""
    return greedy_generate(model, [prompt_ids], max_new_tokens, stop_ids, temperature, seed)[0][0]


def export_final(model: torch.nn.Module, args: ModelArgs, folder: Path, fmt: str,
                 tokenizer_path: str | Path | None) -> Path:
    """Write `folder` in weight format `fmt` with the tokenizer beside it (all ranks call; rank 0 writes)."""
    from herd.checkpoint import save_checkpoint

    plain = full_model(model, args)  # a collective under torchrun
    if plain is not None:
        save_checkpoint(plain, folder, format=fmt, tokenizer_path=tokenizer_path, overwrite=True)
    barrier()
    return folder


def special_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's special tokens (none for tokenizers without them)."""
    return sorted(getattr(tokenizer, "special_tokens", {}).values())
