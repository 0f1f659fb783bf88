"""Speculative decoding speed-up with a trained draft/target pair: herd's SpeculativeDecoder vs plain
decoding of the same target (herd's Engine), on held-out prompts, interleaved rounds.

    python bench/speculative.py --target runs/t15/final --draft runs/speedrun/final --data runs/speedrun/data

Both models must share the tokenizer. For each prompt (a held-out document's first --prompt-len
tokens) and each round, plain greedy decoding and speculative decoding with k = 2, 4, 6 draft tokens
generate --new-tokens tokens; the reported speed is generated tokens over decode time (after the
prefill), median over prompts and rounds. Greedy outputs are checked to be identical. With
--temperature > 0 the acceptance rate of sampled decoding is reported too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from herd.checkpoint import load_checkpoint
from herd.data.shards import ShardDataset
from herd.inference import Engine, SamplingParams
from herd.inference.speculative import SpeculativeDecoder


def decode_rate(engine, prompt: list[int], params: SamplingParams) -> tuple[float, list[int]]:
    """(generated tokens per second after the first one, the tokens)."""
    stamps, tokens = [], []
    for events in engine.stream([prompt], params):
        for e in events:
            if e.finish_reason != "stop":
                tokens.append(e.token)
        stamps.append((time.perf_counter(), len(tokens)))
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    return (n1 - n0) / max(t1 - t0, 1e-9), tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=Path, required=True)
    ap.add_argument("--draft", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="shard directory with a val split (the prompts)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", default="2,4,6")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    target, draft = load_checkpoint(ns.target, dtype="fp32"), load_checkpoint(ns.draft, dtype="fp32")
    val = ShardDataset(ns.data, "val")
    prompts = []
    for doc in val.documents():
        if len(doc) > ns.prompt_len:
            prompts.append(doc[:ns.prompt_len].tolist())
        if len(prompts) == ns.prompts:
            break
    print(f"target {ns.target} ({target.num_params() / 1e6:.1f}M), draft {ns.draft} ({draft.num_params() / 1e6:.1f}M); "
          f"{len(prompts)} held-out prompts of {ns.prompt_len} tokens, {ns.new_tokens} new tokens, "
          f"temperature {ns.temperature}, {ns.threads} threads, load average {os.getloadavg()[0]:.2f}")
    ctx = ns.prompt_len + ns.new_tokens
    runners = {"plain": Engine(target, max_batch_size=1, max_seq_len=ctx)}
    for k in (int(x) for x in ns.k.split(",")):
        runners[f"k={k}"] = SpeculativeDecoder(target, draft, k=k, max_seq_len=ctx)
    runners["draft alone"] = Engine(draft, max_batch_size=1, max_seq_len=ctx)
    params = SamplingParams(temperature=ns.temperature, top_p=1.0, max_new_tokens=ns.new_tokens, seed=0)
    rates = {name: [] for name in runners}
    outputs: dict = {}
    for _ in range(ns.rounds):
        for i, prompt in enumerate(prompts):
            for name, r in runners.items():  # interleaved: every variant sees the same load
                rate, tokens = decode_rate(r, prompt, params)
                rates[name].append(rate)
                outputs.setdefault(name, {})[i] = tokens
    plain = statistics.median(rates["plain"])
    print(f"{'decoder':<14}{'tok/s':>9}{'speed-up':>10}{'acceptance':>12}{'tokens/target forward':>23}")
    for name, r in runners.items():
        med = statistics.median(rates[name])
        stats = getattr(r, "stats", None)
        acc = f"{stats.acceptance_rate:.0%}" if stats else ""
        per = f"{stats.tokens_per_round:.2f}" if stats else ""
        print(f"{name:<14}{med:>9.1f}{med / plain:>9.2f}x{acc:>12}{per:>23}")
    if ns.temperature == 0:
        same = all(outputs[n] == outputs["plain"] for n in runners if n.startswith("k="))
        print(f"greedy outputs identical to plain decoding: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
