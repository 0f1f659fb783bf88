"""Rejection sampling (`herd rejection-sample`): for each prompt, K replies from the policy, scored by a
reward model or a Python reward function; the best one becomes SFT data.

    prompts file (jsonl / json / parquet) -> per chunk of prompts:
        K samples per prompt through herd's inference Engine, the prompt's prefill computed once
        and shared by the K (Engine.add_forked_request: one forward over the prompt, then K
        independently seeded samplers) -> each reply scored -> the best reply per prompt appended
        to OUT as {"messages": prompt + [best reply]} (the format `herd sft` reads), then the
        progress file committed -> stats

Llama 3 §4.2.2 ("Rejection sampling"): "For each prompt collected during human annotation we sample
K (typically between 10 and 30) outputs from the latest chat model policy ... and use our reward
model to select the best candidate"; the paper also shares the prompt's KV cache between the
samples (PagedAttention), which is what the shared prefill does here.

Sample k of prompt i is drawn with its own seed (sample_seed(seed, i, k)), so a run, a resumed run
and a run with --no-shared-prefill give the same replies. A reply that reached --max-new-tokens
without ending its turn is not scored (it would teach the model to stop mid-sentence) unless
--keep-truncated.

Resuming: OUT grows one whole chunk at a time (one write), and OUT.progress.json, written
atomically after it, records how many prompts and bytes are done; a killed run restarted with
--resume cuts OUT back to the recorded size and continues with the next prompt, so no prompt is
lost or written twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from herd.errors import HerdError
from herd.fileio import atomic_write
from herd.tokenizer.chat import DEFAULT_DATE

SKIP_REASONS = {
    "bad_record": "records that are not prompts ({'messages': [...]} or {'prompt': ...})",
    "prompt_too_long": "prompt + --max-new-tokens longer than the context",
    "unscored": "prompts none of whose replies got a reward",
}


@dataclass
class RejectionConfig:
    """`herd rejection-sample`: best-of-K replies per prompt as SFT data (every field is a flag)."""

    policy: str = ""
    """Checkpoint to sample from (herd, Hugging Face or Meta folder); required."""
    prompts: list[str] = field(default_factory=list)
    """Prompt files or folders (jsonl(.gz/.zst), json, parquet): {"messages": [...]} (a final assistant turn is dropped) or {"prompt": str | messages}."""
    out: str = ""
    """The jsonl to write ({"messages": prompt + best reply, "reward", "rewards", "best"} per prompt); OUT.progress.json beside it."""
    reward_model: str = ""
    """Reward model folder (`herd reward`'s, or transformers' LlamaForSequenceClassification); its tokenizer must be the policy's."""
    reward_fn: str = ""
    """Python reward instead of a model: MODULE:FUNCTION or FILE.py:FUNCTION, called as fn(prompt_messages, reply) -> float."""
    k: int = 8
    """Samples per prompt (Llama 3: typically 10 to 30)."""
    temperature: float = 0.6
    """Sampling temperature (0.6 and top-p 0.9: the defaults of Meta's llama3 generation code)."""
    top_p: float = 0.9
    """Nucleus sampling threshold."""
    max_new_tokens: int = 256
    """Longest reply in tokens."""
    keep_truncated: bool = False
    """Also score replies that hit --max-new-tokens before ending their turn."""
    pairs: bool = False
    """Also write each prompt as an on-policy preference pair: "prompt", "chosen" (the best reply) and "rejected"
    (the worst-scored one, when it scores lower), so OUT is also data for herd dpo / herd reward (Llama 3 §4.2.1)."""
    seed: int = 0
    """Seed of the samplers: sample k of prompt i always gets the same seed."""
    shared_prefill: bool = True
    """Compute each prompt's prefill once for its K samples (off: K separate requests, for comparison)."""
    chunk: int = 64
    """Prompts per written chunk (the unit of resuming)."""
    batch_size: int = 32
    """Requests decoding at once in the engine (at least K)."""
    score_batch_size: int = 16
    """Sequences per reward-model forward."""
    chat_style: str = "hf"
    """Chat format of the prompts: hf (Llama 3.1 Instruct's template) or meta (Meta's plain dialog format)."""
    date_string: str = DEFAULT_DATE
    """'Today Date' of the hf chat style's system header."""
    tokenizer: str = ""
    """tokenizer.model of the policy; empty = the one beside --policy."""
    dtype: str = ""
    """Weights dtype for sampling and scoring: fp32, bf16 or fp16; empty = the checkpoint's."""
    device: str = "auto"
    """cpu, cuda, or auto (the GPU when there is one)."""
    threads: int = 0
    """CPU threads for torch ops; 0 = pick the fastest count for the machine's current load (herd.threads)."""
    resume: bool = False
    """Continue the run whose OUT.progress.json is beside OUT."""
    limit: int = 0
    """Stop after this many prompts of the file (0 = all)."""

    def validate(self) -> None:
        if not self.policy:
            raise HerdError("no policy to sample from; pass --policy with a herd, Hugging Face or Meta checkpoint.")
        if not self.prompts:
            raise HerdError("no prompts given; pass --prompts with jsonl/json/parquet files of prompt records.")
        if not self.out:
            raise HerdError("no output file; pass --out PATH.jsonl.")
        if bool(self.reward_model) == bool(self.reward_fn):
            raise HerdError("pass exactly one of --reward-model (a reward model folder) and --reward-fn "
                            "(MODULE:FUNCTION or FILE.py:FUNCTION).")
        if self.k < 1 or self.chunk < 1 or self.batch_size < 1 or self.score_batch_size < 1 or self.limit < 0:
            raise HerdError("--k, --chunk, --batch-size and --score-batch-size must be positive, --limit >= 0.")
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise HerdError("--max-new-tokens must be positive, --temperature >= 0 and --top-p in (0, 1].")
        if self.chat_style not in ("hf", "meta"):
            raise HerdError(f"unknown --chat-style '{self.chat_style}'; use hf or meta.")
        if self.dtype not in ("", "fp32", "bf16", "fp16"):
            raise HerdError(f"unknown --dtype '{self.dtype}'; use fp32, bf16 or fp16.")

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (the rest, e.g. --chunk, may change)."""
        keys = ("policy", "prompts", "reward_model", "reward_fn", "k", "temperature", "top_p", "max_new_tokens",
                "keep_truncated", "pairs", "seed", "chat_style", "date_string", "dtype")
        return {k: getattr(self, k) for k in keys}


def sample_seed(seed: int, prompt_index: int, k: int) -> int:
    """The sampler seed of sample k of prompt `prompt_index` (a hash: no two samples share one)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative int64


@dataclass
class Stats:
    """Running totals of a rejection-sampling run (saved with its progress, so a resume keeps them)."""

    prompts_done: int = 0
    """Prompt records read and handled (written or skipped)."""
    written: int = 0
    """Prompts whose best reply was written."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Prompts not written, by reason (SKIP_REASONS)."""
    samples: int = 0
    """Replies generated."""
    scored: int = 0
    """Replies that got a reward."""
    truncated: int = 0
    """Replies that hit --max-new-tokens (not scored unless --keep-truncated)."""
    score_errors: dict[str, int] = field(default_factory=dict)
    """Replies the reward could not score, by kind (a raising reward function, too long for the reward model)."""
    prompts_with_errors: int = 0
    """Prompts with at least one reply the reward could not score."""
    reward_sum: float = 0.0
    best_sum: float = 0.0
    best_max: float = -math.inf
    first_sum: float = 0.0
    first_count: int = 0
    best_differs: int = 0
    """Written prompts whose best reply is not the first sample."""
    generated_tokens: int = 0
    prompt_tokens: int = 0
    """Prompt tokens of the prompts sampled (each counted once)."""
    prefill_tokens: int = 0
    """Prompt tokens the engine ran through the model: prompt_tokens for one prefill per prompt, K times
    that for K separate prefills (less where the prefix cache already held a prompt's beginning)."""
    generate_s: float = 0.0
    score_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The reported numbers (means over written prompts unless said otherwise)."""
        w = max(self.written, 1)
        return {
            "prompts_done": self.prompts_done, "written": self.written, "skipped": dict(self.skipped),
            "samples": self.samples, "scored": self.scored, "truncated": self.truncated,
            "score_errors": dict(self.score_errors), "prompts_with_errors": self.prompts_with_errors,
            "mean_reward": self.reward_sum / self.scored if self.scored else None,
            "mean_best_reward": self.best_sum / w if self.written else None,
            "max_reward": self.best_max if self.written else None,
            "mean_first_reward": self.first_sum / self.first_count if self.first_count else None,
            "best_differs_from_first": self.best_differs / w if self.written else None,
            "prompt_tokens": self.prompt_tokens, "prefill_tokens": self.prefill_tokens,
            "prefills_per_prompt": self.prefill_tokens / self.prompt_tokens if self.prompt_tokens else None,
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": self.generated_tokens / self.generate_s if self.generate_s else None,
            "samples_per_s": self.samples / self.generate_s if self.generate_s else None,
            "generate_s": self.generate_s, "score_s": self.score_s,
        }

    def format(self) -> str:
        s = self.summary()

        def f(v: Any) -> str:
            return "-" if v is None else f"{v:.4f}"

        line = (f"{s['prompts_done']:,} prompts: {s['written']:,} written; best of {s['samples']:,} samples: mean reward "
                f"{f(s['mean_reward'])}, mean best {f(s['mean_best_reward'])}, max {f(s['max_reward'])}, mean first "
                f"sample {f(s['mean_first_reward'])}, best differs from first {f(s['best_differs_from_first'])}; "
                f"{s['tokens_per_s'] or 0:,.1f} tok/s, {s['samples_per_s'] or 0:,.2f} samples/s; prefill computed "
                f"{s['prefill_tokens']:,} tokens for {s['prompt_tokens']:,} prompt tokens "
                f"({s['prefills_per_prompt'] or 0:.2f} prefills per prompt)")
        if self.skipped:
            line += "; skipped " + ", ".join(f"{n:,} {r}" for r, n in sorted(self.skipped.items()))
        if self.truncated:
            line += f"; {self.truncated:,} replies truncated at --max-new-tokens"
        if self.score_errors:
            line += (f"; {sum(self.score_errors.values()):,} replies not scored on {self.prompts_with_errors:,} prompts ("
                     + ", ".join(f"{k}={n}" for k, n in sorted(self.score_errors.items())) + ")")
        return line


def sample_chunk(engine: Any, prompts: list[list[int]], indices: list[int], cfg: RejectionConfig,
                 stop_tokens: list[int], on_prompt_done: Callable[[], None] = lambda: None) -> list[list[Any]]:
    """K GenerationResults per prompt, sample k of prompt i drawn with sample_seed(cfg.seed, indices[i], k).

    shared_prefill: each prompt is one fork group (one prefill, K samplers); else K requests of its own.
    """
    from herd.inference.engine import GenerationResult
    from herd.inference.sampling import SamplingParams

    owner: dict[int, tuple[int, int]] = {}
    for i, (ids, index) in enumerate(zip(prompts, indices)):
        plist = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                seed=sample_seed(cfg.seed, index, k), stop_tokens=stop_tokens) for k in range(cfg.k)]
        rids = (engine.add_forked_request(ids, plist) if cfg.shared_prefill
                else [engine.add_request(ids, p) for p in plist])
        owner.update({rid: (i, k) for k, rid in enumerate(rids)})
    tokens: list[list[list[int]]] = [[[] for _ in range(cfg.k)] for _ in prompts]
    results: list[list[Any]] = [[None] * cfg.k for _ in prompts]
    left = [cfg.k] * len(prompts)
    try:
        while engine.has_work():
            for e in engine.step():
                i, k = owner[e.index]
                if e.finish_reason != "stop":
                    tokens[i][k].append(e.token)
                if e.finish_reason is not None:
                    results[i][k] = GenerationResult(tokens=tokens[i][k], logprobs=None, finish_reason=e.finish_reason,
                                                     stop_token=e.token if e.finish_reason == "stop" else None,
                                                     prompt_tokens=len(prompts[i]))
                    left[i] -= 1
                    if left[i] == 0:
                        on_prompt_done()
    finally:  # an interrupted chunk must not leave requests holding the KV cache
        for rid in owner:
            engine.abort(rid)
    return results


class Scorer:
    """Rewards of (prompt messages, reply) pairs from a reward model or a reward function; None = not scored."""

    def __init__(self, cfg: RejectionConfig, policy_tokenizer: str | None, policy_sha256: str,
                 device: torch.device) -> None:
        self.errors: dict[str, int] = {}
        self.fn = self.model = None
        if cfg.reward_fn:
            from herd.posttrain.reward_fn import RewardFunction

            self.fn = RewardFunction(cfg.reward_fn)
        else:
            from herd.posttrain.reward import load_reward_scorer

            if not Path(cfg.reward_model).exists():
                raise HerdError(f"--reward-model {cfg.reward_model} does not exist; pass the folder `herd reward` wrote.")
            own = Path(cfg.reward_model) / "tokenizer.model"
            if own.is_file():
                from herd.tokenizer import Tokenizer

                a, b = Tokenizer.from_file(own).sha256, policy_sha256
                if a != b:
                    raise HerdError(f"the reward model's tokenizer differs from the policy's (sha256 {a[:12]}... vs "
                                    f"{b[:12]}...), so it would score ids it learned for other text; use a reward "
                                    "model trained from this policy's tokenizer.")
            self.model = load_reward_scorer(cfg.reward_model, policy_tokenizer, cfg.dtype or None, device,
                                            cfg.score_batch_size)

    def __call__(self, items: list[tuple[list[dict[str, Any]], str]]) -> list[tuple[float | None, str | None]]:
        """(reward, None) or (None, error kind) per item."""
        if self.fn is not None:
            out = []
            for messages, reply in items:
                before = dict(self.fn.errors)
                r = self.fn([dict(m) for m in messages], reply)  # copies: the function cannot change the prompt
                kind = None if r is not None else next(
                    (k for k, n in self.fn.errors.items() if n != before.get(k, 0)), "error")
                out.append((r, kind))
            return out
        rewards = self.model.score_conversations([m + [{"role": "assistant", "content": r}] for m, r in items])
        return [(r, None if r is not None else "too_long_for_reward_model") for r in rewards]

    def first_error(self) -> str:
        return self.fn.report() if self.fn is not None else ""


def progress_path(out: str | os.PathLike) -> Path:
    return Path(f"{out}.progress.json")


def _start(cfg: RejectionConfig) -> Stats:
    """The Stats to continue from (fresh, or OUT.progress.json's with OUT cut back to its size)."""
    out, prog = Path(cfg.out), progress_path(cfg.out)
    if not cfg.resume:
        if out.exists() or prog.exists():
            raise HerdError(f"{out if out.exists() else prog} already exists; pass --resume to continue that run or "
                            "choose a new --out (nothing was overwritten).")
        return Stats()
    if not prog.exists():
        if out.exists() and out.stat().st_size:
            raise HerdError(f"{out} exists but {prog} does not, so where it stopped is unknown; move it away or "
                            "choose a new --out.")
        return Stats()
    saved = json.loads(prog.read_text())
    if saved.get("config") != cfg.fingerprint():
        old = saved.get("config", {})
        diff = [k for k in cfg.fingerprint() if old.get(k) != getattr(cfg, k)]
        raise HerdError(f"{prog} was written with other settings ({', '.join('--' + d.replace('_', '-') for d in diff)}"
                        "); resume with the same ones, or choose a new --out.")
    size = int(saved["bytes"])
    if not out.exists() or out.stat().st_size < size:
        raise HerdError(f"{out} is shorter than {prog} records ({size:,} bytes); it was changed after the run; "
                        "choose a new --out.")
    with open(out, "r+b") as f:  # drop a chunk appended after the last committed progress
        f.truncate(size)
    stats = Stats(**{k: v for k, v in saved["stats"].items() if k in Stats.__dataclass_fields__})
    return stats


def _commit(cfg: RejectionConfig, stats: Stats, lines: list[str]) -> None:
    """Append a chunk's lines in one write, then record the progress (the commit point)."""
    out = Path(cfg.out)
    data = "".join(line + "\n" for line in lines).encode()
    with open(out, "ab") as f:
        if data:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    stats_dict = asdict(stats)
    if not math.isfinite(stats_dict["best_max"]):
        stats_dict["best_max"] = -1e308
    atomic_write(progress_path(out), json.dumps({"config": cfg.fingerprint(), "bytes": size, "stats": stats_dict},
                                                indent=1) + "\n")


def rejection_sample(cfg: RejectionConfig) -> dict[str, Any]:
    """Run as configured; returns the stats (Stats.summary()) and the output path."""
    from herd.checkpoint import find_tokenizer, load_checkpoint
    from herd.checkpoint.common import parse_dtype
    from herd.inference.engine import Engine
    from herd.posttrain.dataset import load_tokenizer_for
    from herd.posttrain.policy import policy_args
    from herd.posttrain.prompts import prompt_messages
    from herd.posttrain.records import data_files, iter_records
    from herd.posttrain.render import RecordError
    from herd.posttrain.report import DataReport
    from herd.threads import apply_threads
    from herd.tokenizer.chat import ChatFormat

    cfg.validate()
    report = DataReport()  # malformed lines and unreadable files of the prompt files
    files = data_files(cfg.prompts, report)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    apply_threads(cfg.threads, device)
    args = policy_args(cfg.policy)
    tokenizer = load_tokenizer_for(cfg.policy, cfg.tokenizer or None, args.vocab_size)
    tokenizer_path = cfg.tokenizer or find_tokenizer(cfg.policy)
    scorer = Scorer(cfg, tokenizer_path, tokenizer.sha256, device)  # refuses a reward model with another tokenizer, before sampling
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    stats = _start(cfg)
    chat = ChatFormat(tokenizer, style=cfg.chat_style, date_string=cfg.date_string)
    model = load_checkpoint(cfg.policy, device=device, dtype=parse_dtype(cfg.dtype or None)).eval()
    engine = Engine(model, max_batch_size=max(cfg.batch_size, cfg.k))
    stop = sorted(tokenizer.stop_tokens)
    print(f"sampling {cfg.k} replies per prompt from {cfg.policy} ({'one shared prefill' if cfg.shared_prefill else 'K prefills'}"
          f" per prompt), scored by {cfg.reward_model or cfg.reward_fn}; "
          + (f"resuming after {stats.prompts_done:,} prompts" if stats.prompts_done else "starting"),
          file=sys.stderr, flush=True)

    records = islice(iter_records(files, report), stats.prompts_done, None)
    if cfg.limit:
        records = islice(records, max(cfg.limit - stats.prompts_done, 0))
    bar = tqdm(desc="rejection sampling", unit=" prompts", initial=stats.prompts_done, file=sys.stderr,
               total=cfg.limit or None, mininterval=1.0, delay=1.0)
    done = False
    while not done:
        chunk = list(islice(records, cfg.chunk))
        done = len(chunk) < cfg.chunk
        if not chunk:
            break
        first = stats.prompts_done
        todo: list[tuple[int, str, Any, list[dict[str, Any]], list[int]]] = []
        for j, (where, record) in enumerate(chunk):
            try:
                messages = prompt_messages(record)
                ids = chat.encode_dialog_prompt(messages, add_generation_prompt=True)
            except (RecordError, HerdError):
                stats.skipped["bad_record"] = stats.skipped.get("bad_record", 0) + 1
                bar.update(1)
                continue
            if len(ids) + cfg.max_new_tokens > engine.max_seq_len:
                stats.skipped["prompt_too_long"] = stats.skipped.get("prompt_too_long", 0) + 1
                bar.update(1)
                continue
            todo.append((first + j, where, record, messages, ids))
        before = engine.stats()["prompt_tokens_computed"]
        t0 = time.perf_counter()
        results = sample_chunk(engine, [t[4] for t in todo], [t[0] for t in todo], cfg, stop,
                               on_prompt_done=lambda: bar.update(1))
        stats.generate_s += time.perf_counter() - t0
        stats.prefill_tokens += engine.stats()["prompt_tokens_computed"] - before
        t0 = time.perf_counter()
        lines = [_select(stats, cfg, scorer, item, res, tokenizer) for item, res in zip(todo, results)]
        stats.score_s += time.perf_counter() - t0
        stats.prompts_done = first + len(chunk)
        _commit(cfg, stats, [line for line in lines if line is not None])
        bar.set_postfix_str(f"mean best {stats.best_sum / max(stats.written, 1):.3f}", refresh=False)
    bar.close()
    if report.dropped.get("unreadable_files"):
        raise HerdError(f"cannot read {report.samples['unreadable_files'][0]}; fix or remove that file, then --resume.")
    summary = {**stats.summary(), "malformed_lines": report.dropped.get("malformed_json", 0)}
    atomic_write(Path(f"{cfg.out}.stats.json"), json.dumps(summary, indent=1) + "\n")
    print(stats.format() + (f"; {summary['malformed_lines']:,} malformed lines" if summary["malformed_lines"] else ""),
          file=sys.stderr)
    if scorer.first_error():
        print(scorer.first_error(), file=sys.stderr)
    return {**summary, "out": cfg.out}


def _select(stats: Stats, cfg: RejectionConfig, scorer: Scorer, item: tuple, results: list[Any],
            tokenizer: Any) -> str | None:
    """Score one prompt's K replies, update the stats; the output line of its best reply (None: none scored)."""
    index, where, record, messages, ids = item
    replies = [tokenizer.decode(r.tokens) for r in results]
    eligible = [cfg.keep_truncated or r.finish_reason == "stop" for r in results]
    stats.samples += len(results)
    stats.truncated += sum(r.finish_reason != "stop" for r in results)
    stats.generated_tokens += sum(len(r.tokens) for r in results)
    stats.prompt_tokens += len(ids)
    scored = scorer([(messages, reply) for reply, ok in zip(replies, eligible) if ok])
    rewards: list[float | None] = []
    it = iter(scored)
    errors = 0
    for ok in eligible:
        if not ok:
            rewards.append(None)
            continue
        r, kind = next(it)
        rewards.append(r)
        if r is None:
            errors += 1
            stats.score_errors[kind] = stats.score_errors.get(kind, 0) + 1
    stats.prompts_with_errors += errors > 0
    valid = [r for r in rewards if r is not None]
    stats.scored += len(valid)
    stats.reward_sum += sum(valid)
    if not valid:
        stats.skipped["unscored"] = stats.skipped.get("unscored", 0) + 1
        return None
    best = max(range(len(rewards)), key=lambda k: (rewards[k] is not None, rewards[k] if rewards[k] is not None else 0.0, -k))
    stats.written += 1
    stats.best_sum += rewards[best]
    stats.best_max = max(stats.best_max, rewards[best])
    if rewards[0] is not None:
        stats.first_sum += rewards[0]
        stats.first_count += 1
    stats.best_differs += best != 0
    line: dict[str, Any] = {"id": record["id"]} if isinstance(record, dict) and "id" in record else {}
    line.update(messages=messages + [{"role": "assistant", "content": replies[best]}], reward=rewards[best],
                rewards=rewards, best=best)
    worst = min(range(len(rewards)), key=lambda k: (rewards[k] is None, rewards[k] if rewards[k] is not None else 0.0, k))
    if cfg.pairs and rewards[worst] is not None and rewards[worst] < rewards[best]:
        line.update(prompt=messages, chosen=[{"role": "assistant", "content": replies[best]}],
                    rejected=[{"role": "assistant", "content": replies[worst]}], worst=worst)
    if errors:
        line["reward_errors"] = errors
    return json.dumps(line, ensure_ascii=False)
