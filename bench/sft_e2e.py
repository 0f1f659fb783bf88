"""End to end on this CPU: pre-train a tiny Llama, fine-tune it with `herd sft`, and show on held-out
prompts that it now ends its replies with <|eot_id|> and answers in the trained form.

    python bench/sft_e2e.py              # herd-1m, 600 pre-training + 300 SFT steps (~20 min on a busy 2-core CPU)
    python bench/sft_e2e.py --quick      # a 3-layer model, 250 + 300 steps: what tests/test_posttrain_sft_e2e.py runs

1. corpus      the source files of the standard-library modules of herd.posttrain.synthetic (their code
               and docstrings; a few MB that every Python install has)
2. tokenizer   a 4096-token byte-level BPE trained on it (Llama 3's special tokens included)
3. pretrain    herd-1m on the packed corpus: a base model that has never seen a chat header (its
               special tokens' embeddings were never trained)
4. data        questions about those modules' functions, answered by their docstring's first sentence
               ("`json.dumps`: Serialize ``obj`` to a JSON formatted ``str``."); 15% of the functions
               held out by name
5. sft         `herd sft` (full fine-tuning, meta chat style) from the pre-trained model
6. measure     greedy replies of the base and the fine-tuned model to every held-out question:
               ended with <|eot_id|>, has the trained form, names the function asked about

Prints the before/after table and writes it to OUT/e2e.json. The reference is the base model itself:
the ratio is how much more often the fine-tuned model answers like the training data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch


@dataclass
class Sizes:
    """How big each stage is: the full run (herd-1m) or --quick (a 2-layer model the test can afford)."""

    vocab: int = 4096
    preset: str = "herd-1m"
    shape: dict | None = None
    """ModelArgs fields of a custom shape instead of the preset (the model starts from a seeded random init)."""
    pretrain_steps: int = 600
    pretrain_batch: int = 16
    pretrain_seq: int = 256
    pretrain_lr: float = 3e-3
    sft_steps: int = 300
    sft_lr: float = 1e-3


QUICK = Sizes(vocab=1024, preset="", shape=dict(dim=96, n_layers=3, n_heads=4, n_kv_heads=2, multiple_of=32,
                                                max_seq_len=256, tie_embeddings=True),
              pretrain_steps=250, pretrain_batch=8, pretrain_seq=128, pretrain_lr=5e-3, sft_steps=300, sft_lr=3e-3)


def build(out: Path, sizes: Sizes, threads: int, progress: bool = True) -> dict[str, Any]:
    """Run the whole chain under `out` (stages already finished are reused); returns the measurements."""
    from datatrove.data import Document

    from herd.checkpoint import load_checkpoint, save_checkpoint
    from herd.data.pack import pack_documents
    from herd.model import ModelArgs, Transformer
    from herd.posttrain.config import SFTConfig
    from herd.posttrain.dataset import SFTDataConfig, build_sft_data
    from herd.posttrain.sft import sft
    from herd.posttrain.synthetic import MODULES, docstring_qa, write_records
    from herd.tokenizer import Tokenizer, train_bpe
    from herd.train.config import TrainConfig
    from herd.train.loop import pretrain

    out.mkdir(parents=True, exist_ok=True)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    times: dict[str, float] = {}

    t = time.perf_counter()
    files = sorted({Path(m.__file__) for m in map(_import, MODULES) if getattr(m, "__file__", "").endswith(".py")})
    tok_path = out / "tokenizer.model"
    if not tok_path.is_file():
        say(f"[1/5] tokenizer: {sizes.vocab}-token BPE on {len(files)} standard-library files")
        train_bpe(files, sizes.vocab, tok_path, show_progress=False)
    tok = Tokenizer.from_file(tok_path)
    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        say("[2/5] shards: tokenize and pack the corpus")
        docs = (Document(text=p.read_text(encoding="utf-8"), id=str(p.name)) for p in files)
        pack_documents(docs, shards, tok_path, val_fraction=0.02, shard_tokens=1 << 22)
    times["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    base = out / "pretrain" / "final"
    if not base.is_dir():
        init = {}
        if sizes.shape:  # a custom shape: start from its seeded random init, saved with the tokenizer
            torch.manual_seed(0)
            model = Transformer(ModelArgs(vocab_size=sizes.vocab, **sizes.shape))
            model.init_weights()
            save_checkpoint(model, out / "init", tokenizer_path=tok_path, overwrite=True)
            init = {"init_from": str(out / "init")}
        else:
            init = {"preset": sizes.preset}
        say(f"[3/5] pretrain {sizes.preset or 'a ' + str(sizes.shape['n_layers']) + '-layer model'} "
            f"for {sizes.pretrain_steps} steps")
        pretrain(TrainConfig(data=str(shards), out=str(out / "pretrain"), steps=sizes.pretrain_steps,
                             batch_size=sizes.pretrain_batch, seq_len=sizes.pretrain_seq, lr=sizes.pretrain_lr,
                             warmup_steps=max(1, sizes.pretrain_steps // 20), eval_every=0, checkpoint_every=0,
                             log_every=50, tensorboard=False, threads=threads, seed=0, **init))
    times["pretrain_s"] = time.perf_counter() - t

    qa = write_records(docstring_qa(), out / "pydoc_qa.jsonl")
    data_cfg = dict(data=[str(qa)], chat_style="meta", val_fraction=0.15, max_seq_len=256, seed=0)
    data = build_sft_data(SFTDataConfig(**data_cfg), tok, progress=False)

    t = time.perf_counter()
    tuned = out / "sft" / "final"
    if not tuned.is_dir():
        say(f"[4/5] herd sft for {sizes.sft_steps} steps on {len(data.train)} examples ({len(data.val)} held out)")
        sft(SFTConfig(init_from=str(base), out=str(out / "sft"), steps=sizes.sft_steps, batch_size=8, lr=sizes.sft_lr,
                      warmup_ratio=0.05, eval_every=max(sizes.sft_steps // 3, 1), sample_prompts=3, sample_tokens=40,
                      checkpoint_every=0, log_every=25, tensorboard=False, threads=threads, **data_cfg))
    times["sft_s"] = time.perf_counter() - t

    say(f"[5/5] replies to {len(data.val)} held-out questions, before and after")
    results = {"held_out": len(data.val), "trained_examples": len(data.train), **times}
    for label, path in (("before", base), ("after", tuned)):
        results[label] = measure(load_checkpoint(path), tok, data.val)
    return results


def measure(model: torch.nn.Module, tok: Any, dataset: Any, max_new_tokens: int = 48) -> dict[str, Any]:
    """Rates over every held-out prompt: ended with <|eot_id|>, trained form, names the function asked."""
    from herd.posttrain.replies import chat_replies, heldout_prompts
    from herd.posttrain.synthetic import asked_name, reply_form

    prompts = heldout_prompts(dataset, tok, len(dataset))
    replies = []
    for i in range(0, len(prompts), 16):  # batches of 16 through the engine
        replies += chat_replies(model.eval(), tok, prompts[i:i + 16], max_new_tokens)
    n = len(replies)
    return {
        "ended_with_eot": sum(r.ended_with_eot for r in replies) / n,
        "trained_form": sum(r.ended_with_eot and reply_form(r.text) for r in replies) / n,
        "names_the_function": sum(r.ended_with_eot and reply_form(r.text, asked_name(r.question)) for r in replies) / n,
        "examples": [r.to_dict() for r in replies[:5]],
    }


def _import(name: str):
    import importlib

    return importlib.import_module(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/sft_e2e"))
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--sft-steps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="a 3-layer model and 1024-token vocabulary (the test's sizes)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = pick for the current load")
    a = ap.parse_args()
    sizes = replace(QUICK if a.quick else Sizes())
    sizes.pretrain_steps = a.pretrain_steps or sizes.pretrain_steps
    sizes.sft_steps = a.sft_steps or sizes.sft_steps
    t0 = time.perf_counter()
    r = build(a.out, sizes, a.threads)
    r["wall_s"] = time.perf_counter() - t0
    r["config"] = {**asdict(sizes), "cpu": os.cpu_count(), "torch": torch.__version__}
    (a.out / "e2e.json").write_text(json.dumps(r, indent=1) + "\n")
    print(f"held-out questions: {r['held_out']} (functions never answered in training); "
          f"{r['trained_examples']} training examples")
    print(f"{'':28}{'before':>8}{'after':>8}")
    for key in ("ended_with_eot", "trained_form", "names_the_function"):
        print(f"{key.replace('_', ' '):28}{r['before'][key]:>8.0%}{r['after'][key]:>8.0%}")
    for ex in r["after"]["examples"][:3]:
        print(f"  Q: {ex['question']}\n  A: {ex['text']!r} ({ex['stop'] or 'no end token'})")
    print(f"wall {r['wall_s']:.0f} s (pretrain {r['pretrain_s']:.0f} s, sft {r['sft_s']:.0f} s); {a.out / 'e2e.json'}")


if __name__ == "__main__":
    main()
