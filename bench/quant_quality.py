"""What quantization costs in quality: held-out perplexity of a trained model in fp32, herd int8 / int4,
and llama.cpp's Q8_0 / Q4_0 blocks (dequantized into herd), plus greedy agreement with fp32.

    herd speedrun --out runs/speedrun                     # a trained model and its held-out shards
    python bench/quant_quality.py --checkpoint runs/speedrun/final --data runs/speedrun/data

Perplexity is exp(mean next-token cross-entropy) over non-overlapping windows of the validation
split, with document masking (the same windows for every variant). Reference: the same model in fp32.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.checkpoint import find_tokenizer, load_checkpoint
from herd.data.shards import ShardDataset
from herd.quant import QuantConfig, quantize_model


def perplexity(model, windows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, list]:
    """exp(mean cross-entropy) over the windows, and the argmax predictions (for agreement)."""
    total, count, preds = 0.0, 0, []
    with torch.inference_mode():
        for x, y, docs in windows:
            logits = model(x.unsqueeze(0), document_ids=docs.unsqueeze(0))[0]  # [S, V]
            total += F.cross_entropy(logits.float(), y, reduction="sum").item()
            count += y.numel()
            preds.append(logits.argmax(-1))
    return math.exp(total / count), preds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="shard directory with a val split")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64, help="validation windows to score (at most)")
    ap.add_argument("--group-size", type=int, default=32, help="int4 group size")
    ap.add_argument("--threads", type=int, default=None)
    ns = ap.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    base = load_checkpoint(ns.checkpoint, dtype="fp32")
    val = ShardDataset(ns.data, "val")
    n = min(ns.windows, val.num_windows(ns.seq_len))
    windows = [tuple(torch.from_numpy(a) for a in val.get(i, ns.seq_len)) for i in range(n)]
    print(f"{ns.checkpoint}: {base.num_params() / 1e6:.2f}M parameters; {n} held-out windows of {ns.seq_len} "
          f"tokens ({n * ns.seq_len} tokens)")

    variants = {
        "fp32": base,
        "herd int8": quantize_model(copy.deepcopy(base), QuantConfig("int8")),
        f"herd int4 g{ns.group_size}": quantize_model(copy.deepcopy(base), QuantConfig("int4", ns.group_size)),
        f"herd int4 g{ns.group_size}, fp32 output": quantize_model(copy.deepcopy(base),
                                                                  QuantConfig("int4", ns.group_size, output="none")),
    }
    tok_path = find_tokenizer(ns.checkpoint)
    if tok_path is not None:  # llama.cpp's blocks: export, read back dequantized
        from herd.checkpoint.gguf import write_gguf
        from herd.tokenizer import Tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for q in ("q8_0", "q4_0"):
                path = write_gguf(base, Tokenizer.from_file(tok_path), Path(tmp) / f"m-{q}.gguf", qtype=q,
                                  progress=False)
                variants[f"GGUF {q.upper()} (dequantized)"] = load_checkpoint(path)

    ref_ppl, ref_preds = None, None
    print(f"{'variant':<34}{'perplexity':>12}{'delta':>10}{'argmax = fp32':>15}{'seconds':>9}")
    for name, model in variants.items():
        t = time.perf_counter()
        ppl, preds = perplexity(model, windows)
        if ref_ppl is None:
            ref_ppl, ref_preds = ppl, preds
        agree = sum((a == b).sum().item() for a, b in zip(preds, ref_preds)) / sum(p.numel() for p in preds)
        print(f"{name:<34}{ppl:>12.4f}{(ppl / ref_ppl - 1) * 100:>+9.2f}%{agree:>15.2%}{time.perf_counter() - t:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
