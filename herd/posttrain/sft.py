"""The supervised fine-tuning loop: chat data and a checkpoint in, a fine-tuned model (or adapter) out.

    setup: process group + ("dp", "tp") mesh -> tokenizer (the checkpoint's) -> chat data rendered,
           checked, split; report printed and saved -> rows (packed) -> the policy from --init-from
           (optional LoRA, built sharded) -> AdamW over what trains -> resume
    step:  lr from the step -> this rank's rows of the global batch -> micro-batches (forward with
           the masked chunked loss inside, backward) -> mean over the learned tokens of the global
           batch -> clip -> NaN / spike check -> optimizer step -> log / eval / checkpoint
    eval:  validation loss over the held-out rows, and greedy replies to a few held-out prompts,
           showing whether each ended its turn with <|eot_id|>
    end:   checkpoint -> eval -> export (OUT/final, or OUT/adapter [+ merged OUT/final]) -> loss.png

Loss normalization: the loss is the mean over every learned token of the global batch (the
cross-entropy transformers gives with labels -100 outside the mask, over the whole batch at once).
Ranks hold different numbers of learned tokens, so each divides its sum by the global count over
the data-parallel size (herd.train.step's `denominator`), and FSDP's gradient average completes
the global mean: one process and any data-parallel layout compute the same step.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from herd.errors import HerdError
from herd.fileio import atomic_write
from herd.parallel import all_reduce_mean, barrier, build_mesh, init_distributed, is_main
from herd.posttrain import resume
from herd.posttrain.config import SFTConfig
from herd.posttrain.dataset import build_sft_data, load_tokenizer_for
from herd.posttrain.export import export_policy
from herd.posttrain.packing import SFTBatch, SFTBatchLoader, SFTRows, eval_batches
from herd.posttrain.policy import load_policy, policy_args, trainable_parameters
from herd.posttrain.replies import chat_replies, heldout_prompts
from herd.train.loss import chunked_cross_entropy, lm_head
from herd.train.masks import attention_kwargs
from herd.threads import apply_threads
from herd.train.metrics import MetricsLogger, cap_mfu, flops_per_token, memory_mb, peak_flops, plot_loss
from herd.train.optim import build_optimizer, set_lr
from herd.train.preflight import available_bytes, estimate_bytes
from herd.train.step import SpikeGuard, train_step


def sft(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune as configured; returns a summary (losses, replies, throughput, paths). Rank 0 writes files."""
    cfg.validate()
    info = init_distributed()
    device = info.device if cfg.device == "auto" else torch.device(cfg.device)
    apply_threads(cfg.threads, device)  # 0: the fastest count under the current load (herd.threads)
    mesh = build_mesh(info, cfg.dp, cfg.tp)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    dp_size = mesh["dp"].size() if mesh is not None else 1
    out = Path(cfg.out)

    # Everything that can be wrong with the input is checked before anything is built or written.
    args = policy_args(cfg.init_from)
    if cfg.max_seq_len > args.max_seq_len:
        raise HerdError(f"--max-seq-len {cfg.max_seq_len} is longer than the model's context of {args.max_seq_len} "
                        "tokens; pass --max-seq-len <= that.")
    tokenizer = load_tokenizer_for(cfg.init_from, cfg.tokenizer or None, args.vocab_size)
    tokenizer_path = cfg.tokenizer or _stored_tokenizer(cfg.init_from)
    resume_from = resume.resume_point(cfg)
    saved = resume.check_resumable(resume_from, cfg, args, tokenizer_sha256=tokenizer.sha256)
    data = build_sft_data(cfg.data_config(), tokenizer, progress=is_main())
    fingerprint = data.train.fingerprint()
    resume.check_fingerprints(saved, resume_from, data_sha256=fingerprint)
    rows = SFTRows(data.train, cfg.max_seq_len, cfg.packing)
    val_rows = SFTRows(data.val, cfg.max_seq_len, cfg.packing) if len(data.val) else None
    total = int(saved.get("total_steps", 0)) or cfg.total_steps(len(rows))
    if cfg.batch_size % dp_size:
        raise HerdError(f"--batch-size {cfg.batch_size} does not split over {dp_size} data-parallel ranks; use a "
                        f"multiple of {dp_size}.")
    micro = _micro_batch(cfg, args, device, cfg.batch_size // dp_size, dp_size * cfg.tp)

    precision = "bf16" if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda") else "fp32"
    model = load_policy(cfg.init_from, args, mesh, device, lora=cfg.lora_config() if cfg.lora else None,
                        seed=cfg.seed, tp=cfg.tp, compile=cfg.compile,
                        activation_checkpointing=cfg.activation_checkpointing,
                        mixed_precision=precision if dp_size > 1 else "fp32")
    model.train()
    torch.manual_seed(cfg.seed + info.rank)  # LoRA dropout masks: the same run twice (a resume restores the state)
    optimizer = build_optimizer(model, cfg)
    loader = SFTBatchLoader(rows, seed=cfg.seed, dp_rank=dp_rank, dp_size=dp_size, pad_id=tokenizer.pad_id)
    guard = SpikeGuard(cfg.spike_factor, cfg.nan_policy, cfg.max_skips)
    start_step = 0
    if resume_from is not None:
        saved = resume.restore(resume_from, model, optimizer, cfg)
        start_step = int(saved["step"])
        if cfg.steps and cfg.steps != saved.get("config", {}).get("steps", cfg.steps):  # --steps given on resume
            total = cfg.steps
        loader.load_state_dict(saved["loader"])
        guard.load_state_dict(saved.get("guard", {}))

    log = MetricsLogger(out, enabled=is_main(), tensorboard=cfg.tensorboard, resume_step=start_step)
    if is_main():
        atomic_write(out / "data_report.json", _json(data.report.to_dict()))
    log.print(data.report.format())
    log.print(f"{len(rows):,} training rows of {cfg.max_seq_len} positions ({rows.fill():.0%} full"
              f"{', packed' if cfg.packing else ', one example each'}); {len(val_rows or []):,} validation rows")
    if resume_from is not None:
        log.print(f"resuming {resume_from} at step {start_step} of {total}")
    n_train = trainable_parameters(model)
    peak, peak_source = peak_flops(device, cfg.peak_tflops)
    what = (f"LoRA rank {cfg.lora_rank} on {','.join(cfg.lora_targets)}" if cfg.lora else "full fine-tuning")
    log.print(f"{cfg.init_from}: {args.num_params() / 1e6:.2f}M parameters, {n_train / 1e6:.3g}M trained ({what}) on "
              f"{device} x {info.world_size} (dp {dp_size}, tp {cfg.tp}), {precision}; {total} steps of "
              f"{cfg.batch_size} rows, peak lr {cfg.peak_lr:g}")
    log.log("config", start_step, **cfg.to_dict(), model_args=args.to_dict(), trainable_params=n_train,
            world_size=info.world_size, peak_flops=peak, peak_source=peak_source, data_report=data.report.to_dict())

    val = eval_batches(val_rows, cfg.batch_size, dp_rank, dp_size, tokenizer.pad_id) if val_rows is not None else []
    if cfg.eval_batches > 0:
        val = val[:cfg.eval_batches]
    prompts = heldout_prompts(data.val, tokenizer, cfg.sample_prompts)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def loss_of(batch: SFTBatch) -> torch.Tensor:
        """Sum of the learned tokens' losses of one micro-batch (float32 scalar), computed inside forward."""
        b = batch.to(device)
        kwargs = attention_kwargs(b.document_ids, use_flex=device.type == "cuda" and cfg.compile)
        with autocast:
            return model(b.inputs, head=lm_head(chunked_cross_entropy, b.targets, b.loss_mask, chunk=cfg.loss_chunk),
                         **kwargs)

    def evaluate(step: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if val:
            model.eval()  # LoRA dropout off
            with torch.no_grad():
                sums = torch.zeros(2)
                for b in val:
                    for mb in b.micro_batches(micro):
                        sums += torch.tensor([float(loss_of(mb)), float(mb.n_loss_tokens)])
            model.train()
            s, n = all_reduce_mean(sums).tolist()  # both scaled alike: the ratio is the global mean
            result["val_loss"] = s / max(n, 1.0)
            log.log("val", step, loss=result["val_loss"])
            log.print(f"step {step:>6}/{total} | val loss {result['val_loss']:.4f}")
        if prompts:
            replies = chat_replies(model, tokenizer, prompts, cfg.sample_tokens)
            eot = sum(r.ended_with_eot for r in replies)
            log.log("replies", step, ended_with_eot=eot / len(replies), replies=[r.to_dict() for r in replies])
            log.text("replies", step, "\n\n".join(r.format() for r in replies))
            log.print(f"step {step:>6}/{total} | {eot}/{len(replies)} held-out replies ended with <|eot_id|>:\n"
                      + "\n".join(r.format() for r in replies))
            result["replies"] = [r.to_dict() for r in replies]
        return result

    def save(step: int) -> None:
        path = resume.save(cfg, step, model, optimizer, {
            "total_steps": total, "loader": loader.state_dict(), "guard": guard.state_dict(),
            "model_args": args.to_dict(), "tokenizer_sha256": tokenizer.sha256, "data_sha256": fingerprint})
        log.log("checkpoint", step, path=str(path))

    summary: dict[str, Any] = {"start_step": start_step}
    if resume_from is None and cfg.eval_on_start:
        summary["start_eval"] = evaluate(0)
    fpt = flops_per_token(args, cfg.max_seq_len, frozen_weights=cfg.lora)
    step_times: list[float] = []
    tokens_seen = 0
    step = start_step
    while step < total:
        lr = cfg.lr_at(step, total)
        set_lr(optimizer, lr)
        t0 = time.perf_counter()
        batch = loader.next_batch(cfg.batch_size)
        # every rank divides by the global learned-token count / dp (see the module docstring)
        denominator = float(all_reduce_mean(torch.tensor(float(batch.n_loss_tokens))))
        hint = (f"a micro-batch of {micro} rows x {cfg.max_seq_len} positions at step {step + 1} is too large: lower "
                "--micro-batch-size (gradient accumulation keeps the global batch) or --max-seq-len, or turn on "
                "--activation-checkpointing (checkpoints already written are intact)")
        result = train_step(model, optimizer, batch.micro_batches(micro), loss_of, denominator=denominator,
                            grad_clip=cfg.grad_clip, guard=guard, oom_hint=hint)
        if result.skipped:
            log.log("skip", step + 1, loss=result.loss, grad_norm=result.grad_norm, reason=result.skipped,
                    rows=batch.rows)
            where = f"step {step + 1} (rows {batch.rows[:8]}{'...' if len(batch.rows) > 8 else ''})"
            if guard.must_stop():
                log.close()
                raise HerdError(f"{result.skipped} at {where}; lower --lr or raise --warmup-ratio, then resume "
                                "from the last checkpoint with --resume.")
            log.print(f"{where}: {result.skipped}, skipped")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        step += 1
        tokens = int(rows.row_lengths[batch.rows].sum())  # real tokens of the global batch (no padding)
        tokens_seen += tokens
        tok_s = tokens / dt
        mfu = tok_s * fpt / (peak * info.world_size) if peak else 0.0
        mfu, peak, peak_source, message = cap_mfu(mfu, peak, peak_source)
        if message:
            log.print(message)
        log.log("train", step, loss=result.loss, lr=lr, grad_norm=result.grad_norm, tokens_per_s=tok_s, mfu=mfu,
                step_s=dt, tokens=tokens, learned_tokens=int(round(denominator * dp_size)),
                memory_mb=memory_mb(device), epochs=loader.epochs())
        if step % cfg.log_every == 0 or step == total or step == start_step + 1:
            log.print(f"step {step:>6}/{total} | loss {result.loss:7.4f} | lr {lr:.2e} | gnorm {result.grad_norm:6.2f} | "
                      f"{tok_s:>9,.0f} tok/s | mfu {mfu:6.2%} | epoch {loader.epochs():5.2f} | "
                      f"mem {memory_mb(device):,.0f} MiB")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            evaluate(step)
        if cfg.stop_at and step == cfg.stop_at and step < total:
            save(step)
            log.print(f"stopped at step {step} as asked (--stop-at); continue with --resume")
            log.close()
            return {**summary, "stopped_at": step, "total_steps": total}
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            save(step)

    if step > start_step or resume_from is None:
        save(step)
    summary.update(steps=step, total_steps=total, tokens=tokens_seen,
                   tokens_per_s=tokens_seen / max(sum(step_times), 1e-9))
    summary.update(evaluate(step))
    summary.update(export_policy(model, args, out, init_from=cfg.init_from, export_format=cfg.export_format,
                                 tokenizer_path=tokenizer_path, lora=cfg.lora_config() if cfg.lora else None,
                                 merge=cfg.merge))
    log.print("wrote " + ", ".join(f"{k} {v}" for k, v in summary.items() if k in ("final", "adapter")))
    if is_main():
        log.close()
        summary["plot"] = str(plot_loss(out / "log.jsonl", out / "loss.png"))
    barrier()
    return summary


def _stored_tokenizer(init_from: str) -> str | None:
    from herd.checkpoint import find_tokenizer

    found = find_tokenizer(init_from)
    return str(found) if found is not None else None


def _micro_batch(cfg: SFTConfig, args: Any, device: torch.device, local_batch: int, shards: int) -> int:
    """Rows per forward/backward; HerdError when the local batch cannot split into it or clearly cannot fit."""
    micro = cfg.micro_batch_size or local_batch
    if local_batch % micro:
        raise HerdError(f"the per-rank batch of {local_batch} rows does not split into micro-batches of {micro}; "
                        "choose a --micro-batch-size that divides it.")
    n_params = args.num_params()
    trainable = None
    if cfg.lora:  # adapters are a fraction of a percent of the weights; count them generously
        trainable = n_params // 100
    need = estimate_bytes(args, micro, cfg.max_seq_len, n_params // shards, masked=cfg.packing,
                          n_trainable=None if trainable is None else trainable // shards)
    have = available_bytes(device)
    if need > have:
        raise HerdError(f"a micro-batch of {micro} x {cfg.max_seq_len} tokens of {cfg.init_from} needs about "
                        f"{need / 2**30:.1f} GiB but {device.type} has {have / 2**30:.1f} GiB free; lower "
                        "--micro-batch-size (gradient accumulation keeps the global batch) or --max-seq-len, or turn "
                        "on --activation-checkpointing.")
    return micro


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1) + "\n"
