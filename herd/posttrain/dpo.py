"""The DPO loop (`herd dpo`): preference pairs and a checkpoint in, a policy (or adapter) that prefers the chosen out.

    setup: process group + mesh -> tokenizer (the checkpoint's) -> preference data rendered, checked,
           split; report printed and saved -> the policy from --init-from (optional LoRA)
    cache: the reference's log-prob sums of every train and validation response, computed once,
           before the first step, into OUT/reference_logps (herd.posttrain.reference_cache):
           from the policy itself while it still is the reference (a fresh full fine-tune), from the
           policy with its adapters off (LoRA: the reference is the base), or from --reference
           loaded frozen for the pass and freed; so training holds one model, not two
    step:  lr from the step -> this rank's examples of the global batch -> micro-batches (policy
           token log-probs of the responses, DPO loss with the cached reference sums) -> clip ->
           NaN / spike check -> optimizer step -> log / eval / checkpoint
    eval:  over the held-out pairs: DPO loss, preference accuracy (implicit reward of chosen above
           rejected), reward and policy log-prob margins, chosen / rejected rewards, the NLL; and
           greedy replies to a few held-out prompts
    end:   checkpoint -> eval -> export (OUT/final, or OUT/adapter [+ merged OUT/final]) -> loss.png

The recipe, defaults and where they come from (Llama 3, arXiv:2407.21783, section 4.1.4): DPO with
beta 0.1 and learning rate 1e-5; formatting tokens (headers, <|eot_id|> / <|eom_id|>) masked out of
the chosen and rejected log-prob sums (--mask llama3); an NLL term on the chosen responses with
weight 0.2 (--nll-weight), a token-level mean. Every part is a flag (herd.posttrain.losses.DPOConfig):
--mask completion --nll-weight 0 is TRL DPOTrainer's plain sigmoid loss.

Normalization: the DPO term is the mean over the pairs of the global batch and the NLL term the mean
over the chosen tokens of the global batch, whatever the micro-batching and data-parallel layout:
each rank divides its sums by the global counts over the data-parallel size (known from the
dataset before the forward), and FSDP's gradient average completes the means.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from herd.errors import HerdError
from herd.fileio import atomic_write
from herd.parallel import barrier, build_mesh, init_distributed, is_main
from herd.posttrain import resume
from herd.posttrain.config import FinetuneConfig
from herd.posttrain.dataset import load_tokenizer_for
from herd.posttrain.export import export_policy
from herd.posttrain.lora import adapters_disabled
from herd.posttrain.losses import DPOConfig, dpo_objective
from herd.posttrain.pairs import LAYOUTS, PreferenceBatch, PreferenceBatchLoader, collate_preferences, response_logprobs
from herd.posttrain.policy import load_policy, policy_args, trainable_parameters
from herd.posttrain.preference_data import PreferenceDataConfig, PreferenceDataset, build_preference_data
from herd.posttrain.reference_cache import COLUMNS, ReferenceCache, reference_key, response_ids
from herd.posttrain.replies import HeldoutPrompt, _last_turn, chat_replies
from herd.threads import apply_threads
from herd.train.metrics import MetricsLogger, memory_mb, plot_loss
from herd.train.optim import build_optimizer, set_lr
from herd.train.step import SpikeGuard, train_step

METRICS = ("dpo_loss", "accuracy", "margin", "logp_margin", "rewards_chosen", "rewards_rejected", "nll")


@dataclass
class DPOTrainConfig(FinetuneConfig, PreferenceDataConfig, DPOConfig):
    """`herd dpo`: direct preference optimization on preference pairs (every field is a flag)."""

    out: str = "runs/dpo"
    """Run directory: checkpoints/, reference_logps/, log.jsonl, tensorboard/, data_report.json, loss.png and the export."""
    batch_size: int = 8
    """Global batch in preference examples (a pair, or a ranked triple giving three pairs) per optimizer step."""
    micro_batch_size: int = 0
    """Examples per forward/backward on one rank; 0 = the whole local batch (no accumulation)."""
    reference: str = ""
    """Reference model checkpoint; empty = --init-from (with LoRA: the base with the adapters off)."""
    layout: str = "concat"
    """Batch rows: concat (prompt + one response per row, TRL's) or shared (the prompt once, every response after it)."""
    reference_chunk: int = 64
    """Examples per file of the reference log-prob cache (a killed caching pass loses at most one)."""

    @property
    def reference_path(self) -> str:
        return self.reference or self.init_from

    def dpo_config(self) -> DPOConfig:
        return DPOConfig(**{f.name: getattr(self, f.name) for f in fields(DPOConfig)})

    def data_config(self) -> PreferenceDataConfig:
        return PreferenceDataConfig(**{f.name: getattr(self, f.name) for f in fields(PreferenceDataConfig)})

    def validate(self) -> None:
        FinetuneConfig.validate(self)
        self.data_config().validate()
        self.dpo_config().validate()
        if self.layout not in LAYOUTS:
            raise HerdError(f"unknown --layout '{self.layout}'; use one of: {', '.join(LAYOUTS)}.")
        if self.reference_chunk < 1:
            raise HerdError(f"--reference-chunk must be positive, got {self.reference_chunk}.")
        if self.reference and not Path(self.reference).exists():
            raise HerdError(f"--reference {self.reference} does not exist; pass a checkpoint folder, or leave it out "
                            "to use --init-from.")


def _counts(dataset: PreferenceDataset, mask: str) -> tuple[np.ndarray, np.ndarray]:
    """Per example: its pairs, and the tokens of its preferred responses (all but the last) under `mask`."""
    k = np.diff(dataset.first_response)
    pairs = k * (k - 1) // 2
    keep = ~dataset.response_formatting if mask == "llama3" else np.ones(len(dataset.response_tokens), dtype=bool)
    per_response = np.add.reduceat(keep.astype(np.int64), dataset.response_offsets[:-1]) \
        if len(dataset.response_tokens) else np.zeros(dataset.n_responses, np.int64)
    per_response = np.where(np.diff(dataset.response_offsets) > 0, per_response, 0)
    winners = per_response.copy()
    winners[dataset.first_response[1:] - 1] = 0  # the worst response of each example never wins a pair
    tokens = np.add.reduceat(winners, dataset.first_response[:-1])
    return pairs, tokens


def heldout_preference_prompts(dataset: PreferenceDataset, tokenizer: Any, n: int) -> list[HeldoutPrompt]:
    """The prompts of the first `n` held-out examples, with their best response as the reference reply."""
    out = []
    stops = {tokenizer.eot_id, tokenizer.eom_id, tokenizer.eos_id}
    for i in range(min(n, len(dataset))):
        ids = dataset.prompt(i).tolist()
        best, fmt = dataset.response(int(dataset.first_response[i]))
        text = tokenizer.decode([t for t, f in zip(best.tolist(), fmt.tolist()) if not f and t not in stops])
        out.append(HeldoutPrompt(ids, _last_turn(tokenizer, ids), text.strip()))
    return out


def dpo(cfg: DPOTrainConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (metrics, throughput, paths). Rank 0 writes files."""
    cfg.validate()
    info = init_distributed()
    device = info.device if cfg.device == "auto" else torch.device(cfg.device)
    apply_threads(cfg.threads, device)
    mesh = build_mesh(info, cfg.dp, cfg.tp)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    dp_size = mesh["dp"].size() if mesh is not None else 1
    out = Path(cfg.out)
    loss_cfg = cfg.dpo_config()

    args = policy_args(cfg.init_from)
    if cfg.max_seq_len > args.max_seq_len:
        raise HerdError(f"--max-seq-len {cfg.max_seq_len} is longer than the model's context of {args.max_seq_len} "
                        "tokens; pass --max-seq-len <= that.")
    if cfg.reference:
        ref_args = policy_args(cfg.reference)
        if (ref_args.vocab_size, ref_args.dim, ref_args.n_layers) != (args.vocab_size, args.dim, args.n_layers):
            raise HerdError(f"--reference {cfg.reference} is another architecture than --init-from {cfg.init_from}; "
                            "DPO compares log-probs of the same tokens: pass a reference of the policy's shape.")
    tokenizer = load_tokenizer_for(cfg.init_from, cfg.tokenizer or None, args.vocab_size)
    from herd.posttrain.sft import _stored_tokenizer

    tokenizer_path = cfg.tokenizer or _stored_tokenizer(cfg.init_from)
    resume_from = resume.resume_point(cfg)
    saved = resume.check_resumable(resume_from, cfg, args, tokenizer_sha256=tokenizer.sha256)
    data = build_preference_data(cfg.data_config(), tokenizer, progress=is_main())
    fingerprint = data.train.fingerprint()
    resume.check_fingerprints(saved, resume_from, data_sha256=fingerprint)
    if cfg.batch_size % dp_size:
        raise HerdError(f"--batch-size {cfg.batch_size} does not split over {dp_size} data-parallel ranks; use a "
                        f"multiple of {dp_size}.")
    local = cfg.batch_size // dp_size
    micro = cfg.micro_batch_size or local
    if local % micro:
        raise HerdError(f"the per-rank batch of {local} examples does not split into micro-batches of {micro}; "
                        "choose a --micro-batch-size that divides it.")
    total = int(saved.get("total_steps", 0)) or cfg.total_steps(len(data.train))

    precision = "bf16" if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda") else "fp32"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    lora = cfg.lora_config() if cfg.lora else None

    def build(path: str, trainable: bool) -> torch.nn.Module:
        return load_policy(path, args, mesh, device, lora=lora if trainable else None, trainable=trainable,
                           seed=cfg.seed, tp=cfg.tp, compile=cfg.compile and trainable,
                           activation_checkpointing=cfg.activation_checkpointing and trainable,
                           mixed_precision=precision if dp_size > 1 else "fp32")

    model = build(cfg.init_from, True)
    torch.manual_seed(cfg.seed + info.rank)  # LoRA dropout masks: the same run twice (a resume restores the state)
    # before any forward: FSDP2 leaves the root's parameters unsharded after a no_grad forward (the
    # reference pass below), and an optimizer built then would hold tensors that never get gradients
    optimizer = build_optimizer(model, cfg)
    log = MetricsLogger(out, enabled=is_main(), tensorboard=cfg.tensorboard,
                        resume_step=int(saved.get("step", 0)) if resume_from is not None else 0)
    if is_main():
        atomic_write(out / "data_report.json", json.dumps(data.report.to_dict(), indent=1) + "\n")
    log.print(data.report.format())

    # -- the reference log-probs, once, before training --------------------------------------------
    source = ("base with adapters off" if cfg.lora and not cfg.reference else "reference")
    key = reference_key({"train": data.train, "val": data.val}, cfg.reference_path, source=source, precision=precision,
                        lora_base_dtype=cfg.lora_base_dtype if cfg.lora and not cfg.reference else None)
    resume.check_fingerprints(saved, resume_from, reference_sha256=key)
    cache = ReferenceCache(out / "reference_logps", key, chunk=cfg.reference_chunk, write=is_main())
    cache.open()
    barrier()
    if cache.discarded:
        log.print(f"{cache.folder} held reference log-probs of other data or another reference; computing them again")
    splits = {"train": data.train, "val": data.val}
    ref_logps: dict[str, np.ndarray] = {}
    if loss_cfg.reference_free:  # no reference at all: nothing to compute (the sums are never read)
        ref_logps = {s: np.zeros((d.n_responses, len(COLUMNS))) for s, d in splits.items()}
    elif any(cache.missing(s, d) for s, d in splits.items()):
        if cfg.lora and not cfg.reference:
            ref_model, ctx, what = model, adapters_disabled, f"{cfg.init_from} (the base, adapters off)"
        elif resume_from is None and not cfg.reference:  # the policy has not stepped: it is the reference
            ref_model, ctx, what = model, None, f"{cfg.init_from} (the policy before its first step)"
        else:
            ref_model, ctx, what = build(cfg.reference_path, False), None, f"{cfg.reference_path} (loaded for the pass)"
        log.print(f"computing reference log-probs of {len(data.train) + len(data.val):,} examples from {what}")
        was_training = ref_model.training
        ref_model.eval()

        def ref_forward(batch: PreferenceBatch) -> Tensor:
            b = batch.to(device)
            with autocast, (ctx(ref_model) if ctx else contextlib.nullcontext()):
                return response_logprobs(ref_model, b, chunk=cfg.loss_chunk)

        for s, d in splits.items():
            ref_logps[s] = cache.compute(s, d, ref_forward, cfg.layout, tokenizer.pad_id, micro, progress=is_main(),
                                         dp_rank=dp_rank, dp_size=dp_size,
                                         dp_group=mesh["dp"].get_group() if mesh is not None else None)
        ref_model.train(was_training)
        if ref_model is not model:
            del ref_model  # training holds one model
    else:
        for s, d in splits.items():
            ref_logps[s] = cache.compute(s, d, None, cfg.layout, tokenizer.pad_id, micro, progress=False)
    column = COLUMNS.index(loss_cfg.mask)
    ref_tensors = {s: torch.from_numpy(v[:, column]).float() for s, v in ref_logps.items()}

    model.train()
    loader = PreferenceBatchLoader(data.train, seed=cfg.seed, layout=cfg.layout, pad_id=tokenizer.pad_id,
                                   dp_rank=dp_rank, dp_size=dp_size)
    guard = SpikeGuard(cfg.spike_factor, cfg.nan_policy, cfg.max_skips)
    start_step = 0
    if resume_from is not None:
        saved = resume.restore(resume_from, model, optimizer, cfg)
        start_step = int(saved["step"])
        if cfg.steps and cfg.steps != saved.get("config", {}).get("steps", cfg.steps):
            total = cfg.steps
        loader.load_state_dict(saved["loader"])
        guard.load_state_dict(saved.get("guard", {}))
        log.print(f"resuming {resume_from} at step {start_step} of {total}")
    n_train = trainable_parameters(model)
    what = f"LoRA rank {cfg.lora_rank} on {','.join(cfg.lora_targets)}" if cfg.lora else "full fine-tuning"
    log.print(f"{cfg.init_from}: {args.num_params() / 1e6:.2f}M parameters, {n_train / 1e6:.3g}M trained ({what}) on "
              f"{device} x {info.world_size} (dp {dp_size}, tp {cfg.tp}), {precision}; {total} steps of "
              f"{cfg.batch_size} examples, peak lr {cfg.peak_lr:g}, beta {cfg.beta:g}, {cfg.loss_type} loss, "
              f"mask {cfg.mask}, nll weight {cfg.nll_weight:g}")
    log.log("config", start_step, **cfg.to_dict(), model_args=args.to_dict(), trainable_params=n_train,
            world_size=info.world_size, data_report=data.report.to_dict(), reference_key=key)

    pairs_of, tokens_of = {}, {}
    for s, d in splits.items():
        pairs_of[s], tokens_of[s] = _counts(d, loss_cfg.mask)

    def objective(split: str, indices: list[int], pair_norm: float, token_norm: float) -> tuple[Tensor, dict[str, Tensor]]:
        d = splits[split]
        b = collate_preferences(d, indices, cfg.layout, tokenizer.pad_id).to(device)
        ref = None if loss_cfg.reference_free else ref_tensors[split][response_ids(d, indices)].to(device)
        with autocast:
            token_lp = response_logprobs(model, b, chunk=cfg.loss_chunk)
        loss, m = dpo_objective(token_lp.float(), ref, b, loss_cfg, pair_norm=pair_norm, token_norm=token_norm)
        m["logp_margin"] = m.pop("logps_chosen") - m.pop("logps_rejected")
        m.pop("nll_tokens")
        m["nll"] = m.pop("nll_sum") / token_norm
        for k in ("dpo_loss", "accuracy", "margin", "logp_margin", "rewards_chosen", "rewards_rejected"):
            m[k] = m[k] / pair_norm
        return loss, m

    def evaluate(step: int) -> dict[str, float]:
        if not len(data.val):
            return {}
        n_pairs, n_tokens = float(pairs_of["val"].sum()), float(max(tokens_of["val"].sum(), 1))
        sums = {k: 0.0 for k in METRICS}
        model.eval()
        with torch.no_grad():
            for s in range(0, len(data.val), micro):
                idx = list(range(s, min(s + micro, len(data.val))))
                _, m = objective("val", idx, n_pairs, n_tokens)
                for k in METRICS:
                    sums[k] += float(m[k])
        model.train()
        sums["loss"] = sums["dpo_loss"] + loss_cfg.nll_weight * sums["nll"]  # the objective training minimizes
        result = {f"val_{k}": v for k, v in sums.items()}
        log.log("val", step, **sums)
        log.print(f"step {step:>6}/{total} | val dpo loss {sums['dpo_loss']:.4f} | accuracy {sums['accuracy']:.1%} | "
                  f"reward margin {sums['margin']:+.4f} | log-prob margin {sums['logp_margin']:+.3f} | "
                  f"chosen {sums['rewards_chosen']:+.4f} rejected {sums['rewards_rejected']:+.4f} | nll {sums['nll']:.4f}")
        if prompts:
            replies = chat_replies(model, tokenizer, prompts, cfg.sample_tokens)
            log.log("replies", step, replies=[r.to_dict() for r in replies])
            log.print(f"step {step:>6}/{total} | held-out replies:\n" + "\n".join(r.format() for r in replies))
            result["replies"] = [r.to_dict() for r in replies]
        return result

    def save(step: int) -> None:
        path = resume.save(cfg, step, model, optimizer, {
            "total_steps": total, "loader": loader.state_dict(), "guard": guard.state_dict(),
            "model_args": args.to_dict(), "tokenizer_sha256": tokenizer.sha256, "data_sha256": fingerprint,
            "reference_sha256": key})
        log.log("checkpoint", step, path=str(path))

    prompts = heldout_preference_prompts(data.val, tokenizer, cfg.sample_prompts)
    summary: dict[str, Any] = {"start_step": start_step, "reference_key": key}
    if resume_from is None and cfg.eval_on_start:
        summary["start_eval"] = evaluate(0)
    step_times: list[float] = []
    pairs_seen = 0
    step = start_step
    while step < total:
        lr = cfg.lr_at(step, total)
        set_lr(optimizer, lr)
        t0 = time.perf_counter()
        indices = loader.global_indices(cfg.batch_size)
        pair_norm = float(pairs_of["train"][indices].sum()) / dp_size
        token_norm = max(float(tokens_of["train"][indices].sum()), 1.0) / dp_size
        mine = indices[dp_rank * local:(dp_rank + 1) * local]
        chunks = [mine[s:s + micro] for s in range(0, local, micro)]
        hint = (f"a micro-batch of {micro} examples at step {step + 1} is too large: lower --micro-batch-size "
                "(gradient accumulation keeps the global batch) or --max-seq-len, or turn on --activation-checkpointing")
        result = train_step(model, optimizer, chunks, lambda c: objective("train", c, pair_norm, token_norm),
                            denominator=1.0, grad_clip=cfg.grad_clip, guard=guard, oom_hint=hint)
        if result.skipped:
            log.log("skip", step + 1, loss=result.loss, grad_norm=result.grad_norm, reason=result.skipped,
                    examples=indices)
            where = f"step {step + 1} (examples {indices[:8]}{'...' if len(indices) > 8 else ''})"
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
        n_pairs = int(round(pair_norm * dp_size))
        pairs_seen += n_pairs
        m = result.metrics
        log.log("train", step, loss=result.loss, lr=lr, grad_norm=result.grad_norm, step_s=dt, pairs=n_pairs,
                pairs_per_s=n_pairs / dt, memory_mb=memory_mb(device), epochs=loader.epoch + loader.cursor / len(data.train),
                **{k: m.get(k, 0.0) for k in METRICS})
        if step % cfg.log_every == 0 or step == total or step == start_step + 1:
            log.print(f"step {step:>6}/{total} | loss {result.loss:7.4f} | dpo {m.get('dpo_loss', 0):.4f} | "
                      f"acc {m.get('accuracy', 0):5.1%} | margin {m.get('margin', 0):+.4f} | lr {lr:.2e} | "
                      f"gnorm {result.grad_norm:6.2f} | {n_pairs / dt:7.2f} pairs/s | mem {memory_mb(device):,.0f} MiB")
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
    summary.update(steps=step, total_steps=total, pairs=pairs_seen,
                   pairs_per_s=pairs_seen / max(sum(step_times), 1e-9))
    summary.update(evaluate(step))
    summary.update(export_policy(model, args, out, init_from=cfg.init_from, export_format=cfg.export_format,
                                 tokenizer_path=tokenizer_path, lora=lora, merge=cfg.merge))
    log.print("wrote " + ", ".join(f"{k} {v}" for k, v in summary.items() if k in ("final", "adapter")))
    if is_main():
        log.close()
        summary["plot"] = str(plot_loss(out / "log.jsonl", out / "loss.png"))
    barrier()
    return summary
