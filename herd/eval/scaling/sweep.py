"""`herd scaling sweep`: plan an IsoFLOP grid and pre-train every run of it, resumable run by run.

    plan:  for each compute budget C, the shapes of the rule in shapes.py (one per depth) get
           D = C / FLOPs-per-token training tokens; the `sizes_per_budget` consecutive depths centred on
           the one whose D / N is closest to `tokens_per_param` are trained (so the sizes straddle the
           optimum the fit then finds), skipping shapes that would train fewer than `min_steps` steps
    run:   each run is a plain `herd.train.pretrain` from a seeded random init, with the Llama 3
           scaling-law recipe (section 3.2.1): cosine schedule with linear warm-up, decay to 0.1x the
           peak, AdamW weight decay 0.1 (so each step decays the weights by 0.1 x the learning rate),
           and one batch size for the whole sweep. The peak learning rate follows one rule,
           lr * sqrt(256 / dim). Its final validation loss (the same validation windows for every run)
           and, with --eval-tasks, `herd eval` scores of its final weights go to RUN/result.json.
    files: OUT/plan.json, OUT/runs/<budget>-L<depth>/ (the pretrain folder + result.json),
           OUT/runs.jsonl (every finished run). A run with result.json is done; an unfinished one
           resumes from its last checkpoint, so a killed sweep continues where it stopped, and a
           re-run with more --budgets adds their runs to the same sweep. Under torchrun every rank
           runs the same plan and rank 0 writes the files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.eval.scaling.shapes import describe, flop_params, shape_for_depth
from herd.fileio import atomic_write
from herd.train.metrics import flops_per_token


@dataclass
class SweepConfig:
    """Settings of `herd scaling sweep`."""

    data: str = ""
    """Token-shard folder (from `herd speedrun` or `herd data run/pack`) with train and val splits."""
    out: str = "runs/scaling"
    """Sweep folder: plan.json, runs/, runs.jsonl (a re-run resumes here)."""
    budgets: str = "1e11,3e11,1e12"
    """Compute budgets in training FLOPs, comma-separated."""
    depths: str = "1,2,3,4,5,6"
    """Candidate depths; each gives one shape by the rule in herd/eval/scaling/shapes.py."""
    sizes_per_budget: int = 4
    """Shapes trained per budget (consecutive depths around the expected optimum)."""
    tokens_per_param: float = 20.0
    """Where to centre each budget's sizes: the shape with D / N closest to this (Chinchilla's 20)."""
    aspect: int = 64
    """dim / n_layers of the shapes (Llama 3: about 128)."""
    head_dim: int = 64
    """Attention head width of the shapes (Llama 3.2 1B: 64)."""
    seq_len: int = 128
    """Training sequence length."""
    batch_size: int = 16
    """Sequences per step, the same for every run."""
    lr: float = 3e-3
    """Peak learning rate of a 256-wide model; a run of width dim uses lr * sqrt(256 / dim)."""
    warmup_fraction: float = 0.1
    """Linear warm-up over this fraction of a run's steps (at most 2000 steps, the paper's warm-up)."""
    min_steps: int = 30
    """Shapes that would train fewer steps than this at a budget are not planned."""
    eval_batches: int = 8
    """Validation batches for each run's final loss (the same windows for every run)."""
    eval_tasks: str = ""
    """herd eval tasks scored on every run's final weights, for the downstream fit (e.g. arc_easy)."""
    eval_limit: int = 500
    """Documents per downstream task (0 = all)."""
    eval_data: str = ""
    """--data of the downstream tasks (TASK=PATH pairs)."""
    seed: int = 0
    """Seed of the initial weights and the data order (the same for every run)."""
    threads: int = 0
    """CPU threads; 0 = the fastest count under the current load (measured once)."""
    device: str = "auto"
    """cpu, cuda or auto."""


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HerdError(f"{flag} '{text}' is not a comma-separated list of numbers, e.g. 1e11,3e11,1e12.") from None
    if not values or any(not v > 0 for v in values):
        raise HerdError(f"{flag} needs one or more positive numbers, got '{text}'.")
    return values


def run_name(budget: float, depth: int) -> str:
    return f"{budget:.0e}".replace("+", "") + f"-L{depth}"


def plan_sweep(cfg: SweepConfig, vocab_size: int) -> list[dict[str, Any]]:
    """The runs of the grid: budget, depth, shape, N, planned tokens and steps (HerdError if a budget
    cannot get 3 shapes with at least min_steps steps)."""
    budgets = sorted(_floats(cfg.budgets, "--budgets"))
    depths = sorted({int(d) for d in _floats(cfg.depths, "--depths")})
    if cfg.sizes_per_budget < 3:
        raise HerdError(f"--sizes-per-budget {cfg.sizes_per_budget}: a parabola needs at least 3 sizes per budget.")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    runs = []
    for budget in budgets:
        options = []
        for depth in depths:
            args = shape_for_depth(depth, vocab_size, cfg.seq_len, cfg.aspect, cfg.head_dim)
            fpt = flops_per_token(args, cfg.seq_len)
            steps = int(round(budget / fpt / tokens_per_step))
            if steps >= cfg.min_steps:
                options.append((depth, args, fpt, steps))
        if len(options) < 3:
            raise HerdError(f"budget {budget:.3g} FLOPs gives only {len(options)} shape(s) at least --min-steps "
                            f"{cfg.min_steps} steps long; raise the budget, lower --batch-size / --seq-len, or "
                            "add smaller --depths.")
        ratios = [abs(math.log(steps * tokens_per_step / flop_params(args) / cfg.tokens_per_param))
                  for _, args, _, steps in options]
        k = min(cfg.sizes_per_budget, len(options))
        centre = ratios.index(min(ratios))
        start = max(0, min(centre - (k - 1) // 2, len(options) - k))  # even k: one more size above the centre
        for depth, args, fpt, steps in options[start:start + k]:
            tokens = steps * tokens_per_step
            runs.append({"name": run_name(budget, depth), "budget": budget, "depth": depth, "model_args": args.to_dict(),
                         "params": flop_params(args), "total_params": args.num_params(), "steps": steps,
                         "tokens": tokens, "flops": tokens * fpt,
                         "lr": cfg.lr * math.sqrt(256 / args.dim), "shape": describe(args)})
    return runs


def _write_init(path: Path, args_dict: dict, seed: int, tokenizer_path: str | None) -> None:
    import torch

    from herd.checkpoint import save_checkpoint
    from herd.model import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_dict(args_dict))
    model.init_weights()
    save_checkpoint(model, path, tokenizer_path=tokenizer_path, overwrite=True)


def _downstream(final: Path, cfg: SweepConfig, out: Path) -> dict[str, Any]:
    from herd.eval.loading import load_model_and_tokenizer
    from herd.eval.runner import EvalConfig, evaluate

    model, tok, info = load_model_and_tokenizer(final)
    report = evaluate(model, tok, EvalConfig(tasks=cfg.eval_tasks, limit=cfg.eval_limit, data=cfg.eval_data,
                                             out=str(out)), info)
    return {name: {**r["metrics"], "n": r["n"]} for name, r in report["tasks"].items()}


def _log(text: str) -> None:
    from herd.parallel import is_main

    if is_main():  # under torchrun only rank 0 talks
        print(f"[sweep] {text}", file=sys.stderr, flush=True)


def run_sweep(cfg: SweepConfig, log=_log) -> list[dict]:
    """Plan the grid (or reuse OUT/plan.json), run every unfinished run, return all finished results."""
    from herd.data.shards import read_manifest
    from herd.parallel import barrier, init_distributed, is_main
    from herd.train import TrainConfig, pretrain

    init_distributed()  # under torchrun: join the group now, so only rank 0 logs and writes from the start
    if not cfg.data or not Path(cfg.data).is_dir():
        raise HerdError(f"--data '{cfg.data}' is not a shard folder; build one with `herd speedrun --steps 1` "
                        "(OUT/data) or `herd data pack`.")
    manifest = read_manifest(cfg.data)
    if "val" not in manifest.get("splits", {}):
        raise HerdError(f"{cfg.data} has no val split; the sweep compares runs by validation loss. Re-pack with "
                        "--val-fraction > 0.")
    tok_info = manifest.get("tokenizer", {})
    plan = plan_sweep(cfg, int(tok_info.get("n_words", 0)))
    out = Path(cfg.out)
    plan_file = out / "plan.json"
    # Budgets may be added to a sweep (its finished runs are kept); any other setting changes every run.
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "threads", "device", "eval_tasks",
                                                                   "eval_limit", "eval_data", "budgets")}
    if plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        if {k: v for k, v in saved.get("settings", {}).items() if k != "budgets"} != settings:
            raise HerdError(f"{out} holds a sweep planned with other settings; use a new --out, or the settings in "
                            f"{plan_file} to resume it (only --budgets may change).")
        known = {r["name"] for r in saved.get("runs", [])}
        plan = sorted(saved["runs"] + [r for r in plan if r["name"] not in known], key=lambda r: (r["budget"], r["depth"]))
    if is_main():
        atomic_write(plan_file, json.dumps({"settings": settings, "runs": plan}, indent=1) + "\n")
    threads = cfg.threads
    if threads == 0 and cfg.device != "cuda":
        import torch

        from herd.train.metrics import pick_cpu_threads

        threads = pick_cpu_threads() if not torch.cuda.is_available() else 0
    total_flops = sum(r["flops"] for r in plan)
    log(f"{len(plan)} runs over {len(set(r['budget'] for r in plan))} budgets, {total_flops:.3g} FLOPs in all"
        + (f", {threads} CPU thread(s)" if threads else ""))
    results = []
    for i, run in enumerate(plan, 1):
        rdir = out / "runs" / run["name"]
        done = rdir / "result.json"
        if done.is_file():
            results.append(json.loads(done.read_text()))
            log(f"run {i}/{len(plan)} {run['name']}: done (val loss {results[-1]['loss']:.4f})")
            continue
        log(f"run {i}/{len(plan)} {run['name']}: budget {run['budget']:.3g}, {run['shape']}, {run['steps']} steps, "
            f"{run['tokens']:,} tokens, lr {run['lr']:.2e}")
        if is_main() and not (rdir / "init" / "herd.json").is_file():
            _write_init(rdir / "init", run["model_args"], cfg.seed, tok_info.get("path") or None)
        barrier()
        steps = run["steps"]
        tcfg = TrainConfig(init_from=str(rdir / "init"), data=cfg.data, out=str(rdir), resume=True, seed=cfg.seed,
                           steps=steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=run["lr"],
                           min_lr_ratio=0.1, warmup_steps=max(1, min(2000, int(cfg.warmup_fraction * steps))),
                           schedule="cosine", weight_decay=0.1, eval_every=0, eval_batches=cfg.eval_batches,
                           checkpoint_every=max(25, steps // 4), keep_checkpoints=1, log_every=max(1, steps // 4),
                           sample_tokens=8, tensorboard=False, threads=threads, device=cfg.device)
        t0 = time.perf_counter()
        summary = pretrain(tcfg)
        result = {**{k: run[k] for k in ("name", "budget", "depth", "params", "total_params", "steps", "tokens",
                                         "flops", "lr", "shape")},
                  "loss": summary.get("val_loss"), "train_seconds": round(time.perf_counter() - t0, 1),
                  "tokens_per_s": summary.get("tokens_per_s")}
        if cfg.eval_tasks and is_main():
            result["eval"] = _downstream(rdir / "final", cfg, rdir / "eval")
        if is_main():
            atomic_write(done, json.dumps(result, indent=1) + "\n")
        barrier()
        results.append(result)
        log(f"run {i}/{len(plan)} {run['name']}: val loss {result['loss']:.4f} in {result['train_seconds']:.0f} s")
    if is_main():
        atomic_write(out / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    return results


def read_runs(path: str | Path) -> list[dict]:
    """Finished runs of a sweep folder (its runs/*/result.json), or of a jsonl file of
    {budget, params, tokens, loss[, eval]} records (e.g. runs you trained elsewhere)."""
    path = Path(path)
    if path.is_dir():
        files = sorted((path / "runs").glob("*/result.json"))
        if not files:
            raise HerdError(f"{path} has no finished runs (runs/*/result.json); run `herd scaling sweep --out {path}`.")
        runs = [json.loads(f.read_text()) for f in files]
    elif path.is_file():
        from herd.eval.data import read_records, require_fields

        runs = read_records(path)
        require_fields(runs, ("budget", "params", "tokens", "loss"), path)
    else:
        raise HerdError(f"{path} does not exist; pass a sweep folder or a jsonl file of runs.")
    return runs
