"""Decode and prefill throughput: herd's Engine vs Hugging Face transformers `generate`, same weights.

    python bench/decode.py                       # herd-100m, fp32, prompt 128, 32 new tokens, batch 1 and 8
    python bench/decode.py --compile             # torch.compile herd's decode step (CPU: max-autotune + freezing)

Both sides get the same random weights (herd -> Hugging Face through herd.checkpoint's converter),
fp32, greedy, the same prompts (equal lengths, so neither side pads), and exactly the same number
of new tokens (min_new_tokens on the transformers side). Timing: a run with 1 new token is the
prefill; (run with N new tokens - run with 1) / (N - 1) steps is the decode. Best of --repeats.

The script also measures the machine's memory bandwidth (a large-array copy and a large-array
read) and reports how many GB/s of weights herd's batch-1 decode reads (weight bytes x tokens/s):
batch-1 decode reads every weight once per token, so that bandwidth is its ceiling.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from herd.checkpoint import hf_config, to_hf_state_dict
from herd.configs import get_preset
from herd.inference import Engine, SamplingParams
from herd.model import Transformer


def memory_bandwidth(mib: int = 256, repeats: int = 5) -> tuple[float, float]:
    """(copy GB/s counting read + write, read GB/s) of a `mib` MiB fp32 array, best of `repeats`."""
    n = mib * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    best_copy = best_read = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        best_read = min(best_read, time.perf_counter() - t)
    nbytes = n * 4
    return 2 * nbytes / best_copy / 1e9, nbytes / best_read / 1e9


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="herd-100m")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compile", action="store_true", help="torch.compile herd's decode step")
    ap.add_argument("--skip-hf", action="store_true", help="herd only (no ratio)")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    batch_sizes = [int(b) for b in ns.batch_sizes.split(",")]
    P, N = ns.prompt_len, ns.new_tokens

    copy_gbs, read_gbs = memory_bandwidth()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {ns.threads} threads; "
          f"memory bandwidth: copy {copy_gbs:.1f} GB/s (read + write), read {read_gbs:.1f} GB/s")

    args = get_preset(ns.preset, max_seq_len=P + N)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {ns.preset}, {model.num_params() / 1e6:.1f}M parameters, fp32, {weight_bytes / 1e6:.0f} MB "
          f"of weights read per decode step; prompt {P} tokens, {N} new tokens, greedy")

    hf = None
    if not ns.skip_hf:
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.LlamaConfig.from_dict(hf_config(args))
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(cfg)
        state = {k: v.detach() for k, v in to_hf_state_dict(model.state_dict(), args).items()}
        hf.load_state_dict(state, strict=False, assign=True)  # shares storage with herd except q/k
        if args.tie_embeddings:
            hf.tie_weights()
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)  # real inv_freq instead of meta
        hf.eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0

    rows = []
    gen = torch.Generator().manual_seed(1)
    for b in batch_sizes:
        # One engine per batch size, as a server would size its cache (a compiled step is then
        # specialized to exactly these shapes).
        engine = Engine(model, max_batch_size=b, max_seq_len=P + N, compile=ns.compile)
        if ns.compile:
            engine.generate([[1] * P] * b, SamplingParams(temperature=0, max_new_tokens=3))
            print(f"herd decode step compiled for batch {b}: {engine.compiled}")
        prompts = torch.randint(0, args.vocab_size, (b, P), generator=gen)
        plist = prompts.tolist()
        p1, pn = SamplingParams(temperature=0, max_new_tokens=1), SamplingParams(temperature=0, max_new_tokens=N)
        with torch.inference_mode():
            herd_out = engine.generate(plist, pn)  # warm-up
        h1 = best_time(lambda: engine.generate(plist, p1), ns.repeats)
        hn = best_time(lambda: engine.generate(plist, pn), ns.repeats)
        row = {"b": b, "herd_prefill": b * P / h1, "herd_decode": b * (N - 1) / (hn - h1)}
        if hf is not None:
            def hf_gen(n: int):
                with torch.inference_mode():
                    return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                       max_new_tokens=n, min_new_tokens=n)
            hf_out = hf_gen(N)  # warm-up
            f1 = best_time(lambda: hf_gen(1), ns.repeats)
            fn = best_time(lambda: hf_gen(N), ns.repeats)
            row.update(hf_prefill=b * P / f1, hf_decode=b * (N - 1) / (fn - f1),
                       same=hf_out[:, P:].tolist() == [r.tokens for r in herd_out])
        rows.append(row)
        print(_row_text(row), flush=True)

    one = next((r for r in rows if r["b"] == 1), None)
    if one is not None:
        achieved = weight_bytes * one["herd_decode"] / 1e9
        print(f"batch-1 decode reads weights at {achieved:.1f} GB/s = {achieved / read_gbs:.0%} of the measured "
              f"read bandwidth ({read_gbs:.1f} GB/s); bound there: {read_gbs * 1e9 / weight_bytes:.1f} tokens/s")
        if "hf_decode" in one:
            print(f"RATIO herd/transformers batch-1 decode: {one['herd_decode'] / one['hf_decode']:.2f}x")
    return 0


def _row_text(r: dict) -> str:
    text = (f"batch {r['b']}: herd prefill {r['herd_prefill']:.0f} tok/s, decode {r['herd_decode']:.1f} tok/s")
    if "hf_decode" in r:
        text += (f" | transformers prefill {r['hf_prefill']:.0f} tok/s, decode {r['hf_decode']:.1f} tok/s"
                 f" | ratio prefill {r['herd_prefill'] / r['hf_prefill']:.2f}x, decode "
                 f"{r['herd_decode'] / r['hf_decode']:.2f}x | same tokens: {r['same']}")
    return text


if __name__ == "__main__":
    sys.exit(main())
