"""How many CPU threads a command computes with: one policy and one flag for every command.

`--threads N` on each command that runs torch ops (pretrain, speedrun, generate, chat): N > 0
uses exactly N threads; 0, the default, picks the count that runs a short training-like workload
fastest right now. On an idle machine that is every core. On a machine whose cores are shared
with other busy processes, OpenMP threads wait on each other at every op, and one thread can be
3-7x faster than all of them; torch's own default (every core) is the slow choice there.
On a GPU the CPU thread count hardly matters and 0 leaves torch's default.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from herd.errors import HerdError

THREADS_HELP = ("CPU threads for torch ops; 0 = pick the fastest count for the machine's current load "
                "(all cores when idle, fewer when other processes share them)")

_picked: dict[tuple[int, int], int] = {}  # (max_threads, dim) -> choice, measured once per process


def add_threads_flag(parser: argparse.ArgumentParser | Any) -> None:
    """`--threads N` (default 0 = automatic), for commands whose options are not a dataclass."""
    parser.add_argument("--threads", type=int, default=0, metavar="N", help=THREADS_HELP)


def pick_cpu_threads(max_threads: int | None = None, dim: int = 128) -> int:
    """The torch thread count (1 or max) that runs a small training-like workload fastest right now.

    Costs about a second, once per process.
    """
    max_threads = max_threads or torch.get_num_threads()
    if (max_threads, dim) in _picked:
        return _picked[max_threads, dim]
    x, w = torch.randn(2048, dim), torch.randn(dim, 4 * dim)
    best, best_t = max_threads, float("inf")
    before = torch.get_num_threads()
    for t in sorted({max_threads, 1}, reverse=True):
        torch.set_num_threads(t)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(10):
                y = torch.nn.functional.silu(x @ w) * 1.5  # [2048, 4 * dim]
                (y @ w.t()).add_(x).pow(2).mean()
            times.append(time.perf_counter() - start)
        if min(times) < best_t * 0.9:  # prefer more threads unless fewer is clearly faster
            best, best_t = t, min(times)
    torch.set_num_threads(before)
    _picked[max_threads, dim] = best
    return best


def apply_threads(threads: int, device: str | torch.device = "cpu") -> int:
    """Set torch's intra-op thread count by the policy above; returns the count in use."""
    if threads < 0:
        raise HerdError(f"--threads {threads} must be 0 (pick automatically) or a positive count.")
    if threads == 0:
        if torch.device(device).type != "cpu":
            return torch.get_num_threads()
        threads = pick_cpu_threads()
    torch.set_num_threads(threads)
    return threads
