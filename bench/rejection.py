"""Rejection-sampling throughput: K samples per prompt with the prompt's prefill computed once and shared
(Engine.add_forked_request, what `herd rejection-sample` runs) vs K separate requests, each with its own
prefill (the reference: what sampling K times through the plain request API does), on the same model,
prompts, seeds and machine, in interleaved rounds.

    python bench/rejection.py                                  # herd-15m, 4 prompts x 512 tokens, K 8, 32 new tokens
    python bench/rejection.py --preset herd-1m --prompt-len 128 --k 16 --rounds 5

Both variants must produce the same samples token for token (checked every round); the script prints
per variant the median over rounds of samples/s and generated tokens/s, the prompt tokens the model
actually computed (prefill work), and the ratio shared / separate. Samples are drawn at temperature 1
with per-sample seeds, as rejection sampling does. A busy machine moves the absolute rates; the ratio
is taken within each round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from herd.configs import get_preset
from herd.inference import Engine, SamplingParams
from herd.model import Transformer


def run(engine: Engine, prompts: list[list[int]], k: int, new: int, shared: bool) -> tuple[float, list, int]:
    """(seconds, tokens of every sample, prompt tokens computed) for one pass over the prompts."""
    before = engine.stats()["prompt_tokens_computed"]
    owner = {}
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        params = [SamplingParams(temperature=1.0, max_new_tokens=new, seed=1000 * i + j) for j in range(k)]
        rids = engine.add_forked_request(p, params) if shared else [engine.add_request(p, q) for q in params]
        owner.update({rid: (i, j) for j, rid in enumerate(rids)})
    out: dict = {key: [] for key in owner.values()}
    while engine.has_work():
        for e in engine.step():
            out[owner[e.index]].append(e.token)
    dt = time.perf_counter() - t0
    return dt, [out[key] for key in sorted(out)], engine.stats()["prompt_tokens_computed"] - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="herd-15m")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    margs = get_preset(args.preset)
    model = Transformer(margs)
    model.init_weights()
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, margs.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    batch = max(args.k, 8)
    print(f"{args.preset} ({margs.num_params() / 1e6:.1f}M parameters, vocab {margs.vocab_size}), {args.prompts} prompts "
          f"x {args.prompt_len} tokens, K {args.k}, {args.new_tokens} new tokens per sample, engine batch {batch}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    results: dict[str, list[tuple[float, int]]] = {"shared": [], "separate": []}
    for r in range(args.rounds):
        outs = {}
        for name in ("shared", "separate"):  # interleaved: outside load hits both alike
            engine = Engine(model, max_batch_size=batch, max_seq_len=args.prompt_len + args.new_tokens)
            dt, tokens, computed = run(engine, prompts, args.k, args.new_tokens, name == "shared")
            outs[name] = tokens
            results[name].append((dt, computed))
        assert outs["shared"] == outs["separate"], "shared prefill changed the samples"
        print(f"round {r + 1}: shared {results['shared'][-1][0]:.2f} s, separate {results['separate'][-1][0]:.2f} s "
              f"(same samples)")
    samples = args.prompts * args.k
    tokens = samples * args.new_tokens
    print(f"\n| variant | samples/s | tokens/s | prompt tokens computed | time (median of {args.rounds}) |")
    print("|---|---|---|---|---|")
    med = {}
    for name, label in (("shared", "herd shared prefill (one per prompt)"), ("separate", "K separate requests")):
        dt = statistics.median(d for d, _ in results[name])
        med[name] = dt
        print(f"| {label} | {samples / dt:.2f} | {tokens / dt:.1f} | {results[name][0][1]:,} | {dt:.2f} s |")
    ratios = [s[0] and p[0] / s[0] for s, p in zip(results["shared"], results["separate"])]
    print(f"\nshared / separate throughput: {statistics.median(ratios):.2f}x (per-round ratios "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); prefill work {results['separate'][0][1] / results['shared'][0][1]:.1f}x less")


if __name__ == "__main__":
    main()
