"""Training-step throughput: herd vs Hugging Face transformers' LlamaForCausalLM, same run.

Same architecture (herd-100m shapes by default), same weights (herd's converted with
herd.checkpoint.to_hf_state_dict, so the first losses must agree), same batch, same AdamW
hyperparameters; one step = forward + loss + backward + optimizer step. Steps of the two models
alternate so background load hits both alike; the median step time is reported.

herd's step is the one herd.train.loop runs on one device: model.features -> the chunked
linear cross-entropy (no [tokens, vocab] float32 logits), fused AdamW. transformers' step is
model(input_ids, labels=...) (full logits, its own shift) with torch's AdamW (foreach). With
--compile, herd's blocks are also compiled (inductor), as `herd pretrain --compile true` does, and
the compile time is reported separately.

    python bench/train.py                     # herd-100m, batch 2 x 256
    python bench/train.py --preset herd-15m --batch 4 --seq 256 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="herd-100m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--compile", action="store_true", help="also time herd with compiled blocks")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from herd.checkpoint import hf_config, to_hf_state_dict
    from herd.configs import get_preset
    from herd.model import Transformer
    from herd.train.loss import chunked_cross_entropy

    margs = get_preset(args.preset)
    torch.manual_seed(0)
    herd = Transformer(margs)
    herd.init_weights()
    cfg = hf_config(margs)
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "dtype")})
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(herd.state_dict(), margs), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    hf.tie_weights()
    hf.train()

    tokens = torch.randint(0, margs.vocab_size, (args.batch, args.seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    n_tokens = inputs.numel()
    hp = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_herd = torch.optim.AdamW(herd.parameters(), fused=True, **hp)
    opt_hf = torch.optim.AdamW(hf.parameters(), **hp)

    def herd_step(model) -> float:
        h = model.features(inputs)  # [B, S, dim]
        loss = chunked_cross_entropy(h, herd.output_weight(), targets) / n_tokens
        loss.backward()
        opt_herd.step()
        opt_herd.zero_grad(set_to_none=True)
        return loss.item()

    def hf_step() -> float:
        # labels = tokens: transformers shifts them itself, so the targets are the same.
        loss = hf(input_ids=inputs, labels=tokens[:, :-1].clone()).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss.item()

    # Same weights, same batch: the losses before any update must agree (checked on a fresh forward).
    with torch.no_grad():
        l_herd = float(chunked_cross_entropy(herd.features(inputs), herd.output_weight(), targets) / n_tokens)
        logits = hf(input_ids=inputs).logits
        l_hf = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)))
    print(f"{args.preset}: {sum(p.numel() for p in herd.parameters()) / 1e6:.1f}M params, batch {args.batch} x "
          f"{args.seq}, {torch.get_num_threads()} threads; initial loss herd {l_herd:.5f} vs transformers {l_hf:.5f}")
    assert abs(l_herd - l_hf) < 1e-3, "the two models do not compute the same function"

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for _ in range(2):  # warm-up
        herd_step(herd)
        hf_step()
    t_herd, t_hf = [], []
    for _ in range(args.steps):
        t_herd.append(timed(lambda: herd_step(herd)))
        t_hf.append(timed(hf_step))
    med_herd, med_hf = statistics.median(t_herd), statistics.median(t_hf)
    print(f"transformers : {n_tokens / med_hf:8.0f} tokens/s  ({med_hf * 1e3:.0f} ms/step)")
    print(f"herd (eager) : {n_tokens / med_herd:8.0f} tokens/s  ({med_herd * 1e3:.0f} ms/step)")
    print(f"ratio herd / transformers (eager): {med_hf / med_herd:.2f}x")
    if args.compile:
        for block in herd.layers:
            block.compile()
        t0 = time.perf_counter()
        herd_step(herd)
        herd_step(herd)
        compile_s = time.perf_counter() - t0
        t_c, t_hf2 = [], []
        for _ in range(args.steps):
            t_c.append(timed(lambda: herd_step(herd)))
            t_hf2.append(timed(hf_step))
        med_c, med_hf2 = statistics.median(t_c), statistics.median(t_hf2)
        print(f"herd (compiled blocks, {compile_s:.0f} s to compile): {n_tokens / med_c:8.0f} tokens/s "
              f"({med_c * 1e3:.0f} ms/step)")
        print(f"ratio herd compiled / transformers: {med_hf2 / med_c:.2f}x")


if __name__ == "__main__":
    main()
