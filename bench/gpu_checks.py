"""The checks only a GPU can answer, one per sub-command, each printing one JSON line for bench/gpu.sh.

    python bench/gpu_checks.py mfu --preset herd-1b --seq-len 8192     # bf16 training MFU
    python bench/gpu_checks.py flex                                    # compiled FlexAttention document masks
    python bench/gpu_checks.py decode --preset herd-100m               # batch-1 decode vs the bandwidth bound
    python bench/gpu_checks.py fsdp-data OUT                           # shards for the NCCL FSDP2 run

--dry-run (every sub-command) uses tiny shapes on whatever device there is, so the whole script can be
tested on a CPU; the numbers it prints then mean nothing.

- mfu: the real training step (herd.train.step.train_step with the chunked loss inside forward, fused
  AdamW, bf16 autocast, compiled blocks, FlexAttention document masks) on random packed documents;
  MFU = tokens/s x FLOPs per token (6 x (non-embedding + output params) + 12 x layers x heads x
  head_dim x seq) / the GPU's dense bf16 datasheet peak (herd.train.metrics.peak_flops).
- flex: the compiled FlexAttention document-masked forward equals per-document SDPA forwards.
- decode: herd's Engine, compiled decode step, bf16, batch 1: tokens/s against bandwidth / weight bytes,
  with the bandwidth measured by a device-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _device(dry: bool) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not dry:
        raise SystemExit("no CUDA GPU here; run with --dry-run to exercise the script on a CPU")
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _doc_ids(batch: int, seq: int, mean_doc: int, gen: torch.Generator) -> torch.Tensor:
    """Random packed-document ids [batch, seq]: documents of random lengths around mean_doc."""
    rows = []
    for _ in range(batch):
        lengths = torch.randint(mean_doc // 2, mean_doc * 3 // 2 + 1, (seq // max(mean_doc // 2, 1) + 1,), generator=gen)
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:seq]
        rows.append(ids)
    return torch.stack(rows)


def mfu(a: argparse.Namespace) -> dict:
    from herd.configs import get_preset
    from herd.model import Transformer
    from herd.parallel import parallelize
    from herd.train.loss import chunked_cross_entropy, lm_head
    from herd.train.masks import attention_kwargs
    from herd.train.metrics import flops_per_token, peak_flops
    from herd.train.step import train_step

    device = _device(a.dry_run)
    args = get_preset(a.preset)
    seq, batch, steps = (64, 2, 2) if a.dry_run else (a.seq_len, a.batch_size, a.steps)
    if a.dry_run:
        args = get_preset("herd-1m")
    args.max_seq_len = max(args.max_seq_len, seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args)
    model.init_weights()
    compile_ = device.type == "cuda" and not a.no_compile
    parallelize(model, None, compile=compile_, activation_checkpointing=a.activation_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def loss_fn(mb):
        inputs, targets, docs = (t.to(device) for t in mb)
        kw = attention_kwargs(docs, use_flex=device.type == "cuda")
        with autocast:
            return model(inputs, head=lm_head(chunked_cross_entropy, targets), **kw)

    def batch_():
        tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=gen)
        return [(tokens[:, :-1], tokens[:, 1:], _doc_ids(batch, seq, max(seq // 4, 2), gen))]

    t_compile = time.perf_counter()
    train_step(model, opt, batch_(), loss_fn, denominator=batch * seq)  # warm-up (and compile)
    _sync(device)
    t_compile = time.perf_counter() - t_compile
    t0 = time.perf_counter()
    for _ in range(steps):
        result = train_step(model, opt, batch_(), loss_fn, denominator=batch * seq)
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    tok_s = batch * seq / dt
    peak, source = peak_flops(device)
    achieved = tok_s * flops_per_token(args, seq)
    return {"check": f"train mfu {a.preset if not a.dry_run else 'herd-1m (dry)'} seq {seq}", "ok": result.loss == result.loss,
            "tokens_per_s": round(tok_s), "tflops": round(achieved / 1e12, 2),
            "mfu": round(achieved / peak, 4) if peak else None, "peak_source": source,
            "first_step_s": round(t_compile, 1), "memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)
            if device.type == "cuda" else None}


def flex(a: argparse.Namespace) -> dict:
    from herd.model import ModelArgs, Transformer
    from herd.train.masks import attention_kwargs

    device = _device(a.dry_run)
    seq = 128 if a.dry_run else 2048
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=64, max_seq_len=seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args)
    model.init_weights()
    model.eval()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (2, seq), generator=gen).to(device)
    docs = _doc_ids(2, seq, seq // 5, gen).to(device)
    use_flex = device.type == "cuda"
    forward = torch.compile(model.forward) if use_flex else model.forward
    with torch.no_grad():
        got = forward(tokens, **attention_kwargs(docs, use_flex=use_flex))
        err = 0.0
        for b in range(2):
            for d in docs[b].unique():
                idx = (docs[b] == d).nonzero().squeeze(1)
                ref = model(tokens[b:b + 1, idx])  # the document alone, positions from 0
                err = max(err, float((got[b:b + 1, idx] - ref).abs().max()))
    return {"check": "flex document mask" + (" (compiled)" if use_flex else " (dry: bool mask)"),
            "ok": err < 2e-3, "max_abs_err": err}


def decode(a: argparse.Namespace) -> dict:
    from herd.configs import get_preset
    from herd.inference import Engine, SamplingParams
    from herd.model import Transformer

    device = _device(a.dry_run)
    args = get_preset("herd-1m" if a.dry_run else a.preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args)
    model.init_weights()
    model.to(dtype)
    new = 8 if a.dry_run else a.new_tokens
    engine = Engine(model, max_batch_size=1, max_seq_len=128 + new, compile=device.type == "cuda")
    prompt = torch.randint(0, args.vocab_size, (128,)).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=new)
    engine.generate([prompt], params)  # warm-up / compile
    _sync(device)
    t0 = time.perf_counter()
    engine.generate([prompt], params)
    _sync(device)
    tok_s = new / (time.perf_counter() - t0)  # includes one 128-token prefill: a slight underestimate
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.empty(256 * 2**20 if not a.dry_run else 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    _sync(device)
    bandwidth = 2 * x.numel() * 10 / (time.perf_counter() - t0)  # read + write bytes per second
    bound = bandwidth / weight_bytes
    return {"check": f"decode {a.preset if not a.dry_run else 'herd-1m (dry)'} batch 1 {str(dtype)[6:]}",
            "ok": tok_s > 0, "tokens_per_s": round(tok_s, 1), "bound_tokens_per_s": round(bound, 1),
            "fraction_of_bound": round(tok_s / bound, 3), "bandwidth_gb_s": round(bandwidth / 1e9, 1)}


def fsdp_data(a: argparse.Namespace) -> dict:
    """Random packed documents as a shard directory (vocab of the preset) for the torchrun FSDP2 check."""
    import numpy as np

    from herd.configs import get_preset
    from herd.data.shards import ShardWriter

    vocab = get_preset("herd-1m" if a.dry_run else a.preset).vocab_size
    rng = np.random.default_rng(0)
    info = {"path": "", "sha256": "", "n_words": vocab, "bos_id": vocab - 2, "eos_id": vocab - 1}
    for split, n in (("train", 400), ("val", 40)):
        with ShardWriter(a.out, split, info) as w:
            for _ in range(n):
                w.add(rng.integers(0, vocab - 2, int(rng.integers(100, 3000))))
    return {"check": "fsdp data", "ok": True, "path": a.out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check", choices=("mfu", "flex", "decode", "fsdp-data"))
    ap.add_argument("out", nargs="?", default="", help="fsdp-data: the shard directory to write")
    ap.add_argument("--preset", default="herd-100m")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on any device (tests the script)")
    a = ap.parse_args()
    fn = {"mfu": mfu, "flex": flex, "decode": decode, "fsdp-data": fsdp_data}[a.check]
    print(json.dumps(fn(a)), flush=True)


if __name__ == "__main__":
    main()
