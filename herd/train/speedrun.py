"""`herd speedrun`: the whole chain on this machine, no download: corpus -> data pipeline ->
tokenizer -> pre-training -> validation loss vs a unigram baseline -> a sample -> OUT/final.

Stages (each reuses its finished output on a re-run, so an interrupted speedrun continues):
    1 corpus     text already on the machine (stdlib source and docstrings, package docs, ...)
                 via herd.data.corpus.build_local_corpus -> OUT/corpus
    2 clean      the data pipeline's filter and dedup stages -> clean text (OUT/data/work)
    3 tokenizer  a byte-level BPE with the preset's vocabulary size, trained on the clean text
                 -> OUT/tokenizer.model
    4 shards     the pipeline's tokenize and pack stages -> OUT/data (train / val shards)
    5 pretrain   herd pretrain on the shards (resumes after a crash) -> OUT/checkpoints, OUT/final,
                 OUT/log.jsonl, OUT/loss.png, OUT/speedrun.json

The unigram entropy H = -sum_t p(t) ln p(t) of the training tokens is the loss of the best
model that ignores context. The validation loss is compared with the same kind of model scored
on the validation split: the cross-entropy of the validation tokens under the training split's
token frequencies (add-one smoothed, so a token never seen in training costs ln(N + V), not
infinity). That baseline is what a context-free model trained on the same data scores on the
same held-out text; a validation loss well below it means the model learned context (a small
corpus whose few held-out documents differ from the rest, e.g. mostly translations, raises both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.flags import add_dataclass_args, dataclass_from_args
from herd.errors import HerdError
from herd.fileio import atomic_write


@dataclass
class SpeedrunConfig:
    """Options of `herd speedrun`."""

    out: str = "runs/speedrun"
    """Folder for every stage's output; re-running reuses finished stages."""
    preset: str = ""
    """Model preset; empty picks herd-1m on CPU, herd-15m on a GPU."""
    minutes: float = 0.0
    """Training time budget in minutes; 0 = 3 on CPU, 5 on a GPU (ignored when --steps is set)."""
    steps: int = 0
    """Train exactly this many steps instead of a time budget."""
    corpus_mb: float = 0.0
    """Megabytes of local text to gather; 0 = 4 on CPU, 20 on a GPU."""
    corpus: str = ""
    """Your own text instead (a folder or file of jsonl, parquet or text files); empty gathers text from this machine."""
    seed: int = 0
    """Seed of the data order and the weight init."""
    threads: int = 0
    """CPU threads for torch ops; 0 = pick the fastest count for the machine's current load (herd.threads)."""
    verbose: bool = False
    """Show datatrove's own log lines on the console (otherwise they go to OUT/data/work/datatrove.log)."""


def add_speedrun_args(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, SpeedrunConfig)


def run_speedrun(args: argparse.Namespace) -> int:
    summary = speedrun(dataclass_from_args(SpeedrunConfig, args))
    print(json.dumps({k: summary[k] for k in ("val_loss", "unigram_baseline", "unigram_entropy", "tokens_per_s",
                                              "wall_s", "final")
                      if k in summary}))
    return 0


def _say(stage: str, text: str) -> None:
    print(f"[speedrun] {stage}: {text}", file=sys.stderr, flush=True)


def _token_counts(data_dir: str | os.PathLike, split: str) -> np.ndarray:
    from herd.data.shards import ShardDataset

    ds = ShardDataset(data_dir, split)
    counts = np.zeros(int(ds.manifest["tokenizer"]["n_words"]), dtype=np.int64)
    for tokens in ds._tokens:  # memory-mapped shards, counted one at a time
        counts += np.bincount(np.asarray(tokens), minlength=counts.size)[:counts.size]
    return counts


def unigram_baseline(data_dir: str | os.PathLike, split: str = "val") -> float:
    """Cross-entropy in nats per token of `split` under the train split's add-one smoothed unigram."""
    train, held = _token_counts(data_dir, "train"), _token_counts(data_dir, split)
    if held.sum() == 0:
        return float("nan")
    log_p = np.log((train + 1) / (train.sum() + train.size))
    return float(-(held * log_p).sum() / held.sum())


def unigram_entropy(data_dir: str | os.PathLike, split: str = "train") -> float:
    """Entropy in nats per token of the token frequencies of a shard split."""
    counts = _token_counts(data_dir, split)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def speedrun(cfg: SpeedrunConfig) -> dict[str, Any]:
    """Run (or finish) every stage; returns the summary also written to OUT/speedrun.json."""
    try:
        from herd.data.corpus import build_local_corpus
        from herd.data.pipeline import DataConfig, run_pipeline
        from herd.tokenizer import train_bpe
    except ImportError as e:
        raise HerdError(f"the speedrun needs herd's data pipeline and tokenizer trainer, which failed to import "
                        f"({e}); reinstall herd with `pip install -e .`.") from None
    from herd.configs import get_preset
    from herd.train.config import TrainConfig
    from herd.train.loop import pretrain

    gpu = torch.cuda.is_available()
    preset = cfg.preset or ("herd-15m" if gpu else "herd-1m")
    args = get_preset(preset)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    corpus = out / "corpus"
    marker = corpus / "corpus.json"
    if cfg.corpus:
        corpus = Path(cfg.corpus)
        if not corpus.exists():
            raise HerdError(f"--corpus {corpus} does not exist; pass a folder or file of jsonl, parquet or text, "
                            "or leave it out to gather text from this machine.")
        _say("1/5 corpus", f"using {corpus}")
    elif marker.is_file():
        _say("1/5 corpus", f"reusing {corpus}")
    else:
        mb = cfg.corpus_mb or (20.0 if gpu else 4.0)
        _say("1/5 corpus", f"gathering {mb:g} MB of text from this machine -> {corpus}")
        files = build_local_corpus(corpus, max_mb=mb)
        atomic_write(marker, json.dumps({"files": [str(f) for f in files], "max_mb": mb}))
    n_bytes = sum(f.stat().st_size for f in ([corpus] if corpus.is_file() else corpus.rglob("*")) if f.is_file())
    _say("1/5 corpus", f"{n_bytes / 1e6:.1f} MB of input")

    data = out / "data"
    data_cfg = DataConfig(tasks=2, workers=min(2, os.cpu_count() or 1), val_fraction=0.05, seed=cfg.seed,
                          verbose=cfg.verbose)
    tokenizer_path = out / "tokenizer.model"
    if tokenizer_path.is_file():
        _say("2/5 clean", "reusing the clean text (tokenizer already trained)")
        _say("3/5 tokenizer", f"reusing {tokenizer_path}")
    else:
        _say("2/5 clean", "filter + dedup (datatrove) ...")
        result = run_pipeline([str(corpus)], data, None, data_cfg, log=lambda s: _say("2/5 clean", s))
        docs = Path(result.clean_dir) / "docs"
        _say("3/5 tokenizer", f"training a {args.vocab_size}-token BPE on {docs} ...")
        _, stats = train_bpe([docs], args.vocab_size, tokenizer_path, show_progress=False)
        _say("3/5 tokenizer", f"{stats.n_words} tokens from {stats.characters:,} characters in {stats.seconds:.1f} s")
    if (data / "manifest.json").is_file() and json.loads((data / "manifest.json").read_text()).get("splits", {}).get("train"):
        _say("4/5 shards", f"reusing {data}")
    else:
        _say("4/5 shards", "tokenize + pack ...")
        run_pipeline([str(corpus)], data, tokenizer_path, data_cfg, log=lambda s: _say("4/5 shards", s))
    entropy = unigram_entropy(data)
    has_val = "val" in json.loads((data / "manifest.json").read_text())["splits"]
    baseline = unigram_baseline(data) if has_val else float("nan")
    manifest = json.loads((data / "manifest.json").read_text())
    n_train = manifest["splits"]["train"]["tokens"]
    _say("4/5 shards", f"{n_train:,} training tokens; unigram entropy {entropy:.3f} nats/token, "
                       f"unigram baseline on the validation split {baseline:.3f}")

    summary_path = out / "speedrun.json"
    if summary_path.is_file() and (out / "final").is_dir():
        summary = json.loads(summary_path.read_text())
        _say("5/5 pretrain", f"reusing the finished run in {out} (use a new --out to train again)")
    else:
        minutes = 0.0 if cfg.steps else (cfg.minutes or (5.0 if gpu else 3.0))
        train_cfg = TrainConfig(
            preset=preset, data=str(data), out=str(out), resume=True, seed=cfg.seed,
            steps=cfg.steps or 100_000, max_minutes=minutes,
            batch_size=32 if gpu else 8, seq_len=512 if gpu else 128,
            lr=5e-3 if preset == "herd-1m" else 2e-3, warmup_steps=10, eval_every=50, eval_batches=4,
            checkpoint_every=50, keep_checkpoints=2, log_every=10, sample_tokens=48, sample_prompt="def ",
            # greedy decoding of a minutes-old model loops on its likeliest phrase; a seeded sample
            # at temperature 0.8 shows what it learned (the words, the code layout)
            sample_temperature=0.8)
        if not gpu:
            from herd.threads import apply_threads

            train_cfg.threads = apply_threads(cfg.threads)
        what = f"{cfg.steps} steps" if cfg.steps else f"~{minutes:g} minutes"
        _say("5/5 pretrain", f"{preset} for {what} (batch {train_cfg.batch_size} x {train_cfg.seq_len} tokens"
                             + (f", {train_cfg.threads} CPU thread(s))" if not gpu else ")"))
        result = pretrain(train_cfg)
        from herd.train.metrics import plot_loss

        plot_loss(out / "log.jsonl", out / "loss.png", reference=baseline,
                  reference_label="unigram baseline (validation split)")
        summary = {k: v for k, v in result.items() if k in ("steps", "val_loss", "tokens_per_s", "tokens", "sample", "final")}
        summary.update(preset=preset, unigram_entropy=entropy, unigram_baseline=baseline, train_tokens=n_train,
                       train_wall_s=result.get("wall_s"), config=asdict(cfg))
        atomic_write(summary_path, json.dumps(summary, indent=1) + "\n")
    summary["wall_s"] = time.time() - t0
    if "val_loss" in summary:
        _say("result", f"validation loss {summary['val_loss']:.3f} nats/token vs {baseline:.3f} for a unigram model "
                       f"on the same split ({summary['val_loss'] - baseline:+.3f}; train-split unigram entropy "
                       f"{entropy:.3f}) after {summary.get('steps')} steps, "
                       f"{summary.get('tokens_per_s', 0):,.0f} tokens/s")
    if "sample" in summary:
        _say("result", f"sample: {summary['sample']!r}")
    _say("result", f"try: herd generate --checkpoint {out / 'final'} --prompt 'def '")
    return summary
