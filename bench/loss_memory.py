"""Peak memory per rank of one training step: herd's chunked loss inside forward vs full float32 logits.

    python bench/loss_memory.py                  # dp 2 (FSDP2) and tp 2 on 2 gloo CPU processes
    python bench/loss_memory.py --vocab 65536 --tokens 4096

Each (layout, loss) pair runs in fresh torchrun processes (peak RSS only grows within a process):
a 2-layer model with a large vocabulary, one forward + backward on `--tokens` tokens per rank,
then every rank reports its peak resident memory (ru_maxrss) and the model + optimizer baseline
measured before the step. "full" is F.cross_entropy on model(inputs) (logits [tokens, vocab] in
float32, its log-softmax and its gradient); "chunked" is model(inputs, head=lm_head(chunked_cross_entropy, ...)),
which under FSDP2 uses the gathered output matrix inside forward and under tensor parallel computes each
rank's vocabulary slice only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(layout: str, loss: str, vocab: int, tokens: int, out: Path) -> None:
    import torch
    import torch.nn.functional as F

    from herd.model import ModelArgs
    from herd.parallel import build_mesh, build_model, destroy, init_distributed
    from herd.train.loss import chunked_cross_entropy, lm_head

    torch.set_num_threads(1)
    info = init_distributed()
    dp, tp = (2, 1) if layout == "dp" else (1, 2)
    mesh = build_mesh(info, dp=dp, tp=tp)
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=64, max_seq_len=tokens)
    model = build_model(args, mesh, info.device, seed=0, tp=tp)
    g = torch.Generator().manual_seed(info.rank if layout == "dp" else 0)
    seq = torch.randint(0, vocab, (1, tokens + 1), generator=g)
    inputs, targets = seq[:, :-1], seq[:, 1:]
    base = _rss_mb()
    if loss == "full":
        logits = model(inputs)  # [1, tokens, vocab] float32
        value = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    else:
        value = model(inputs, head=lm_head(chunked_cross_entropy, targets)) / targets.numel()
    value.backward()
    peak = _rss_mb()
    (out / f"{layout}-{loss}-{info.rank}.json").write_text(json.dumps({"base_mb": base, "peak_mb": peak,
                                                                        "loss": float(value)}))
    destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank in the step")
    ap.add_argument("--worker", nargs=2, metavar=("LAYOUT", "LOSS"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker, a.vocab, a.tokens, Path(a.out))
        return
    logits_mb = a.tokens * a.vocab * 4 / 2**20
    print(f"vocab {a.vocab}, {a.tokens} tokens per rank: one float32 logits tensor is {logits_mb:,.0f} MiB")
    print(f"{'layout':<8}{'loss':<9}{'step peak - baseline per rank (MiB)':>38}{'loss':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for layout in ("dp", "tp"):
            for loss in ("full", "chunked"):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       __file__, "--worker", layout, loss, "--vocab", str(a.vocab), "--tokens", str(a.tokens),
                       "--out", tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if proc.returncode:
                    sys.exit(f"{layout}/{loss} failed:\n{proc.stderr[-3000:]}")
                ranks = [json.loads((Path(tmp) / f"{layout}-{loss}-{r}.json").read_text()) for r in (0, 1)]
                deltas = [r["peak_mb"] - r["base_mb"] for r in ranks]
                results[layout, loss] = max(deltas)
                print(f"{layout:<8}{loss:<9}{' / '.join(f'{d:,.0f}' for d in deltas):>38}{ranks[0]['loss']:>10.4f}")
        for layout in ("dp", "tp"):
            print(f"{layout}: chunked uses {results[layout, 'full'] / max(results[layout, 'chunked'], 1):.1f}x less "
                  "step memory than full logits")


if __name__ == "__main__":
    main()
