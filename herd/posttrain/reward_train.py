"""The reward-model loop (`herd reward`): preference data and a checkpoint in, a reward model out.

    setup: process group + mesh -> tokenizer (the checkpoint's) -> preference data rendered, checked,
           split; report printed and saved -> the reward model (the --init-from body + a scalar head
           on the last token, herd.posttrain.reward.RewardModel; full or LoRA, the head always
           trains) -> AdamW over what trains -> resume
    step:  lr from the step -> this rank's examples of the global batch -> micro-batches (rewards
           of every response, Bradley-Terry over every ranked pair, backward) -> mean over the
           global batch's pairs -> clip -> NaN / spike check -> optimizer step -> log / eval / save
    eval:  held-out preference accuracy (chosen strictly above rejected) and mean reward margin
    end:   checkpoint -> eval -> OUT/final as transformers' LlamaForSequenceClassification
           (num_labels 1; LoRA adapters merged in float32) -> loss.png

The objective is Llama 2's (Touvron et al. 2023, §3.2.2) without the margin term, as Llama 3 §4.1.2
trains it: -log sigma(r_chosen - r_rejected). A ranked record (edited > chosen > rejected, Llama 3
§4.1.2) gives all three of its pairs. Responses are laid out as in herd.posttrain.pairs: "shared"
puts the prompt once per row with every response after it (Llama 3's "we concatenate the prompt
and multiple responses into a single row"), "concat" one row per response; both give the same
rewards (tests check it).

Loss normalization: the mean over every pair of the global batch, whatever the micro-batching and
data-parallel layout (each rank divides its sum by the global pair count / dp, FSDP averages).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from herd.errors import HerdError
from herd.fileio import atomic_write
from herd.model import ModelArgs
from herd.parallel import barrier, build_mesh, init_distributed, is_main
from herd.posttrain import resume
from herd.posttrain.config import FinetuneConfig
from herd.posttrain.dataset import load_tokenizer_for
from herd.posttrain.losses import bradley_terry_loss, pair_metrics, reward_pair_rewards
from herd.posttrain.pairs import LAYOUTS, PreferenceBatch, PreferenceBatchLoader, collate_preferences, eval_batches
from herd.posttrain.policy import load_policy, trainable_parameters
from herd.posttrain.preference_data import PreferenceDataConfig, PreferenceDataset, build_preference_data
from herd.posttrain.reward import RewardConfig, RewardModel, is_reward_model
from herd.threads import apply_threads
from herd.train.metrics import MetricsLogger, memory_mb, plot_loss
from herd.train.optim import build_optimizer, set_lr
from herd.train.step import SpikeGuard, train_step

HEAD_STD = 0.02
"""Std of the new score head (transformers' initializer_range, which its LlamaForSequenceClassification uses)."""


@dataclass
class RewardTrainConfig(FinetuneConfig, PreferenceDataConfig):
    """`herd reward`: train a reward model on preference pairs (every field is a flag)."""

    out: str = "runs/reward"
    """Run directory: checkpoints/, log.jsonl, data_report.json, loss.png and OUT/final (the reward model)."""
    layout: str = "shared"
    """Rows of a batch: shared (the prompt once, then every response; Llama 3 §4.1.2) or concat (a row per response)."""
    eval_examples: int = 0
    """Held-out examples per evaluation (rounded up to whole micro-batches); 0 = all of them."""

    def data_config(self) -> PreferenceDataConfig:
        return PreferenceDataConfig(**{f.name: getattr(self, f.name) for f in fields(PreferenceDataConfig)})

    def validate(self) -> None:
        FinetuneConfig.validate(self)
        self.data_config().validate()
        if self.layout not in LAYOUTS:
            raise HerdError(f"unknown --layout '{self.layout}'; use one of: {', '.join(LAYOUTS)}.")
        if self.eval_examples < 0:
            raise HerdError(f"--eval-examples must be >= 0, got {self.eval_examples}.")


def reward_args(init_from: str | Path) -> ModelArgs:
    """The architecture of --init-from: a chat/base checkpoint, or a reward model to train further."""
    from herd.checkpoint.common import read_json
    from herd.checkpoint.hf import args_from_config
    from herd.posttrain.policy import policy_args

    if is_reward_model(init_from):
        folder = Path(init_from)
        return args_from_config(read_json(folder / "config.json"), source=str(folder / "config.json"))
    return policy_args(init_from)


def reward_weights(init_from: str | Path, args: ModelArgs, seed: int) -> dict[str, Tensor]:
    """Every tensor the reward model starts from: a reward model's own, or the checkpoint's body (its
    vocabulary head left out) with a new head ~ Normal(0, HEAD_STD) drawn from `seed`."""
    if is_reward_model(init_from):
        from herd.posttrain.reward import load_reward_model

        return load_reward_model(init_from).state_dict()
    from herd.checkpoint import load_checkpoint

    state = {k: v for k, v in load_checkpoint(init_from).state_dict().items() if not k.startswith("output.")}
    g = torch.Generator().manual_seed(seed)
    state["score.weight"] = torch.randn(1, args.dim, generator=g) * HEAD_STD
    return state


def batch_rewards(model: torch.nn.Module, batch: PreferenceBatch) -> Tensor:
    """The reward of every response of a batch (float32 [n_responses]), read at its last token."""
    return model(batch.tokens, positions=batch.positions, mask=batch.mask, last=batch.last)


def pair_count(dataset: PreferenceDataset, indices: list[int]) -> int:
    """Preference pairs the examples give (a ranked triple three, a pair one)."""
    return sum(len(dataset.responses(i)) * (len(dataset.responses(i)) - 1) // 2 for i in indices)


def train_reward(cfg: RewardTrainConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (losses, held-out accuracy and margin, paths). Rank 0 writes files."""
    cfg.validate()
    info = init_distributed()
    device = info.device if cfg.device == "auto" else torch.device(cfg.device)
    apply_threads(cfg.threads, device)
    mesh = build_mesh(info, cfg.dp, cfg.tp)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    dp_size = mesh["dp"].size() if mesh is not None else 1
    out = Path(cfg.out)

    # Everything that can be wrong with the input is checked before anything is built or written.
    args = reward_args(cfg.init_from)
    if cfg.max_seq_len > args.max_seq_len:
        raise HerdError(f"--max-seq-len {cfg.max_seq_len} is longer than the model's context of {args.max_seq_len} "
                        "tokens; pass --max-seq-len <= that.")
    tokenizer = load_tokenizer_for(cfg.init_from, cfg.tokenizer or None, args.vocab_size)
    tokenizer_path = cfg.tokenizer or _stored_tokenizer(cfg.init_from)
    resume_from = resume.resume_point(cfg)
    saved = resume.check_resumable(resume_from, cfg, args, tokenizer_sha256=tokenizer.sha256)
    data = build_preference_data(cfg.data_config(), tokenizer, progress=is_main())
    fingerprint = data.train.fingerprint()
    resume.check_fingerprints(saved, resume_from, data_sha256=fingerprint)
    if len(data.train) == 0:
        raise HerdError(f"no preference pair is left to train on ({data.report.format().splitlines()[0]}); "
                        "check --data and --max-seq-len.")
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
    chat = RewardConfig(chat_style=cfg.chat_style, date_string=cfg.date_string, pad_id=tokenizer.pad_id)
    model = load_policy(cfg.init_from, args, mesh, device, lora=cfg.lora_config() if cfg.lora else None,
                        seed=cfg.seed, tp=cfg.tp, compile=cfg.compile,
                        activation_checkpointing=cfg.activation_checkpointing,
                        mixed_precision=precision if dp_size > 1 else "fp32",
                        weights=reward_weights(cfg.init_from, args, cfg.seed),
                        build=lambda a: RewardModel(a, chat), also_train=("score.",))
    model.train()
    torch.manual_seed(cfg.seed + info.rank)  # LoRA dropout masks: the same run twice (a resume restores the state)
    optimizer = build_optimizer(model, cfg)
    loader = PreferenceBatchLoader(data.train, seed=cfg.seed, layout=cfg.layout, pad_id=tokenizer.pad_id,
                                   dp_rank=dp_rank, dp_size=dp_size)
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
        atomic_write(out / "data_report.json", json.dumps(data.report.to_dict(), indent=1) + "\n")
    log.print(data.report.format())
    if resume_from is not None:
        log.print(f"resuming {resume_from} at step {start_step} of {total}")
    n_train = trainable_parameters(model)
    what = (f"LoRA rank {cfg.lora_rank} on {','.join(cfg.lora_targets)} + the score head" if cfg.lora
            else "full fine-tuning")
    log.print(f"reward model from {cfg.init_from}: {model.num_params() / 1e6:.2f}M parameters, {n_train / 1e6:.3g}M "
              f"trained ({what}) on {device} x {info.world_size} (dp {dp_size}, tp {cfg.tp}), {precision}; {total} "
              f"steps of {cfg.batch_size} examples ({cfg.layout} rows), peak lr {cfg.peak_lr:g}")
    log.log("config", start_step, **cfg.to_dict(), model_args=args.to_dict(), trainable_params=n_train,
            world_size=info.world_size, data_report=data.report.to_dict())

    val = eval_batches(data.val, micro, cfg.layout, tokenizer.pad_id) if len(data.val) else []
    if cfg.eval_examples:
        val = [b for b in val if int(b.example.min()) < cfg.eval_examples]  # eval_batches keeps dataset order
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def loss_of(batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum of the Bradley-Terry losses of a micro-batch's pairs, and accuracy / margin sums."""
        b = batch.to(device)
        with autocast:
            rewards = batch_rewards(model, b)
        chosen, rejected = reward_pair_rewards(rewards, b)
        return bradley_terry_loss(chosen, rejected).sum(), pair_metrics(chosen, rejected)

    def evaluate(step: int) -> dict[str, Any]:
        """Held-out accuracy, mean margin and loss over every pair of the validation split. Every rank runs
        every batch (under FSDP each forward is a collective, so all ranks must run the same ones)."""
        if not val:
            return {}
        model.eval()
        sums = torch.zeros(4)
        with torch.no_grad():
            for b in val:
                loss, m = loss_of(b)
                sums += torch.tensor([float(loss), float(m["accuracy"]), float(m["margin"]), float(b.n_pairs)])
        model.train()
        loss, acc, margin, n = sums.tolist()
        result = {"val_loss": loss / n, "val_accuracy": acc / n, "val_margin": margin / n, "val_pairs": int(n)}
        log.log("val", step, loss=result["val_loss"], accuracy=result["val_accuracy"], margin=result["val_margin"])
        log.print(f"step {step:>6}/{total} | val loss {result['val_loss']:.4f} | accuracy {result['val_accuracy']:.3f} "
                  f"| margin {result['val_margin']:+.4f} ({result['val_pairs']:,} held-out pairs)")
        return result

    def save(step: int) -> None:
        path = resume.save(cfg, step, model, optimizer, {
            "total_steps": total, "loader": loader.state_dict(), "guard": guard.state_dict(),
            "model_args": args.to_dict(), "tokenizer_sha256": tokenizer.sha256, "data_sha256": fingerprint})
        log.log("checkpoint", step, path=str(path))

    summary: dict[str, Any] = {"start_step": start_step}
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
        n_pairs = pair_count(data.train, indices)
        mine = indices[dp_rank * local:(dp_rank + 1) * local]
        micro_batches = (collate_preferences(data.train, mine[s:s + micro], cfg.layout, tokenizer.pad_id)
                         for s in range(0, local, micro))
        hint = (f"a micro-batch of {micro} examples at step {step + 1} is too large: lower --micro-batch-size "
                "(gradient accumulation keeps the global batch) or --max-seq-len, or turn on "
                "--activation-checkpointing (checkpoints already written are intact)")
        result = train_step(model, optimizer, micro_batches, loss_of, denominator=n_pairs / dp_size,
                            grad_clip=cfg.grad_clip, guard=guard, oom_hint=hint)
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
        pairs_seen += n_pairs
        acc = result.metrics.get("accuracy", 0.0)
        margin = result.metrics.get("margin", 0.0)
        log.log("train", step, loss=result.loss, lr=lr, grad_norm=result.grad_norm, accuracy=acc, margin=margin,
                pairs=n_pairs, pairs_per_s=n_pairs / dt, step_s=dt, memory_mb=memory_mb(device),
                epochs=loader.epoch + loader.cursor / len(data.train))
        if step % cfg.log_every == 0 or step == total or step == start_step + 1:
            log.print(f"step {step:>6}/{total} | loss {result.loss:7.4f} | acc {acc:5.3f} | margin {margin:+7.4f} | "
                      f"lr {lr:.2e} | gnorm {result.grad_norm:6.2f} | {n_pairs / dt:7.1f} pairs/s | "
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
    summary.update(steps=step, total_steps=total, pairs=pairs_seen,
                   pairs_per_s=pairs_seen / max(sum(step_times), 1e-9))
    summary.update(evaluate(step))
    summary["final"] = str(export_reward_model(model, args, out / "final", cfg, tokenizer_path, tokenizer.pad_id))
    log.print(f"wrote the reward model (LlamaForSequenceClassification) to {summary['final']}")
    if is_main():
        log.close()
        summary["plot"] = str(plot_loss(out / "log.jsonl", out / "loss.png"))
    barrier()
    return summary


def export_reward_model(model: torch.nn.Module, args: ModelArgs, path: Path, cfg: RewardTrainConfig,
                        tokenizer_path: str | None, pad_id: int) -> Path:
    """Write the trained reward model as transformers' LlamaForSequenceClassification (every rank calls;
    rank 0 writes). With LoRA the adapters are added to the --init-from weights in float32 (as `herd
    merge-lora` does), whatever dtype the base trained in."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from herd.posttrain.lora import load_lora_state_dict, merge_lora, target_modules, wrap_modules
    from herd.posttrain.reward import save_reward_model
    from herd.train.state import unwrap

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=cfg.lora)
    state = get_model_state_dict(unwrap(model), options=options)
    if is_main():
        chat = RewardConfig(chat_style=cfg.chat_style, date_string=cfg.date_string, pad_id=pad_id)
        with torch.device("meta"):
            rm = RewardModel(args, chat)
        if cfg.lora:
            full = reward_weights(cfg.init_from, args, cfg.seed)
            full["score.weight"] = state["score.weight"].float()
            rm.load_state_dict(full, assign=True, strict=True)
            wrap_modules(rm, target_modules(rm, cfg.lora_targets), cfg.lora_rank, cfg.lora_alpha,
                         rslora=cfg.lora_rslora)
            load_lora_state_dict(rm, {k: v.float() for k, v in state.items() if ".lora_" in k})
            merge_lora(rm)
        else:
            rm.load_state_dict({k: v.detach() for k, v in state.items()}, assign=True, strict=True)
        rm.reset_buffers()
        save_reward_model(rm, path, tokenizer_path=tokenizer_path, pad_id=pad_id, overwrite=True)
    barrier()
    return path


def _stored_tokenizer(init_from: str) -> str | None:
    from herd.checkpoint import find_tokenizer

    if is_reward_model(init_from):
        found = Path(init_from) / "tokenizer.model"
        return str(found) if found.is_file() else None
    found = find_tokenizer(init_from)
    return str(found) if found is not None else None
