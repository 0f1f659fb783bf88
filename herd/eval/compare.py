"""`herd compare`: two checkpoints answer the same prompts; a judge decides each pair; win / tie / loss
rates with 95% confidence intervals, overall and per category (Llama 3's human evaluation compared
models side by side on prompts grouped by use case, paper section 5.3).

    prompts file -> replies of A and of B (generated, saved, reused on a re-run)
      -> judge asked (A, B) and, if it is order-sensitive, (B, A): P(A better) = (p_AB + 1 - p_BA) / 2
      -> win if P > 0.5 + tie_margin, loss if P < 0.5 - tie_margin, tie otherwise
      -> rates with Wilson intervals; the position consistency of the judge (same verdict both ways)

Prompts: jsonl / json / parquet records with `prompt` (a string) or `messages` (a chat), optional
`category` (default "all") and `id`. A pair whose prompt or judge question does not fit a model's
context is skipped and counted, never judged on cut text.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.eval.metrics import wilson_interval
from herd.fileio import atomic_open, atomic_write


@dataclass
class CompareConfig:
    """Settings of `herd compare`."""

    prompts: str = ""
    """Prompts file: jsonl/json/parquet records with prompt (or messages), optional category and id."""
    judge: str = ""
    """Judge checkpoint folder."""
    judge_kind: str = "auto"
    """llm (a checkpoint asked 'A or B?', scored by its answer-token probabilities), reward (a reward model,
    P = sigmoid(r_A - r_B)), or auto (reward for a reward-model checkpoint, else llm)."""
    out: str = "runs/compare"
    """Folder for replies_a.jsonl, replies_b.jsonl, pairs.jsonl and results.json (replies are reused on a re-run)."""
    chat: bool = True
    """Wrap each prompt in the Llama 3 chat format (instruct models); false = plain text continuation."""
    max_new_tokens: int = 256
    """Longest reply in tokens."""
    temperature: float = 0.0
    """Sampling temperature of the replies; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling of the replies (with temperature > 0)."""
    seed: int = 0
    """Seed of sampled replies."""
    tie_margin: float = 0.1
    """A pair is a tie when P(A better) is within this of 0.5."""
    batch_size: int = 8
    """Prompts generated from together."""
    limit: int = 0
    """Use only the first N prompts; 0 = all."""


def read_prompts(path: str | Path, limit: int = 0) -> list[dict[str, Any]]:
    """[{id, category, prompt or messages}] from a prompts file (HerdError naming a bad record)."""
    from herd.eval.data import read_records

    if not str(path):
        raise HerdError("no prompts given; pass --prompts FILE (jsonl records with a 'prompt' field).")
    rows = read_records(path)
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            entry = {"prompt": row["prompt"]}
        elif isinstance(row.get("messages"), list) and row["messages"]:
            entry = {"messages": row["messages"]}
        else:
            raise HerdError(f"record {i} of {path} has no 'prompt' string or 'messages' list; give each record one.")
        entry["id"] = str(row.get("id", i))
        entry["category"] = str(row.get("category") or "all")
        out.append(entry)
    if not out:
        raise HerdError(f"{path} holds no prompts; add records with a 'prompt' field.")
    return out


def prompt_text(entry: dict[str, Any]) -> str:
    """The prompt as the judge reads it (a chat is written out as 'role: content' lines)."""
    if "prompt" in entry:
        return entry["prompt"]
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in entry["messages"])


def generate_replies(checkpoint: str, prompts: list[dict[str, Any]], cfg: CompareConfig,
                     dtype: str | None = None, device: str | None = None) -> list[str | None]:
    """Each prompt's reply from one checkpoint (None when the prompt does not fit its context)."""
    from herd.eval.generate import generate_until
    from herd.eval.loading import load_model_and_tokenizer
    from herd.inference.engine import Engine
    from herd.inference.sampling import SamplingParams
    from herd.tokenizer import ChatFormat

    model, tok, _ = load_model_and_tokenizer(checkpoint, None, dtype, device)
    chat = ChatFormat(tok)
    ids = []
    for p in prompts:
        messages = p.get("messages") or [{"role": "user", "content": p["prompt"]}]
        ids.append(chat.encode_dialog_prompt(messages) if cfg.chat else tok.encode(prompt_text(p), bos=True))
    limit = model.args.max_seq_len
    keep = [i for i, x in enumerate(ids) if len(x) + cfg.max_new_tokens <= limit]
    replies: list[str | None] = [None] * len(prompts)
    if keep:
        need = max(len(ids[i]) for i in keep) + cfg.max_new_tokens
        engine = Engine(model, max_batch_size=min(cfg.batch_size, len(keep)), max_seq_len=need)
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed if cfg.temperature else None)
        from tqdm import tqdm

        with tqdm(total=len(keep), desc=f"replies of {Path(checkpoint).name}", file=sys.stderr, leave=False) as bar:
            texts = generate_until(engine, tok, [ids[i] for i in keep], [[] for _ in keep],
                                   [cfg.max_new_tokens] * len(keep), params, progress=bar.update)
        for i, text in zip(keep, texts):
            replies[i] = text.strip()
    del model
    return replies


def _fingerprint(checkpoint: str, prompts: list[dict], cfg: CompareConfig) -> str:
    from herd.eval.loading import checkpoint_fingerprint

    payload = {"ckpt": checkpoint_fingerprint(checkpoint), "prompts": prompts, "chat": cfg.chat,
               "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
               "seed": cfg.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_replies(path: Path, checkpoint: str, prompts: list[dict], cfg: CompareConfig, log, **load) -> list:
    """Replies from `path` when it was written for the same checkpoint, prompts and sampling; else generated
    and saved there (so a killed comparison does not generate them again)."""
    fp = _fingerprint(checkpoint, prompts, cfg)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == fp:
                log(f"reusing {path}")
                return saved["replies"]
        except (OSError, json.JSONDecodeError):
            pass
    replies = generate_replies(checkpoint, prompts, cfg, **load)
    atomic_write(path, json.dumps({"fingerprint": fp, "checkpoint": checkpoint, "replies": replies}) + "\n")
    return replies


def outcome(p: float, margin: float) -> str:
    return "win" if p > 0.5 + margin else "loss" if p < 0.5 - margin else "tie"


def summarize(pairs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per category (and 'overall'): n, win / tie / loss rates with 95% Wilson intervals, the win rate
    counting ties as half, and how often the judge gave the same verdict in both orders."""
    groups: dict[str, list[dict]] = {"overall": pairs}
    for p in pairs:
        groups.setdefault(p["category"], []).append(p)
    out = {}
    for name, group in groups.items():
        n = len(group)
        counts = Counter(p["outcome"] for p in group)
        row: dict[str, Any] = {"n": n}
        for kind in ("win", "tie", "loss"):
            lo, hi = wilson_interval(counts[kind], n)
            row[kind] = counts[kind] / n if n else float("nan")
            row[f"{kind}_ci95"] = [lo, hi]
        half = counts["win"] + 0.5 * counts["tie"]
        row["win_rate_ties_half"] = half / n if n else float("nan")
        row["win_rate_ties_half_ci95"] = list(wilson_interval(half, n))
        both = [p for p in group if p.get("consistent") is not None]
        row["position_consistency"] = sum(p["consistent"] for p in both) / len(both) if both else None
        out[name] = row
    return out


def run_comparison(checkpoint_a: str, checkpoint_b: str, cfg: CompareConfig, judge=None, dtype: str | None = None,
                   device: str | None = None, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """The whole comparison; writes OUT/results.json and OUT/pairs.jsonl and returns the results."""
    from herd.eval.judge import JUDGES, judge_kind

    if cfg.tie_margin < 0 or cfg.tie_margin >= 0.5:
        raise HerdError(f"--tie-margin {cfg.tie_margin} must be in [0, 0.5).")
    if cfg.max_new_tokens < 1:
        raise HerdError(f"--max-new-tokens {cfg.max_new_tokens} must be at least 1.")
    if judge is None:
        if cfg.judge_kind != "auto" and cfg.judge_kind not in JUDGES:
            raise HerdError(f"unknown --judge-kind '{cfg.judge_kind}'; choose auto or one of: {', '.join(JUDGES)}.")
        if not cfg.judge:
            raise HerdError("no judge given; pass --judge CKPT (a chat checkpoint that answers 'A' or 'B', or a "
                            "reward model).")
        if not Path(cfg.judge).exists():
            raise HerdError(f"judge checkpoint {cfg.judge} does not exist; pass a checkpoint folder to --judge.")
    prompts = read_prompts(cfg.prompts, cfg.limit)
    if judge is None:
        kind = judge_kind(cfg.judge) if cfg.judge_kind == "auto" else cfg.judge_kind
        judge = JUDGES[kind](cfg.judge, dtype=dtype, device=device)
    out = Path(cfg.out)
    replies_a = cached_replies(out / "replies_a.json", checkpoint_a, prompts, cfg, log, dtype=dtype, device=device)
    replies_b = cached_replies(out / "replies_b.json", checkpoint_b, prompts, cfg, log, dtype=dtype, device=device)
    ok = [i for i in range(len(prompts)) if replies_a[i] is not None and replies_b[i] is not None]
    skipped = Counter({"prompt + reply longer than a model's context": len(prompts) - len(ok)})
    texts = [prompt_text(prompts[i]) for i in ok]
    a, b = [replies_a[i] for i in ok], [replies_b[i] for i in ok]
    log(f"judging {len(ok)} pairs" + (" in both orders" if judge.order_sensitive else ""))
    p_ab = judge.prob_first_better(texts, a, b)
    p_ba = judge.prob_first_better(texts, b, a) if judge.order_sensitive else [None] * len(ok)
    pairs = []
    for k, i in enumerate(ok):
        if p_ab[k] is None or (judge.order_sensitive and p_ba[k] is None):
            skipped["judge question longer than the judge's context"] += 1
            continue
        p = (p_ab[k] + 1 - p_ba[k]) / 2 if judge.order_sensitive else p_ab[k]
        consistent = None
        if judge.order_sensitive:
            consistent = outcome(p_ab[k], cfg.tie_margin) == outcome(1 - p_ba[k], cfg.tie_margin)
        pairs.append({"id": prompts[i]["id"], "category": prompts[i]["category"], "prompt": texts[k],
                      "reply_a": a[k], "reply_b": b[k], "p_a_better": p, "p_first_ab": p_ab[k],
                      "p_first_ba": p_ba[k], "outcome": outcome(p, cfg.tie_margin), "consistent": consistent})
    results = {"a": checkpoint_a, "b": checkpoint_b, "judge": cfg.judge, "judge_kind": judge.name,
               "config": asdict(cfg), "skipped": {k: v for k, v in skipped.items() if v},
               "categories": summarize(pairs)}
    with atomic_open(out / "pairs.jsonl") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    atomic_write(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return results


def table(results: dict[str, Any]) -> str:
    """Win / tie / loss per category, each with its 95% interval."""
    head = "| category | n | A wins | ties | A loses | A win rate (ties half) | judge consistent |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    pct = lambda v, ci: f"{100 * v:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    for name, r in sorted(results["categories"].items(), key=lambda kv: (kv[0] != "overall", kv[0])):
        if r["n"] == 0:
            lines.append(f"| {name} | 0 | | | | | |")
            continue
        cons = f"{100 * r['position_consistency']:.0f}%" if r["position_consistency"] is not None else "n/a"
        lines.append(f"| {name} | {r['n']} | {pct(r['win'], r['win_ci95'])} | {pct(r['tie'], r['tie_ci95'])} | "
                     f"{pct(r['loss'], r['loss_ci95'])} | {pct(r['win_rate_ties_half'], r['win_rate_ties_half_ci95'])} "
                     f"| {cons} |")
    return "\n".join(lines)
