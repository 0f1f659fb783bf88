"""The pre-training loop: one explicit loop from packed shards to a trained, exported model.

    setup: process group + ("dp", "tp") mesh -> shards + tokenizer checks -> model (built on the
           meta device, parallelized, materialized from the seed) -> AdamW -> resume
    step:  lr from the step -> this rank's slice of the global batch -> micro-batches (forward,
           loss / local tokens, backward) -> mean loss over ranks -> clip the global grad norm ->
           NaN / spike check (skip or stop) -> optimizer step -> log / eval / sample / checkpoint
    end:   checkpoint -> optional Polyak average of the last K -> export OUT/final -> loss.png

Loss normalization: every rank holds the same number of target tokens, each micro-batch adds
sum(token losses) / (tokens on this rank) to the gradient, and FSDP averages gradients over the
data-parallel ranks, so the gradient is that of the mean loss over every target token of the
global batch, exactly as one process computing the whole batch at once.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from herd.errors import HerdError
from herd.parallel import all_reduce_mean, barrier, build_mesh, build_model, init_distributed, is_main
from herd.train import state
from herd.train.artifacts import export_final, greedy_sample, special_ids
from herd.train.config import TrainConfig, parse_stages, stage_value
from herd.train.data import Batch, BatchLoader, validation_batches
from herd.train.loss import chunked_cross_entropy, lm_head
from herd.train.masks import attention_kwargs
from herd.train.metrics import MetricsLogger, cap_mfu, flops_per_token, memory_mb, peak_flops, plot_loss
from herd.train.optim import build_optimizer, schedule_from_config, set_lr
from herd.train.preflight import check_fits, init_weights, open_data, resolve_model
from herd.train.step import SpikeGuard, train_step
from herd.threads import apply_threads


def pretrain(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (final losses, throughput, paths). Rank 0 writes files."""
    cfg.validate()
    info = init_distributed()
    device = info.device if cfg.device == "auto" else torch.device(cfg.device)
    apply_threads(cfg.threads, device)  # 0: the fastest count under the current load (herd.threads)
    mesh = build_mesh(info, cfg.dp, cfg.tp)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    dp_size = mesh["dp"].size() if mesh is not None else 1
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    name = cfg.model_name()

    # Everything that can be wrong with the input is checked before anything is built or written.
    args = resolve_model(cfg)
    data = open_data(cfg, args)
    seq_stages, batch_ramp = parse_stages(cfg.seq_len_stages, ""), parse_stages(cfg.batch_ramp, "")
    max_seq = max([cfg.seq_len] + [v for _, v in seq_stages])
    max_batch = max([cfg.batch_size] + [v for _, v in batch_ramp])
    if max_seq > args.max_seq_len:
        raise HerdError(f"--seq-len {max_seq} is longer than {name}'s max_seq_len {args.max_seq_len}; "
                        "train shorter sequences, pick a larger preset or raise --max-seq-len.")
    micro = check_fits(cfg, args, device, max_batch // dp_size, max_seq)
    resume_from = state.latest_state(ckpt_root) if cfg.resume else None
    if not cfg.resume and state.latest_state(ckpt_root) is not None:
        raise HerdError(f"{ckpt_root} already holds checkpoints; pass --resume to continue that run or choose "
                        "a new --out (nothing was overwritten).")
    saved: dict[str, Any] = {}
    if resume_from is not None:
        saved = state.read_state_info(resume_from)
        state.check_compatible(saved, args, resume_from)
        if saved.get("tokenizer_sha256") and saved["tokenizer_sha256"] != data.tokenizer_sha256:
            raise HerdError(f"{resume_from} was trained on shards from another tokenizer; resume with the "
                            "--data it was trained on or start a new --out.")
    weights = init_weights(cfg, args, data) if resume_from is None else None  # a resume loads its own

    precision = "bf16" if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda") else "fp32"
    model = build_model(args, mesh, device, seed=cfg.seed, tp=cfg.tp, compile=cfg.compile,
                        activation_checkpointing=cfg.activation_checkpointing,
                        mixed_precision=precision if dp_size > 1 else "fp32", weights=weights)
    del weights
    model.train()
    optimizer = build_optimizer(model, cfg)
    loader = BatchLoader(data.train, seed=cfg.seed, dp_rank=dp_rank, dp_size=dp_size)
    start_step, total = 0, cfg.steps
    guard = SpikeGuard(cfg.spike_factor, cfg.nan_policy, cfg.max_skips)
    if resume_from is not None:
        saved = state.load_train_state(resume_from, model, optimizer)
        start_step, total = int(saved["step"]), int(saved["total_steps"])
        if cfg.steps != saved.get("config", {}).get("steps", cfg.steps):  # --steps overridden on resume
            total = cfg.steps
        loader.load_state_dict(saved["loader"])
        guard.load_state_dict(saved.get("guard", {}))
    # Log lines past the step we start from belong to a crashed attempt (after its last
    # checkpoint, or before any): drop them so log.jsonl is one consistent curve.
    log = MetricsLogger(out, enabled=is_main(), tensorboard=cfg.tensorboard, resume_step=start_step)
    if resume_from is not None:
        log.print(f"resuming {resume_from} at step {start_step} of {total}")
    n_params = args.num_params()
    peak, peak_source = peak_flops(device, cfg.peak_tflops)
    log.print(f"{name}: {n_params / 1e6:.2f}M parameters on {device} x {info.world_size} "
              f"(dp {dp_size}, tp {cfg.tp}), {precision}"
              f"{', from ' + cfg.init_from + ' weights' if cfg.init_from and resume_from is None else ''}; "
              f"train split {data.train.n_tokens:,} tokens; MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source})")
    log.log("config", start_step, **cfg.to_dict(), model_args=args.to_dict(), n_params=n_params,
            world_size=info.world_size, peak_flops=peak, peak_source=peak_source)

    val = (validation_batches(data.val, cfg.eval_batches, max_batch, cfg.seq_len, dp_rank, dp_size)
           if data.val is not None and cfg.eval_batches > 0 else [])
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def loss_of(batch: Batch) -> torch.Tensor:
        """Sum of the token losses of one micro-batch (float32 scalar), computed inside the model's forward."""
        inputs, targets = batch.inputs.to(device), batch.targets.to(device)
        # FlexAttention only pays off compiled (eager it materializes the scores); otherwise SDPA + bool mask
        kwargs = attention_kwargs(batch.document_ids.to(device), enabled=cfg.document_mask,
                                  use_flex=device.type == "cuda" and cfg.compile)
        with autocast:
            return model(inputs, head=lm_head(chunked_cross_entropy, targets, chunk=cfg.loss_chunk), **kwargs)

    def evaluate() -> float:
        with torch.no_grad():
            total_loss = sum(float(loss_of(mb)) for b in val for mb in b.micro_batches(micro or b.inputs.shape[0]))
            n = sum(b.targets.numel() for b in val)
        return float(all_reduce_mean(torch.tensor(total_loss / n)))

    def save(step: int) -> None:
        info_ = {"total_steps": total, "loader": loader.state_dict(), "guard": guard.state_dict(),
                 "config": cfg.to_dict(), "model_args": args.to_dict(), "tokenizer_sha256": data.tokenizer_sha256}
        path = state.save_train_state(ckpt_root, step, model, optimizer, info_, keep=cfg.keep_checkpoints)
        log.log("checkpoint", step, path=str(path))

    def sample(step: int) -> str:
        tok = data.tokenizer
        prompt = tok.encode(cfg.sample_prompt, bos=True)[-(args.max_seq_len - cfg.sample_tokens):]
        # A base model's sample ends where it would start another document (any special token).
        new = greedy_sample(model, prompt, cfg.sample_tokens, special_ids(tok), temperature=cfg.sample_temperature,
                            seed=cfg.seed)
        text = cfg.sample_prompt + tok.decode(new)
        log.log("sample", step, prompt=cfg.sample_prompt, text=text[len(cfg.sample_prompt):])
        log.text("sample", step, text)
        log.print(f"step {step:>6} | sample: {text!r}")
        return text

    t_start, step_times, tokens_seen = time.perf_counter(), [], 0
    summary: dict[str, Any] = {"start_step": start_step}
    step = start_step
    while step < total:
        lr = schedule_from_config(cfg, total)(step)
        set_lr(optimizer, lr)
        bsz, seq = stage_value(batch_ramp, step, cfg.batch_size), stage_value(seq_stages, step, cfg.seq_len)
        t0 = time.perf_counter()
        batch = loader.next_batch(bsz, seq)
        hint = (f"a micro-batch of {micro or batch.inputs.shape[0]} x {seq} tokens at step {step + 1} is too large: "
                "lower --micro-batch-size (gradient accumulation keeps the global batch) or --seq-len, or turn on "
                "--activation-checkpointing (checkpoints already written are intact)")
        result = train_step(model, optimizer, batch.micro_batches(micro or batch.inputs.shape[0]), loss_of,
                            denominator=batch.targets.numel(), grad_clip=cfg.grad_clip, guard=guard, oom_hint=hint)
        if result.skipped:
            log.log("skip", step + 1, loss=result.loss, grad_norm=result.grad_norm, reason=result.skipped,
                    batch=batch.indices)
            where = f"step {step + 1} (batch windows {batch.indices[:8]}{'...' if len(batch.indices) > 8 else ''})"
            if guard.must_stop():
                log.close()
                raise HerdError(f"{result.skipped} at {where}; lower --lr or raise --warmup-steps, then resume "
                                "from the last checkpoint with --resume.")
            log.print(f"{where}: {result.skipped}, skipped")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        step += 1
        tokens = bsz * seq
        tokens_seen += tokens
        tok_s = tokens / dt
        mfu = tok_s * flops_per_token(args, seq) / (peak * info.world_size) if peak else 0.0
        mfu, peak, peak_source, message = cap_mfu(mfu, peak, peak_source)
        if message:
            log.print(message)
        log.log("train", step, loss=result.loss, lr=lr, grad_norm=result.grad_norm, tokens_per_s=tok_s, mfu=mfu,
                step_s=dt, batch_size=bsz, seq_len=seq, memory_mb=memory_mb(device), epochs=loader.epochs(seq))
        if step % cfg.log_every == 0 or step == total or step == start_step + 1:
            log.print(f"step {step:>6}/{total} | loss {result.loss:7.4f} | lr {lr:.2e} | gnorm {result.grad_norm:6.2f} | "
                      f"{tok_s:>9,.0f} tok/s | mfu {mfu:6.2%} | mem {memory_mb(device):,.0f} MiB")
        total = _fit_time_budget(cfg, total, step, start_step, step_times, t_start, resume_from, log)
        if val and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            val_loss = evaluate()
            log.log("val", step, loss=val_loss)
            log.print(f"step {step:>6}/{total} | val loss {val_loss:.4f}")
        if cfg.sample_every and step % cfg.sample_every == 0 and step < total and data.tokenizer is not None:
            sample(step)
        if cfg.stop_at and step == cfg.stop_at and step < total:
            save(step)
            log.print(f"stopped at step {step} as asked (--stop-at); continue with --resume")
            log.close()
            return {**summary, "stopped_at": step, "total_steps": total}
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            save(step)

    wall = time.perf_counter() - t_start
    if step > start_step or resume_from is None:
        save(step)
    summary.update(steps=step, total_steps=total, wall_s=wall,
                   tokens_per_s=tokens_seen / max(sum(step_times), 1e-9), tokens=tokens_seen)
    if cfg.average_checkpoints > 1:
        group = state.state_dirs(ckpt_root)[-cfg.average_checkpoints:]
        state.average_states(group, model)
        log.print(f"averaged the weights of {len(group)} checkpoints: {', '.join(p.name for p in group)}")
        summary["averaged"] = [str(p) for p in group]
    if val:
        summary["val_loss"] = evaluate()
        log.log("val", step, loss=summary["val_loss"], averaged=cfg.average_checkpoints > 1)
        log.print(f"final val loss {summary['val_loss']:.4f}")
    if data.tokenizer is not None:
        summary["sample"] = sample(step)
    summary["final"] = str(export_final(model, args, out / "final", cfg.export_format, data.tokenizer_path))
    if is_main():
        log.close()
        summary["plot"] = str(plot_loss(out / "log.jsonl", out / "loss.png"))
    barrier()
    return summary


def _fit_time_budget(cfg: TrainConfig, total: int, step: int, start_step: int, step_times: list[float],
                     t_start: float, resumed: Any, log: MetricsLogger) -> int:
    """With --max-minutes, fix the step count from the measured step time: after 4 steps (the first
    is warm-up) and again after 24 (a machine whose load changed gets a better estimate while the
    learning rate is still near its peak, where moving the cosine horizon changes it least)."""
    done = step - start_step
    if cfg.max_minutes <= 0 or resumed is not None or done not in (4, 24):
        return total
    recent = step_times[1:] if done == 4 else step_times[4:]
    per_step = float(all_reduce_mean(torch.tensor(sum(recent) / len(recent))))
    evals = cfg.eval_batches / (3 * cfg.eval_every) if cfg.eval_every else 0.0  # eval forward ~ 1/3 of a step
    left = cfg.max_minutes * 60 - (time.perf_counter() - t_start)
    limit = cfg.steps if done == 24 else total
    new_total = max(step + 1, min(limit, step + int(left / (per_step * (1 + evals)))))
    if new_total != total:
        log.print(f"--max-minutes {cfg.max_minutes:g}: {per_step:.2f} s/step, so {new_total} steps in all")
    return new_total
