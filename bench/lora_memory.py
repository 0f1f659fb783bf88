"""LoRA memory and step time: herd's LoRA vs peft's LoRA on transformers' LlamaForCausalLM, same run.

Same architecture (herd-100m by default), same base weights (herd's, converted with
herd.checkpoint.to_hf_state_dict), same adapters (rank, alpha, targets), same batch, same AdamW
on the adapters. One step = forward + full-logits cross-entropy + backward + optimizer step, so
the two differ only in the model and adapter code. Configurations:

    herd full fp32    every weight trained (the baseline LoRA is meant to beat)
    herd lora fp32    frozen fp32 base, fp32 adapters
    herd lora bf16    frozen bf16 base, fp32 adapters (the low-memory base)
    herd lora int8    the block linear layers int8 weight-only (herd.quant, QLoRA-style), the rest of the
                      base fp32, fp32 adapters
    peft lora fp32    peft.get_peft_model on the transformers model, fp32 base
    peft lora bf16    the same with a bf16 base (peft keeps the adapters in fp32 by default)

Each configuration runs in its own process, so peak memory is its own: the script resets the
kernel's peak-RSS counter (/proc/self/clear_refs) after the model is built and reports the
peak resident memory during the steps above what the process held after its imports ("step
peak": weights, gradients, optimizer state, activations, allocator slack), and the bytes of
parameters, gradients and optimizer state it holds. Step time is the median of the timed steps (the machine is shared:
compare ratios inside one run).

    python bench/lora_memory.py                          # herd-100m, batch 2 x 256, rank 16, attention
    python bench/lora_memory.py --preset herd-15m --targets all-linear --rank 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ["herd full fp32", "herd lora fp32", "herd lora bf16", "herd lora int8", "peft lora fp32", "peft lora bf16"]


def _rss() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def run_one(name: str, ns: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from herd.checkpoint import hf_config, to_hf_state_dict
    from herd.checkpoint.cli import init_model
    from herd.configs import get_preset
    from herd.posttrain.lora import LoRAConfig, apply_lora, resolve_targets

    if ns.threads:
        torch.set_num_threads(ns.threads)
    kind, mode, dtype_name = name.split()
    if kind == "peft":
        import peft  # noqa: F401  (imported before the baseline, like herd's own modules above)
        import transformers  # noqa: F401
    imports = _rss()["VmRSS"]  # python + torch (+ transformers, peft): not the model's memory
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    args = get_preset(ns.preset)
    model = init_model(args, seed=0, dtype=dtype)  # allocated once, directly in its dtype
    targets = resolve_targets(ns.targets.split(","))
    if kind == "herd":
        if dtype_name == "int8":
            from herd.quant import QuantConfig, quantize_model

            quantize_model(model, QuantConfig(method="int8", output="none"))  # the float block weights are freed
        if mode == "lora":
            apply_lora(model, LoRAConfig(lora_rank=ns.rank, lora_alpha=2 * ns.rank, lora_targets=targets))
        else:
            model.requires_grad_(True)
        net = model.train()

        def logits_of(x):
            return net(x)
    else:
        import peft
        from transformers import LlamaConfig, LlamaForCausalLM

        from herd.posttrain.lora import HF_TARGET_NAMES

        cfg = {k: v for k, v in hf_config(args, dtype).items() if k not in ("architectures", "torch_dtype", "dtype")}
        hf_cfg = LlamaConfig(**cfg)
        hf_cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            hf = LlamaForCausalLM(hf_cfg)
        state = to_hf_state_dict(dict(model.state_dict()), args)
        if args.tie_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        hf.load_state_dict(state, assign=True, strict=False)
        del model, state
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)  # its buffers, built off the meta device
        hf_names = {v: k for k, v in HF_TARGET_NAMES.items()}
        net = peft.get_peft_model(hf, peft.LoraConfig(r=ns.rank, lora_alpha=2 * ns.rank,
                                                      target_modules=[hf_names[t] for t in targets])).train()

        def logits_of(x):
            return net(input_ids=x).logits.float()

    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (ns.batch, ns.seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    frozen_tensors = [p for p in net.parameters() if not p.requires_grad] + [b for n, b in net.named_buffers()
                                                                            if "weight_int8" in n or n.endswith(".scale")]
    storages = {p.untyped_storage().data_ptr(): p for p in frozen_tensors}
    frozen = sum(p.numel() * p.element_size() for p in storages.values())  # a tied matrix counts once
    trainable = sum(p.numel() * p.element_size() for p in params)
    _reset_peak()
    before = _rss()["VmRSS"]
    times, losses = [], []
    for step in range(ns.steps + 1):
        t0 = time.perf_counter()
        loss = F.cross_entropy(logits_of(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = _rss()["VmHWM"]
    return {"name": name, "trainable_params": sum(p.numel() for p in params), "frozen_bytes": frozen,
            "trainable_bytes": trainable, "state_bytes": 2 * trainable + trainable,  # grads + Adam m, v
            "rss_imports": imports, "rss_before": before, "step_peak": peak - imports,
            "step_s": statistics.median(times), "first_loss": losses[0]}


def _without_configs(argv: list[str]) -> list[str]:
    """argv without --configs and its value (given as one '--configs=...' or two arguments)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--configs":
            skip = True
        elif not a.startswith("--configs="):
            out.append(a)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="herd-100m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="attention", help="LoRA targets (herd names or groups)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one configuration, in a child process
    ns = parser.parse_args()
    if ns.run:
        print(json.dumps(run_one(ns.run, ns)))
        return
    mb = 1 / 2**20
    print(f"{ns.preset}, batch {ns.batch} x {ns.seq}, LoRA rank {ns.rank} (alpha {2 * ns.rank}) on {ns.targets}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'config':<16} {'trainable':>11} {'frozen MB':>10} {'train+grad+adam MB':>19} {'step peak MB':>13} "
          f"{'step s':>7} {'loss':>8}")
    results = {}
    for name in [c.strip() for c in ns.configs.split(",") if c.strip()]:
        cmd = [sys.executable, __file__, "--run", name] + _without_configs(sys.argv[1:])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[name] = r
        print(f"{name:<16} {r['trainable_params']:>11,} {r['frozen_bytes'] * mb:>10.0f} "
              f"{(r['trainable_bytes'] + r['state_bytes']) * mb:>19.0f} {r['step_peak'] * mb:>13.0f} "
              f"{r['step_s']:>7.3f} {r['first_loss']:>8.4f}")
    for dt in ("fp32", "bf16"):
        h, p = results.get(f"herd lora {dt}"), results.get(f"peft lora {dt}")
        if h and p:
            print(f"lora {dt}: herd/peft step peak {h['step_peak'] / p['step_peak']:.2f}x, "
                  f"step time peft/herd {p['step_s'] / h['step_s']:.2f}x (>1 = herd faster)")
    full = results.get("herd full fp32")
    for dt in ("bf16", "int8"):
        low = results.get(f"herd lora {dt}")
        if full and low:
            print(f"herd lora {dt} vs full fine-tuning fp32: step peak {low['step_peak'] / full['step_peak']:.2f}x")


if __name__ == "__main__":
    main()
