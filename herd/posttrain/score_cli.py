"""`herd score`: rewards of conversations (or of preference records' responses) from a reward model.

Reads jsonl(.gz/.zst) / json / parquet files, or jsonl on stdin, and writes one JSON line per
record, in order:

    {"messages": [...]} or {"prompt", "completion"}       -> {"reward": 1.23}
    {"prompt", "chosen", "rejected"(, "edited")}          -> {"chosen": 1.2, "rejected": -0.3, "correct": true}
    a record that cannot be scored                        -> {"error": "reason: detail", "where": "file:line"}

with the record's "id" copied when it has one. Conversations are rendered in the reward model's
own chat style and scored in batches, longest first; a summary (mean reward, preference accuracy
and margin, what could not be scored) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from tqdm import tqdm

from herd.errors import HerdError
from herd.threads import add_threads_flag

_DTYPES = ["fp32", "bf16", "fp16"]
CHUNK = 512
"""Records rendered and scored together (the batches inside are sorted by length)."""


def add_score_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="*", type=Path,
                        help="jsonl(.gz/.zst), json or parquet files or folders; none or '-' reads jsonl from stdin")
    parser.add_argument("--reward-model", type=Path, required=True,
                        help="reward model folder (herd reward's, or transformers' LlamaForSequenceClassification)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer the data is meant for (e.g. the policy's); refused unless it is the reward "
                             "model's own (default: the reward model's)")
    parser.add_argument("--output", type=Path, default=None, help="write the JSON lines to this file (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    parser.add_argument("--text-pairs", choices=["chat", "text"], default="chat",
                        help="string prompt/completion: a user turn and an assistant reply (chat) or raw text")
    parser.add_argument("--dtype", choices=_DTYPES, default=None, help="compute dtype (default: the reward model's)")
    parser.add_argument("--device", default="cpu", help="torch device")
    add_threads_flag(parser)


def _json_lines(lines: Iterable[bytes | str], name: str) -> Iterator[tuple[str, Any]]:
    """(where, record) per non-blank line; a line that is not a JSON object yields an exception in its place,
    so the output keeps one line per input line."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            yield f"{name}:{i}", ValueError(f"malformed_json: {e}")
            continue
        yield f"{name}:{i}", record if isinstance(record, dict) else ValueError(
            f"malformed_json: a JSON {type(record).__name__}, not an object")


def _records(paths: list[Path]) -> Iterator[tuple[str, Any]]:
    """(where, record or the exception that stands for it) of stdin or every data file, in order."""
    from zstandard import ZstdError

    from herd.data.readers import decompressed_lines
    from herd.posttrain.records import data_files, iter_records
    from herd.posttrain.report import DataReport

    if not paths or paths == [Path("-")]:
        yield from _json_lines(sys.stdin, "<stdin>")
        return
    report = DataReport()
    for path in data_files(paths, report):
        low = path.name.lower()
        if low.endswith((".parquet", ".json", ".json.gz", ".json.zst")):  # whole-file formats (or JSON arrays)
            yield from iter_records([path], report)
        else:
            try:
                with open(path, "rb") as f:
                    yield from _json_lines(decompressed_lines(f, path.name), str(path))
            except (OSError, EOFError, ValueError, ZstdError) as e:  # unreadable, truncated or corrupt
                report.count("unreadable_files", str(path), f"{type(e).__name__}: {e}")
        if report.dropped.get("unreadable_files"):
            raise HerdError(f"cannot read {report.samples['unreadable_files'][0]}; fix or remove that file.")


class _Scoring:
    """Renders records into token sequences and turns their rewards back into output lines."""

    def __init__(self, scorer, text_pairs: str) -> None:
        self.scorer, self.text_pairs = scorer, text_pairs
        self.rewards: list[float] = []
        self.pairs = self.correct = 0
        self.margin = 0.0
        self.errors: dict[str, int] = {}

    def sequences(self, record: Any) -> tuple[list[list[int]], list[str] | None]:
        """(token sequences, response names or None for one conversation); RecordError if it cannot be rendered."""
        from herd.posttrain.preference import render_preference, to_preference
        from herd.posttrain.render import RecordError, to_conversation

        tok = self.scorer.tokenizer
        if isinstance(record, dict) and "chosen" in record and "rejected" in record:
            ex = render_preference(to_preference(record, self.text_pairs), self.scorer.chat)
            return [ex.prompt + r for r in ex.responses], ex.names
        conv = to_conversation(record, self.text_pairs)
        if conv.text is not None:
            return [[tok.bos_id] + tok.encode(conv.text[0] + conv.text[1]) + [tok.eos_id]], None
        try:
            return [self.scorer.encode(conv.messages, conv.tools)], None
        except HerdError as e:  # content of the wrong type, malformed tool calls
            raise RecordError("bad_messages", str(e).rstrip(".")) from None

    def lines(self, chunk: list[tuple[str, Any]]) -> list[str]:
        from herd.posttrain.render import RecordError

        rendered: list[Any] = []
        flat: list[list[int]] = []
        for where, record in chunk:
            if isinstance(record, Exception):
                rendered.append((where, str(record)))
                continue
            try:
                seqs, names = self.sequences(record)
            except RecordError as e:
                rendered.append((where, f"{e.reason}: {e.detail}"))
                continue
            too_long = max(len(s) for s in seqs)
            if too_long > self.scorer.max_seq_len:
                rendered.append((where, f"too_long: {too_long} tokens, the reward model reads at most "
                                        f"{self.scorer.max_seq_len}"))
                continue
            rendered.append((len(flat), len(seqs), names, record))
            flat.extend(seqs)
        scores = self.scorer.score_ids(flat)
        out = []
        for item in rendered:
            if isinstance(item, tuple) and len(item) == 2:  # (where, error)
                where, error = item
                reason = error.split(":", 1)[0]
                self.errors[reason] = self.errors.get(reason, 0) + 1
                out.append(json.dumps({"error": error, "where": where}))
                continue
            start, n, names, record = item
            line: dict[str, Any] = {"id": record["id"]} if "id" in record else {}
            if names is None:
                line["reward"] = scores[start]
                self.rewards.append(scores[start])
            else:
                line.update(zip(names, scores[start:start + n]))
                line["correct"] = line["chosen"] > line["rejected"]
                self.pairs += 1
                self.correct += line["correct"]
                self.margin += line["chosen"] - line["rejected"]
            out.append(json.dumps(line))
        return out

    def summary(self) -> str:
        parts = []
        if self.rewards:
            parts.append(f"{len(self.rewards):,} conversations, mean reward {sum(self.rewards) / len(self.rewards):.4f}")
        if self.pairs:
            parts.append(f"{self.pairs:,} preference records, accuracy {self.correct / self.pairs:.3f}, "
                         f"mean margin {self.margin / self.pairs:.4f}")
        text = "scored " + "; ".join(parts) if parts else "scored nothing"
        if self.errors:
            text += "; not scored: " + ", ".join(f"{n:,} {r}" for r, n in sorted(self.errors.items(), key=lambda kv: -kv[1]))
        return text


def run_score(ns: argparse.Namespace) -> int:
    import torch

    from herd import fileio
    from herd.posttrain.reward import load_reward_scorer
    from herd.threads import apply_threads

    if ns.batch_size < 1:
        raise HerdError(f"--batch-size must be at least 1, got {ns.batch_size}.")
    if not ns.reward_model.exists():
        raise HerdError(f"reward model {ns.reward_model} does not exist; pass the folder `herd reward` wrote.")
    try:
        torch.empty(0, device=ns.device)
    except (RuntimeError, AssertionError):
        raise HerdError(f"device '{ns.device}' is not available here; use --device cpu.") from None
    apply_threads(ns.threads, ns.device)
    scorer = load_reward_scorer(ns.reward_model, ns.tokenizer, ns.dtype, ns.device, ns.batch_size)
    scoring = _Scoring(scorer, ns.text_pairs)
    sink = fileio.atomic_open(ns.output, "w") if ns.output is not None else nullcontext(sys.stdout)
    with sink as out:  # type: TextIO
        chunk: list[tuple[str, Any]] = []
        bar = tqdm(desc="scoring", unit=" records", file=sys.stderr, delay=2.0, mininterval=1.0)
        for item in _records(ns.data):
            chunk.append(item)
            if len(chunk) == CHUNK:
                _flush(scoring, chunk, out, bar)
        _flush(scoring, chunk, out, bar)
        bar.close()
        if not scoring.rewards and not scoring.pairs:
            raise HerdError(f"no record could be scored ({scoring.summary().removeprefix('scored nothing; ')}); "
                            "pass {'messages': [...]}, {'prompt', 'completion'} or {'prompt', 'chosen', 'rejected'} records.")
    print(scoring.summary(), file=sys.stderr)
    return 0


def _flush(scoring: _Scoring, chunk: list, out: TextIO, bar: tqdm) -> None:
    if not chunk:
        return
    for line in scoring.lines(chunk):
        out.write(line + "\n")
    out.flush()
    bar.update(len(chunk))
    chunk.clear()
