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
import math
import time
from pathlib import Path
from typing import Any

import torch

from herd.configs import get_preset
from herd.errors import HerdError
from herd.model import ModelArgs
from herd.parallel import all_reduce_mean, barrier, build_mesh, build_model, clip_grad_norm_, init_distributed, is_main
from herd.train import state as ckpt
from herd.train.config import TrainConfig, parse_stages, stage_value
from herd.train.data import Batch, BatchLoader, validation_batches
from herd.train.loss import cross_entropy_sum, linear_cross_entropy, output_weight
from herd.train.masks import attention_kwargs
from herd.train.metrics import MetricsLogger, flops_per_token, memory_mb, peak_flops, plot_loss
from herd.train.optim import build_optimizer, schedule_from_config, set_lr
from herd.train.preflight import check_fits, open_data
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

    # Everything that can be wrong with the input is checked before anything is built or written.
    args = get_preset(cfg.preset)
    data = open_data(cfg, args)
    seq_stages, batch_ramp = parse_stages(cfg.seq_len_stages, ""), parse_stages(cfg.batch_ramp, "")
    max_seq = max([cfg.seq_len] + [v for _, v in seq_stages])
    max_batch = max([cfg.batch_size] + [v for _, v in batch_ramp])
    if max_seq > args.max_seq_len:
        raise HerdError(f"--seq-len {max_seq} is longer than {cfg.preset}'s max_seq_len {args.max_seq_len}; "
                        "train shorter sequences or pick a larger preset.")
    micro = check_fits(cfg, args, device, max_batch // dp_size, max_seq)
    resume_from = ckpt.latest_state(ckpt_root) if cfg.resume else None
    if not cfg.resume and ckpt.latest_state(ckpt_root) is not None:
        raise HerdError(f"{ckpt_root} already holds checkpoints; pass --resume to continue that run or choose "
                        "a new --out (nothing was overwritten).")
    state: dict[str, Any] = {}
    if resume_from is not None:
        state = ckpt.read_state_info(resume_from)
        ckpt.check_compatible(state, args, resume_from)
        if state.get("tokenizer_sha256") and state["tokenizer_sha256"] != data.tokenizer_sha256:
            raise HerdError(f"{resume_from} was trained on shards from another tokenizer; resume with the "
                            "--data it was trained on or start a new --out.")

    precision = "bf16" if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda") else "fp32"
    model = build_model(args, mesh, device, seed=cfg.seed, tp=cfg.tp, compile=cfg.compile,
                        activation_checkpointing=cfg.activation_checkpointing,
                        mixed_precision=precision if dp_size > 1 else "fp32")
    model.train()
    optimizer = build_optimizer(model, cfg)
    loader = BatchLoader(data.train, seed=cfg.seed, dp_rank=dp_rank, dp_size=dp_size)
    start_step, total = 0, cfg.steps
    guard = SpikeGuard(cfg)
    if resume_from is not None:
        state = ckpt.load_train_state(resume_from, model, optimizer)
        start_step, total = int(state["step"]), int(state["total_steps"])
        if cfg.steps != state.get("config", {}).get("steps", cfg.steps):  # --steps overridden on resume
            total = cfg.steps
        loader.load_state_dict(state["loader"])
        guard.load_state_dict(state.get("guard", {}))
    # Log lines past the step we start from belong to a crashed attempt (after its last
    # checkpoint, or before any): drop them so log.jsonl is one consistent curve.
    log = MetricsLogger(out, enabled=is_main(), tensorboard=cfg.tensorboard, resume_step=start_step)
    if resume_from is not None:
        log.print(f"resuming {resume_from} at step {start_step} of {total}")
    n_params = args.num_params()
    peak, peak_source = peak_flops(device, cfg.peak_tflops)
    log.print(f"{cfg.preset}: {n_params / 1e6:.2f}M parameters on {device} x {info.world_size} "
              f"(dp {dp_size}, tp {cfg.tp}), {precision}; train split {data.train.n_tokens:,} tokens; "
              f"MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source})")
    log.log("config", start_step, **{k: v for k, v in cfg.to_dict().items()}, n_params=n_params,
            world_size=info.world_size, peak_flops=peak, peak_source=peak_source)

    val = (validation_batches(data.val, cfg.eval_batches, max_batch, cfg.seq_len, dp_rank, dp_size)
           if data.val is not None and cfg.eval_batches > 0 else [])
    use_plain = mesh is not None  # FSDP's hooks run on forward(), so sharded models take the logits path
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def loss_of(batch: Batch) -> torch.Tensor:
        """Sum of the token losses of one micro-batch (float32 scalar)."""
        inputs, targets = batch.inputs.to(device), batch.targets.to(device)
        # FlexAttention only pays off compiled (eager it materializes the scores); otherwise SDPA + bool mask
        kwargs = attention_kwargs(batch.document_ids.to(device), enabled=cfg.document_mask,
                                  use_flex=device.type == "cuda" and cfg.compile)
        with autocast:
            if use_plain:
                return cross_entropy_sum(model(inputs, **kwargs), targets)
            h = model.features(inputs, **kwargs)  # [B, S, dim]
            return linear_cross_entropy(h, output_weight(model), targets, cfg.loss_chunk)

    def evaluate() -> float:
        with torch.no_grad():
            total_loss = sum(float(loss_of(mb)) for b in val for mb in b.micro_batches(micro or b.inputs.shape[0]))
            n = sum(b.targets.numel() for b in val)
        return float(all_reduce_mean(torch.tensor(total_loss / n)))

    def train_state(step: int) -> dict[str, Any]:
        return {"total_steps": total, "loader": loader.state_dict(), "guard": guard.state_dict(),
                "config": cfg.to_dict(), "model_args": args.to_dict(), "tokenizer_sha256": data.tokenizer_sha256}

    def save(step: int) -> None:
        path = ckpt.save_train_state(ckpt_root, step, model, optimizer, train_state(step), keep=cfg.keep_checkpoints)
        log.log("checkpoint", step, path=str(path))

    t_start, step_times, tokens_seen = time.perf_counter(), [], 0
    summary: dict[str, Any] = {"start_step": start_step}
    step = start_step
    while step < total:
        lr = schedule_from_config(cfg, total)(step)
        set_lr(optimizer, lr)
        bsz, seq = stage_value(batch_ramp, step, cfg.batch_size), stage_value(seq_stages, step, cfg.seq_len)
        t0 = time.perf_counter()
        batch = loader.next_batch(bsz, seq)
        local_tokens = batch.targets.numel()
        loss_acc = torch.zeros((), device=device)
        try:
            for mb in batch.micro_batches(micro or batch.inputs.shape[0]):
                loss = loss_of(mb) / local_tokens
                loss.backward()
                loss_acc += loss.detach()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if "out of memory" not in str(e).lower() and "can't allocate memory" not in str(e).lower():
                raise
            raise HerdError(f"a micro-batch of {micro or batch.inputs.shape[0]} x {seq} tokens does not fit in "
                            f"{device.type} memory at step {step}; lower --micro-batch-size (gradient accumulation "
                            "keeps the global batch) or --seq-len, or turn on --activation-checkpointing "
                            "(checkpoints already written are intact).") from None
        loss_mean = float(all_reduce_mean(loss_acc))
        gnorm = float(clip_grad_norm_(model.parameters(), cfg.grad_clip))
        verdict = guard.check(loss_mean, gnorm)
        if verdict:
            optimizer.zero_grad(set_to_none=True)
            log.log("skip", step + 1, loss=loss_mean, grad_norm=gnorm, reason=verdict, batch=batch.indices)
            where = f"step {step + 1} (batch windows {batch.indices[:8]}{'...' if len(batch.indices) > 8 else ''})"
            if cfg.nan_policy == "stop" or guard.consecutive > cfg.max_skips:
                log.close()
                raise HerdError(f"{verdict} at {where}; lower --lr or raise --warmup-steps, then resume "
                                "from the last checkpoint with --resume.")
            log.print(f"step {step + 1}: {verdict}, skipped (batch windows {batch.indices[:8]})")
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        step += 1
        tokens = bsz * seq
        tokens_seen += tokens
        tok_s = tokens / dt
        mfu = tok_s * flops_per_token(args, seq) / (peak * info.world_size) if peak else 0.0
        if mfu > 1.0 and peak_source.startswith("measured"):  # the peak was measured while the cores were busy
            peak, peak_source, mfu = peak * mfu, peak_source + ", raised to the rate this run reached", 1.0
            log.print(f"MFU: the measured peak was low (a busy moment); now {peak / 1e12:.3g} TFLOP/s, the rate this run reached")
        log.log("train", step, loss=loss_mean, lr=lr, grad_norm=gnorm, tokens_per_s=tok_s, mfu=mfu,
                step_s=dt, batch_size=bsz, seq_len=seq, memory_mb=memory_mb(device),
                epochs=loader.epochs(seq))
        if step % cfg.log_every == 0 or step == total or step == start_step + 1:
            log.print(f"step {step:>6}/{total} | loss {loss_mean:7.4f} | lr {lr:.2e} | gnorm {gnorm:6.2f} | "
                      f"{tok_s:>9,.0f} tok/s | mfu {mfu:6.2%} | mem {memory_mb(device):,.0f} MiB")
        total = _fit_time_budget(cfg, total, step, start_step, step_times, t_start, resume_from, log)
        if val and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            val_loss = evaluate()
            log.log("val", step, loss=val_loss)
            log.print(f"step {step:>6}/{total} | val loss {val_loss:.4f}")
        if cfg.sample_every and step % cfg.sample_every == 0 and step < total and data.tokenizer is not None:
            _sample(model, data.tokenizer, cfg, args, device, log, step)
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
        group = ckpt.state_dirs(ckpt_root)[-cfg.average_checkpoints:]
        ckpt.average_states(group, model)
        log.print(f"averaged the weights of {len(group)} checkpoints: {', '.join(p.name for p in group)}")
        summary["averaged"] = [str(p) for p in group]
    if val:
        summary["val_loss"] = evaluate()
        log.log("val", step, loss=summary["val_loss"], averaged=cfg.average_checkpoints > 1)
        log.print(f"final val loss {summary['val_loss']:.4f}")
    if data.tokenizer is not None:
        summary["sample"] = _sample(model, data.tokenizer, cfg, args, device, log, step)
    summary["final"] = str(_export(model, args, cfg, data, out))
    if is_main():
        log.close()
        summary["plot"] = str(plot_loss(out / "log.jsonl", out / "loss.png"))
    barrier()
    return summary


class SpikeGuard:
    """Decides whether a step's loss / grad norm is bad: non-finite, or a spike over the running average."""

    def __init__(self, cfg: TrainConfig):
        self.factor, self.ema, self.seen, self.consecutive = cfg.spike_factor, 0.0, 0, 0

    def check(self, loss: float, gnorm: float) -> str:
        """'' for a good step (and update the average), else the reason the step is bad."""
        reason = ""
        if not math.isfinite(loss):
            reason = f"non-finite loss {loss}"
        elif not math.isfinite(gnorm):
            reason = f"non-finite gradient norm {gnorm}"
        elif self.factor > 0 and self.seen >= 10 and loss > self.factor * self.ema:
            reason = f"loss spike {loss:.4f} > {self.factor} x running average {self.ema:.4f}"
        if reason:
            self.consecutive += 1
            return reason
        self.consecutive = 0
        self.ema = loss if self.seen == 0 else 0.9 * self.ema + 0.1 * loss
        self.seen += 1
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "seen": self.seen, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema, self.seen = float(state.get("ema", 0.0)), int(state.get("seen", 0))
        self.consecutive = int(state.get("consecutive", 0))


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


@torch.no_grad()
def _sample(model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig, args: ModelArgs, device: torch.device,
            log: MetricsLogger, step: int) -> str:
    """Continuation of cfg.sample_prompt (greedy, or sampled at cfg.sample_temperature).

    One process: herd's inference Engine (KV cache). Sharded models: a plain full-forward loop
    that every rank runs in lock step (each forward needs all of them).
    """
    prompt = tokenizer.encode(cfg.sample_prompt, bos=True)[-(args.max_seq_len - cfg.sample_tokens):]
    # a base model learned <|end_of_text|><|begin_of_text|> between packed documents: any special
    # token ends the sample (none is ever printed as text)
    specials = getattr(tokenizer, "special_tokens", None)
    stop = sorted(specials.values()) if specials else [t for t in (getattr(tokenizer, "eos_id", None),) if t is not None]
    if not torch.distributed.is_initialized():
        from herd.inference.engine import Engine
        from herd.inference.sampling import SamplingParams

        engine = Engine(ckpt.unwrap(model), max_batch_size=1, max_seq_len=len(prompt) + cfg.sample_tokens)
        result = engine.generate([prompt], SamplingParams(temperature=cfg.sample_temperature, top_p=0.95,
                                                          seed=cfg.seed, max_new_tokens=cfg.sample_tokens,
                                                          stop_tokens=stop))[0]
        new = list(result.tokens)
        del engine
        model.train()  # the engine put the model in eval mode
    else:
        ids = list(prompt)
        for _ in range(cfg.sample_tokens):
            next_id = int(model(torch.tensor([ids], device=device), last_only=True)[0, -1].argmax())
            if next_id in stop:
                break
            ids.append(next_id)
        new = ids[len(prompt):]
    text = tokenizer.decode(new)
    log.log("sample", step, prompt=cfg.sample_prompt, text=text)
    log.text("sample", step, cfg.sample_prompt + text)
    log.print(f"step {step:>6} | sample: {cfg.sample_prompt + text!r}")
    return cfg.sample_prompt + text


def _export(model: torch.nn.Module, args: ModelArgs, cfg: TrainConfig, data: Any, out: Path) -> Path:
    """Write OUT/final in cfg.export_format with the tokenizer beside it (rank 0; a collective gather first)."""
    from herd.checkpoint import save_checkpoint

    plain = ckpt.full_model(model, args)
    final = out / "final"
    if plain is not None:
        save_checkpoint(plain, final, format=cfg.export_format, tokenizer_path=data.tokenizer_path, overwrite=True)
    barrier()
    return final
