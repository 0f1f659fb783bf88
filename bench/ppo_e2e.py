"""End to end on this CPU: a tiny Llama SFT'd on arithmetic chats in two reply forms, then trained with
`herd ppo` (GRPO or PPO) against a verifiable reward that asks for one of them; prints the held-out reward
before and after, the KL to the SFT model, and writes the reward / KL curve as a PNG.

    python bench/ppo_e2e.py --quick                 # GRPO, what tests/test_posttrain_ppo_e2e.py runs (~1 min)
    python bench/ppo_e2e.py --quick --algo ppo      # PPO with a value head
    python bench/ppo_e2e.py                         # a larger model, more prompts and iterations

1. tokenizer  a 600-token byte-level BPE trained on the arithmetic chats (Llama 3's special tokens included)
2. sft        `herd sft` of a seeded random 2-layer model on herd.posttrain.arithmetic.sft_records, half
              answered "23 + 58 = 81." and half "The answer is 81.", so the SFT model samples both forms
3. ppo        `herd ppo --reward-fn bench/ppo_e2e.py:format_reward` on herd.posttrain.arithmetic.prompt_records
              (other questions than the SFT set's; 20% of them held out by the hash split)
4. measure    held-out reward of greedy replies at the start and the end (logged by herd ppo), the
              largest KL to the reference seen, and OUT/ppo/reward.png (reward and KL per iteration)

The reward is a format check (does the reply restate the sum, "A op B = N."?), not correctness: a
2-layer model trained for a minute cannot add, but it can learn which of its two forms is wanted,
which is what shows RL working. The arithmetic task's correctness reward
(herd.posttrain.arithmetic:reward) is the one to use on real models.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

FORM = re.compile(r"^\s*\d+ [+-] \d+ = -?\d+\.?\s*$")


def format_reward(messages: Any, reply: str) -> float:
    """1.0 when the reply restates the question's sum in the form 'A op B = N.', else 0.0."""
    return 1.0 if FORM.match(reply) else 0.0


@dataclass
class Sizes:
    """How big each stage is: --quick (what the test runs) or the default run."""

    dim: int = 96
    n_layers: int = 2
    sft_records: int = 400
    sft_steps: int = 300
    prompts: int = 200
    iterations: int = 20
    ppo_epochs: int = 2
    minibatches: int = 2
    batch_size: int = 8
    group_size: int = 4
    lr: float = 2e-3
    kl_coef: float = 0.05
    vf_coef: float = 0.1
    """PPO: weight of the value loss (the value head shares the policy's body)."""


QUICK = Sizes()
QUICK_PPO = replace(QUICK, lr=1e-3, vf_coef=0.1)
FULL = Sizes(dim=128, n_layers=4, sft_records=1000, sft_steps=200, prompts=400, iterations=60, lr=1e-3)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    from herd.posttrain.arithmetic import write_records

    return write_records(records, path)


def build(out: Path, sizes: Sizes, algo: str, threads: int, progress: bool = True) -> dict[str, Any]:
    from herd.checkpoint import save_checkpoint
    from herd.model import ModelArgs, Transformer
    from herd.posttrain import arithmetic
    from herd.posttrain.config import SFTConfig
    from herd.posttrain.ppo import ppo
    from herd.posttrain.ppo_config import PPOConfig
    from herd.posttrain.sft import sft
    from herd.tokenizer import train_bpe
    from herd.train.metrics import read_log

    out.mkdir(parents=True, exist_ok=True)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    times: dict[str, float] = {}
    t = time.perf_counter()
    records = arithmetic.sft_records(sizes.sft_records, seed=0)
    for i, r in enumerate(records):  # every other reply in the short form
        if i % 2:
            result = r["messages"][1]["content"].split("= ")[1]
            r["messages"][1]["content"] = f"The answer is {result}"
    sft_data = write_jsonl(out / "sft.jsonl", records)
    prompts = write_jsonl(out / "prompts.jsonl", arithmetic.prompt_records(sizes.prompts, seed=5))
    tok_path = out / "tokenizer.model"
    if not tok_path.is_file():
        say("[1/3] tokenizer: 600-token BPE on the arithmetic chats")
        text = "\n".join(m["content"] for r in records for m in r["messages"])
        train_bpe([text], 600, tok_path, show_progress=False)
    init = out / "init"
    if not init.is_dir():
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=sizes.dim, n_layers=sizes.n_layers, n_heads=4, n_kv_heads=2, vocab_size=600,
                                      multiple_of=32, max_seq_len=128))
        model.init_weights()
        save_checkpoint(model, init, tokenizer_path=tok_path, overwrite=True)
    times["setup_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tuned = out / "sft" / "final"
    if not tuned.is_dir():
        say(f"[2/3] herd sft for {sizes.sft_steps} steps on {len(records)} arithmetic chats (two reply forms)")
        sft(SFTConfig(init_from=str(init), data=[str(sft_data)], out=str(out / "sft"), max_seq_len=128, batch_size=16,
                      steps=sizes.sft_steps, lr=3e-3, warmup_ratio=0.05, val_fraction=0.05, eval_every=0,
                      eval_on_start=False, sample_prompts=2, sample_tokens=16, checkpoint_every=0,
                      log_every=max(sizes.sft_steps // 3, 1), tensorboard=False, threads=threads))
    times["sft_s"] = time.perf_counter() - t

    t = time.perf_counter()
    run = out / algo
    say(f"[3/3] herd ppo --algo {algo}: {sizes.iterations} iterations of {sizes.batch_size} prompts x "
        f"{sizes.group_size} replies")
    cfg = PPOConfig(init_from=str(tuned), prompts=[str(prompts)], out=str(run), algo=algo,
                    reward_fn=f"{Path(__file__).resolve()}:format_reward", steps=sizes.iterations,
                    batch_size=sizes.batch_size, group_size=sizes.group_size, ppo_epochs=sizes.ppo_epochs,
                    minibatches=sizes.minibatches, max_new_tokens=16, lr=sizes.lr,
                    warmup_ratio=0.0, schedule="constant", kl_coef=sizes.kl_coef, val_fraction=0.2, eval_prompts=40,
                    eval_every=max(sizes.iterations // 4, 1), checkpoint_every=0, log_every=1, tensorboard=False,
                    threads=threads, seed=0, vf_coef=sizes.vf_coef)
    if run.exists():
        import shutil

        shutil.rmtree(run)
    summary = ppo(cfg)
    times["ppo_s"] = time.perf_counter() - t
    train, evals = read_log(run / "log.jsonl", "train"), read_log(run / "log.jsonl", "eval")
    return {"algo": algo, "sizes": asdict(sizes), "heldout_prompts": summary.get("heldout_prompts"),
            "before": evals[0]["heldout_reward"], "after": evals[-1]["heldout_reward"],
            "rollout_reward_first": train[0]["reward"], "rollout_reward_last": train[-1]["reward"],
            "kl_max": max(r["kl"] for r in train), "kl_last": train[-1]["kl"],
            "per_step": [{"step": r["step"], "reward": r["reward"], "kl": r["kl"]} for r in train],
            "heldout": [{"step": r["step"], "reward": r["heldout_reward"]} for r in evals],
            "plot": str(run / "reward.png"), **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ppo_e2e"))
    parser.add_argument("--quick", action="store_true", help="the small run the test uses")
    parser.add_argument("--algo", choices=["grpo", "ppo"], default="grpo")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=0, help="override the number of iterations")
    ns = parser.parse_args()
    sizes = (QUICK_PPO if ns.algo == "ppo" else QUICK) if ns.quick else FULL
    if ns.iterations:
        sizes = replace(sizes, iterations=ns.iterations)
    r = build(ns.out, sizes, ns.algo, ns.threads)
    (ns.out / f"e2e_{ns.algo}.json").write_text(json.dumps(r, indent=1) + "\n")
    print(f"{ns.algo}: held-out reward (greedy, {r['sizes']['prompts']} prompts, 20% held out) before {r['before']:.3f} "
          f"-> after {r['after']:.3f}; rollout reward {r['rollout_reward_first']:.3f} -> {r['rollout_reward_last']:.3f}; "
          f"KL to the SFT model max {r['kl_max']:.3f}, last {r['kl_last']:.3f} nats/reply; "
          f"sft {r['sft_s']:.0f} s, ppo {r['ppo_s']:.0f} s; plot {r['plot']}")


if __name__ == "__main__":
    main()
