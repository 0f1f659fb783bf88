"""Cost of choosing one sampled token from a Llama 3 sized vocabulary (128,256 logits), per row:
herd's sampler (herd.inference.sampling.sample_token) against transformers' logits warpers with
torch.multinomial (what `generate(do_sample=True)` runs) and herd's own filters with
torch.multinomial (what herd did before sample_token).

    python bench/sampling.py                  # 1 thread, 200 draws per variant and setting, 3 rounds
    python bench/sampling.py --threads 2 --rounds 5

The logits are Zipf-shaped like a trained model's next-token distribution (logit = -s * log(rank)
in a random order, s drawn per row), so top-p keeps tens to hundreds of tokens, as it does on real
text; a random model's near-flat logits would make top-p keep most of the vocabulary. Every variant
draws from the same rows; the rounds interleave the variants and the median round is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from herd.inference.sampling import SamplingParams, sample_token, sampling_probs

VOCAB = 128_256
SETTINGS = {  # name -> SamplingParams fields
    "t0.6 top-p 0.9 (Meta's default)": dict(temperature=0.6, top_p=0.9),
    "t1.0 (plain sampling)": dict(temperature=1.0, top_p=1.0),
    "t0.7 top-k 50": dict(temperature=0.7, top_p=1.0, top_k=50),
    "t1.0 min-p 0.05": dict(temperature=1.0, top_p=1.0, min_p=0.05),
}


def zipf_rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rank = torch.arange(1, VOCAB + 1, dtype=torch.float32)
    rows = []
    for _ in range(n):
        s = 0.9 + 0.6 * torch.rand((), generator=g)
        rows.append((-s * rank.log())[torch.randperm(VOCAB, generator=g)])
    return torch.stack(rows)


def hf_draw(warpers, row: torch.Tensor, g: torch.Generator) -> int:
    scores = row.unsqueeze(0)
    for w in warpers:
        scores = w(None, scores)
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=g))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=200, help="rows drawn per variant, setting and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    rows = zipf_rows(args.draws)
    print(f"vocabulary {VOCAB:,}, {args.draws} Zipf-shaped rows, {args.threads} thread(s), "
          f"median of {args.rounds} rounds")
    print(f"{'setting':34} {'herd ms':>8} {'herd before':>12} {'transformers':>13} {'vs transformers':>16}")
    for name, fields in SETTINGS.items():
        params = SamplingParams(**fields)
        warpers = [TemperatureLogitsWarper(params.temperature)]
        if params.top_k:
            warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1:
            warpers.append(TopPLogitsWarper(params.top_p))
        if params.min_p:
            warpers.append(MinPLogitsWarper(params.min_p))
        variants = {
            "herd": lambda r, g: sample_token(r, params, g),
            "before": lambda r, g: int(torch.multinomial(sampling_probs(r.unsqueeze(0), params), 1, generator=g)),
            "hf": lambda r, g: hf_draw(warpers, r, g),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for key, fn in variants.items():
                g = torch.Generator().manual_seed(0)
                fn(rows[0], g)  # warm-up
                t0 = time.perf_counter()
                for r in rows:
                    fn(r, g)
                times[key].append((time.perf_counter() - t0) / len(rows) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name:34} {med['herd']:8.3f} {med['before']:12.3f} {med['hf']:13.3f} {med['hf'] / med['herd']:15.1f}x")


if __name__ == "__main__":
    main()
