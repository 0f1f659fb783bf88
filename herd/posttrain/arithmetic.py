"""A verifiable chat task for the post-training recipe: small sums and differences (and, for models
too small to add, the larger of two numbers), checked exactly.

    user:       What is 23 + 58?                    What is the larger of 37 and 52?
    assistant:  23 + 58 = 81.                       max(37, 52) = 52.

Everything after SFT needs a preference someone can check without a human: whether a reply's result
is right. This module builds, offline and deterministically from a seed, the three kinds of data the
stages read, all in the formats `herd sft` / `herd reward` / `herd dpo` / `herd ppo` read:

    sft_records(n)         TRL conversational records with the right reply (SFT data)
    preference_records(n)  TRL preference records: chosen = the right reply, rejected = a wrong result
    prompt_records(n)      prompts only (rejection sampling, PPO / GRPO rollouts)

and the verifiable reward `reward(messages, reply)` (1.0 for the right result, else 0.0), usable as
`--reward-fn herd.posttrain.arithmetic:reward`. A record's "id" is its question ("23+58"), so herd's
hash split holds out whole questions; the same question never appears twice in one set.

    python -m herd.posttrain.arithmetic sft    data/arith_sft.jsonl   --n 2000
    python -m herd.posttrain.arithmetic pairs  data/arith_pairs.jsonl --n 2000 --seed 1
    python -m herd.posttrain.arithmetic prompts data/arith_prompts.jsonl --n 200 --seed 2
    python -m herd.posttrain.arithmetic recipe data/arith      # all four sets of one round, disjoint

Sets written with different seeds may share questions; `recipe` draws one set of distinct questions
and splits it, so its held-out test prompts are never trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from herd.errors import HerdError
from herd.fileio import atomic_write

OPERATORS = ("+", "-", "max")
"""The question kinds: sums, differences (never below zero) and the larger of two different numbers."""
DEFAULT_OPERATORS = ("+", "-")
_QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?|What is the larger of (\d+) and (\d+)\?")
_RESULT = re.compile(r"=\s*(-?\d+)")


def parse_operators(text: str | Sequence[str]) -> tuple[str, ...]:
    """'+,-' or ['+', 'max'] -> the operator names, checked."""
    ops = tuple(o.strip() for o in (text.split(",") if isinstance(text, str) else text) if o.strip())
    if not ops or not set(ops) <= set(OPERATORS):
        raise HerdError(f"operators must be some of {', '.join(OPERATORS)} (comma-separated), got {text!r}.")
    return ops


def questions(n: int, seed: int = 0, max_operand: int = 99,
              operators: str | Sequence[str] = DEFAULT_OPERATORS) -> list[tuple[int, str, int]]:
    """n distinct (a, op, b) with 0 <= a, b <= max_operand; differences never go below zero, and the
    two numbers of a 'max' question differ."""
    ops = parse_operators(operators)
    possible = (max_operand + 1) ** 2 * len(ops)  # upper bound; '-' and 'max' keep about half of their pairs
    if n > possible // 2:
        raise HerdError(f"{n} distinct questions asked of operands up to {max_operand}; "
                        f"ask for at most {possible // 2} or raise max_operand.")
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    out = []
    while len(out) < n:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        if op == "-" and b > a:
            a, b = b, a
        if op == "max" and a == b:
            continue
        if (a, op, b) not in seen:
            seen.add((a, op, b))
            out.append((a, op, b))
    return out


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else max(a, b)


def question_text(a: int, op: str, b: int) -> str:
    return f"What is the larger of {a} and {b}?" if op == "max" else f"What is {a} {op} {b}?"


def reply_text(a: int, op: str, b: int, result: int) -> str:
    return f"max({a}, {b}) = {result}." if op == "max" else f"{a} {op} {b} = {result}."


def wrong_result(a: int, op: str, b: int, rng: random.Random) -> int:
    """A plausible wrong result: off by 1-10 (the kind of slip a small model makes), never negative;
    for 'max', the smaller number."""
    right = solve(a, op, b)
    if op == "max":
        return min(a, b)
    while True:
        wrong = right + rng.choice([-1, 1]) * rng.randint(1, 10)
        if wrong >= 0 and wrong != right:
            return wrong


def _user(a: int, op: str, b: int) -> dict[str, str]:
    return {"role": "user", "content": question_text(a, op, b)}


def _sft(a: int, op: str, b: int) -> dict[str, Any]:
    return {"id": f"{a}{op}{b}", "messages": [_user(a, op, b), {"role": "assistant",
                                                                "content": reply_text(a, op, b, solve(a, op, b))}]}


def _pair(a: int, op: str, b: int, rng: random.Random) -> dict[str, Any]:
    return {"id": f"{a}{op}{b}", "prompt": [_user(a, op, b)],
            "chosen": [{"role": "assistant", "content": reply_text(a, op, b, solve(a, op, b))}],
            "rejected": [{"role": "assistant", "content": reply_text(a, op, b, wrong_result(a, op, b, rng))}]}


def _prompt(a: int, op: str, b: int) -> dict[str, Any]:
    return {"id": f"{a}{op}{b}", "messages": [_user(a, op, b)]}


def _wrong_rng(seed: int) -> random.Random:
    return random.Random(seed + 1_000_003)


def sft_records(n: int, seed: int = 0, max_operand: int = 99,
                operators: str | Sequence[str] = DEFAULT_OPERATORS) -> list[dict[str, Any]]:
    """n conversational records whose reply states the right result."""
    return [_sft(*q) for q in questions(n, seed, max_operand, operators)]


def preference_records(n: int, seed: int = 0, max_operand: int = 99,
                       operators: str | Sequence[str] = DEFAULT_OPERATORS) -> list[dict[str, Any]]:
    """n preference records (TRL's conversational explicit-prompt form): right result chosen, a wrong one rejected."""
    rng = _wrong_rng(seed)
    return [_pair(*q, rng) for q in questions(n, seed, max_operand, operators)]


def prompt_records(n: int, seed: int = 0, max_operand: int = 99,
                   operators: str | Sequence[str] = DEFAULT_OPERATORS) -> list[dict[str, Any]]:
    """n prompt-only records ({"id", "messages": [user turn]})."""
    return [_prompt(*q) for q in questions(n, seed, max_operand, operators)]


RECIPE_SPLITS = ("sft", "pairs", "prompts", "test")


def recipe_sets(sizes: tuple[int, ...] = (2000, 2000, 300, 200), seed: int = 0, max_operand: int = 99,
                operators: str | Sequence[str] = DEFAULT_OPERATORS) -> dict[str, list[dict[str, Any]]]:
    """The four sets of one post-training round, on disjoint questions: SFT records, preference pairs,
    prompts (rejection sampling / PPO) and held-out test prompts (`herd eval --tasks arithmetic:test.jsonl`)."""
    qs = questions(sum(sizes), seed, max_operand, operators)
    rng = _wrong_rng(seed)
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    parts = {name: qs[end - size:end] for name, size, end in zip(RECIPE_SPLITS, sizes, ends)}
    return {"sft": [_sft(*q) for q in parts["sft"]], "pairs": [_pair(*q, rng) for q in parts["pairs"]],
            "prompts": [_prompt(*q) for q in parts["prompts"]], "test": [_prompt(*q) for q in parts["test"]]}


def parse_question(text: str) -> tuple[int, str, int] | None:
    m = _QUESTION.search(text)
    if m is None:
        return None
    if m.group(4) is not None:
        return int(m.group(4)), "max", int(m.group(5))
    return int(m.group(1)), m.group(2), int(m.group(3))


def stated_result(reply: str) -> int | None:
    """The number a reply states after its first '=' (None if it states none)."""
    m = _RESULT.search(reply)
    return int(m.group(1)) if m else None


def _last_user_text(messages: str | Iterable[dict[str, Any]]) -> str:
    if isinstance(messages, str):
        return messages
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def is_correct(messages: str | Iterable[dict[str, Any]], reply: str) -> bool | None:
    """Whether the reply states the right result of the last user question (None: no arithmetic question)."""
    q = parse_question(_last_user_text(messages))
    if q is None:
        return None
    return stated_result(reply) == solve(*q)


def reward(messages: str | list[dict[str, Any]], reply: str) -> float:
    """The verifiable reward: 1.0 when the reply states the right result, else 0.0.

    `messages` is the prompt (a string or chat messages); a prompt with no arithmetic question is a
    HerdError, so a reward function pointed at the wrong prompts fails loudly instead of scoring zeros.
    """
    ok = is_correct(messages, reply)
    if ok is None:
        raise HerdError(f"no 'What is A + B?' (or 'the larger of A and B') question in the prompt {_last_user_text(messages)[:60]!r}; "
                        "use this reward with prompts from herd.posttrain.arithmetic.")
    return 1.0 if ok else 0.0


def write_records(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as jsonl, atomically."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(path)


KINDS = {"sft": sft_records, "pairs": preference_records, "prompts": prompt_records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m herd.posttrain.arithmetic",
        description="Write a verifiable arithmetic chat set ('What is 23 + 58?' -> '23 + 58 = 81.') as jsonl: "
                    "SFT records, preference pairs (right vs wrong result), prompts, or all four sets of one "
                    "post-training round on disjoint questions (recipe: OUT is a folder).")
    parser.add_argument("kind", choices=sorted(KINDS) + ["recipe"], help="sft: right replies; pairs: chosen right, "
                        "rejected wrong; prompts: user turns only; recipe: OUT/{sft,pairs,prompts,test}.jsonl")
    parser.add_argument("out", help="output .jsonl file (a folder for recipe)")
    parser.add_argument("--n", type=int, default=1000, help="number of distinct questions (default 1000)")
    parser.add_argument("--sizes", default="2000,2000,300,200",
                        help="recipe: questions in sft,pairs,prompts,test (default 2000,2000,300,200)")
    parser.add_argument("--seed", type=int, default=0, help="seed; different seeds give mostly different questions")
    parser.add_argument("--max-operand", type=int, default=99, help="largest operand (default 99)")
    parser.add_argument("--ops", default="+,-", help="question kinds, comma-separated, from +, - and max "
                        "('What is the larger of A and B?'; a task small models can learn) (default +,-)")
    args = parser.parse_args(argv)
    try:
        if args.kind == "recipe":
            try:
                sizes = tuple(int(x) for x in args.sizes.split(","))
            except ValueError:
                sizes = ()
            if len(sizes) != 4 or min(sizes) < 0:
                raise HerdError(f"--sizes {args.sizes!r} must be four counts: sft,pairs,prompts,test.")
            sets = recipe_sets(sizes, args.seed, args.max_operand, args.ops)
            for name, records in sets.items():
                write_records(records, Path(args.out) / f"{name}.jsonl")
            print(f"wrote {', '.join(f'{len(r)} {n}' for n, r in sets.items())} records (disjoint questions) "
                  f"to {args.out}/")
            return 0
        records = KINDS[args.kind](args.n, args.seed, args.max_operand, args.ops)
    except HerdError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 2
    write_records(records, args.out)
    print(f"wrote {len(records)} {args.kind} records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
