"""herd's thread policy (`--threads 0`: herd.threads.pick_cpu_threads) against torch's default
(every core), on herd-1m training steps, in the same run under the machine's current load.

    python bench/threads.py [--steps 15] [--batch 8] [--seq 128]

Prints tokens/s for 1 thread, every core (torch's default), and the count herd picks, and the
ratio of herd's pick to torch's default. On an idle machine the pick is every core (ratio ~1);
when other processes keep the cores busy, one thread avoids OpenMP barrier waits.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from herd.configs import get_preset
from herd.model import Transformer
from herd.threads import pick_cpu_threads


def tokens_per_s(threads: int, steps: int, batch: int, seq: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(get_preset("herd-1m"))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 4096, (batch, seq + 1))
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        logits = model(x[:, :-1])  # [batch, seq, vocab]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return batch * seq / (sorted(times[2:])[len(times[2:]) // 2])  # median step, after 2 warm-up steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    a = p.parse_args()
    cores = torch.get_num_threads()
    picked = pick_cpu_threads(cores)
    print(f"cores {cores} (torch default), load average {os.getloadavg()[0]:.2f}, herd picks {picked}")
    rates = {t: tokens_per_s(t, a.steps, a.batch, a.seq) for t in sorted({1, cores})}
    for t, r in rates.items():
        print(f"  {t} thread(s): {r:9,.0f} tokens/s")
    print(f"herd pick ({picked}) / torch default ({cores}): {rates[picked] / rates[cores]:.2f}x")


if __name__ == "__main__":
    main()
