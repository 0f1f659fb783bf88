"""`herd guard`: classify conversations with a Llama Guard model, evaluate it, or make its training data.

    herd guard --checkpoint GUARD [DATA ...]          one JSON line per conversation (stdin without DATA):
        {"id", "flagged", "verdict", "categories", "category_names", "score", "role", "output"}
        or {"error": "reason: detail", "where": "file:line"} for a record that cannot be checked
    herd guard --checkpoint GUARD --eval DATA         labelled data -> precision / recall / F1, unsafe vs safe
                                                      and per category (a table; --report writes JSON)
    herd guard --write-sft OUT.jsonl DATA             labelled data -> records `herd sft` trains a guard on
    herd guard --write-synthetic DIR                  the synthetic labelled set (herd.safety.synthetic)

Any checkpoint herd loads works as the guard (Llama Guard 3 1B / 8B in Hugging Face or Meta format
as downloaded, or a herd model trained on --write-sft data). Records: herd.safety.records.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.threads import add_threads_flag

_DTYPES = ["fp32", "bf16", "fp16"]
CHUNK = 256


def add_format_args(parser: argparse.ArgumentParser | Any) -> None:
    """The flags that choose the guard's prompt (shared with `herd serve --guard`)."""
    parser.add_argument("--guard-version", type=int, choices=[2, 3], default=3,
                        help="prompt format: 3 (Llama Guard 3: Llama 3 chat tokens, S1-S14) or 2 ([INST], S1-S11)")
    parser.add_argument("--categories", type=Path, default=None,
                        help="JSON array of custom categories ({'name', 'description'} objects, numbered S1..Sn) "
                             "instead of the version's published list")
    parser.add_argument("--exclude", default=None, help="category codes to leave out of the prompt, e.g. S6,S7 "
                                                      "(the others keep their codes)")
    # plain switches (not `--flag BOOL`): a BOOL value would swallow the DATA paths that follow
    parser.add_argument("--descriptions", action="store_true",
                        help="write each category's description under its name (custom categories carry them)")


def guard_format(ns: argparse.Namespace):
    from herd.safety.categories import default_categories, exclude_categories, load_categories
    from herd.safety.prompt import GuardFormat

    cats = load_categories(ns.categories) if ns.categories else default_categories(ns.guard_version)
    if ns.exclude:
        cats = exclude_categories(cats, ns.exclude.split(","))
    return GuardFormat(ns.guard_version, cats, ns.descriptions)


def add_guard_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="*", type=Path,
                        help="jsonl(.gz/.zst), json or parquet files or folders of conversations; none or '-' reads "
                             "jsonl from stdin")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the guard model folder (herd, Hugging Face or Meta format)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.model (default: the one stored with the checkpoint)")
    add_format_args(parser)
    parser.add_argument("--role", choices=["User", "Agent"], default=None,
                        help="check the prompt (User) or the reply (Agent) of every conversation (default: each "
                             "record's 'role', else its last message's)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="flag when p('unsafe' as the answer's first token) >= this (the model cards' classifier score); "
                             "a negative value lets the generated verdict decide")
    parser.add_argument("--eval", action="store_true",
                        help="the data is labelled: report precision / recall / F1 (unsafe vs safe and per category)")
    parser.add_argument("--report", type=Path, default=None, help="with --eval: also write the metrics as JSON here")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the per-conversation JSON lines here (default: stdout; with --eval: not written)")
    parser.add_argument("--write-sft", type=Path, default=None, metavar="OUT",
                        help="render labelled DATA into `herd sft` records (jsonl) for training a guard; no model")
    parser.add_argument("--write-synthetic", type=Path, default=None, metavar="DIR",
                        help="write the synthetic labelled set: DIR/train.jsonl and DIR/test.jsonl; no model")
    parser.add_argument("--synthetic-size", default="2000,300", help="with --write-synthetic: train,test records")
    parser.add_argument("--seed", type=int, default=0, help="with --write-synthetic: the set's seed")
    parser.add_argument("--batch-size", type=int, default=16, help="conversations the engine decodes at once")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="longest guard prompt + answer in tokens (default: the model's context, at most 8192)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None, help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_threads_flag(parser)


def _records(paths: list[Path]):
    # the reader of `herd score`: files, folders or stdin; a malformed line stands as its exception
    from herd.posttrain.score_cli import _records as read

    return read(paths)


def _record_error(e: Exception):
    """The reader's stand-in for a malformed line ("reason: detail") as a GuardRecordError."""
    from herd.safety.records import GuardRecordError

    reason, _, detail = str(e).partition(": ")
    return GuardRecordError(reason, detail) if detail else GuardRecordError("bad_record", reason)


def load_guard(ns: argparse.Namespace, fmt, threshold: float | None, max_batch_size: int,
               max_seq_len: int | None):
    """A GuardClassifier from --checkpoint / --tokenizer / --dtype / --device / --threads."""
    from herd.inference.cli import _load
    from herd.safety.classifier import GuardClassifier

    if ns.checkpoint is None:
        raise HerdError("no guard model given; pass --checkpoint with a Llama Guard (or herd-trained guard) folder.")
    load_ns = argparse.Namespace(checkpoint=ns.checkpoint, tokenizer=ns.tokenizer, dtype=ns.dtype, device=ns.device,
                                 adapter=None, threads=ns.threads)
    model, tokenizer = _load(load_ns)
    return GuardClassifier(model, tokenizer, fmt, threshold=threshold, max_batch_size=max_batch_size,
                           max_seq_len=max_seq_len)


def run_guard(ns: argparse.Namespace) -> int:
    modes = [m for m in ("write_sft", "write_synthetic") if getattr(ns, m) is not None]
    if len(modes) > 1 or (modes and ns.eval):
        raise HerdError("choose one of --eval, --write-sft and --write-synthetic.")
    fmt = guard_format(ns)
    if ns.write_synthetic is not None:
        return _write_synthetic(ns)
    if ns.write_sft is not None:
        return _write_sft(ns, fmt)
    if ns.batch_size < 1:
        raise HerdError(f"--batch-size must be at least 1, got {ns.batch_size}.")
    if ns.threshold > 1:
        raise HerdError(f"--threshold must be at most 1, got {ns.threshold}.")
    threshold = ns.threshold if ns.threshold >= 0 else None
    guard = load_guard(ns, fmt, threshold, ns.batch_size, ns.max_seq_len)
    return _classify(ns, guard, threshold)


def _classify(ns: argparse.Namespace, guard, threshold: float | None) -> int:
    from tqdm import tqdm

    from herd import fileio
    from herd.safety.metrics import guard_metrics
    from herd.safety.records import GuardRecordError, to_guard_record

    fmt = guard.fmt
    errors: dict[str, int] = {}
    first_error: list[str] = []
    labelled: list[tuple[Any, Any]] = []  # (record, result) when evaluating
    flagged_n = checked = 0
    write = ns.output is not None or not ns.eval
    sink = (fileio.atomic_open(ns.output, "w") if ns.output is not None
            else nullcontext(sys.stdout) if write else nullcontext(None))
    bar = tqdm(desc="guard", unit=" conversations", file=sys.stderr, delay=2.0, mininterval=1.0)
    with sink as out:  # type: TextIO | None
        chunk: list[tuple[str, Any]] = []

        def flush() -> None:
            nonlocal flagged_n, checked
            prompts, roles, items = [], [], []
            for where, raw in chunk:
                try:
                    if isinstance(raw, Exception):
                        raise _record_error(raw)
                    rec = to_guard_record(raw, fmt.codes)
                    if ns.eval and rec.unsafe is None:
                        raise GuardRecordError("no_label", "--eval needs 'label' (safe/unsafe) or 'categories'")
                    try:
                        ids, role = guard.prompt(rec.messages, ns.role or rec.role)
                    except HerdError as e:
                        raise GuardRecordError("bad_conversation", str(e).rstrip(".")) from None
                except GuardRecordError as e:
                    errors[e.reason] = errors.get(e.reason, 0) + 1
                    first_error[:] = first_error or [f"{where}: {e}"]
                    items.append((where, e))
                    continue
                items.append((where, rec))
                prompts.append(ids)
                roles.append(role)
            results = iter(guard.classify_prompts(prompts, roles))
            for where, item in items:
                if isinstance(item, GuardRecordError):
                    line: dict[str, Any] = {"error": str(item), "where": where}
                else:
                    res = next(results)
                    checked += 1
                    flagged_n += res.flagged(threshold)
                    line = ({"id": item.id} if item.id is not None else {}) | res.to_dict(threshold)
                    line["category_names"] = [fmt.category_name(c) for c in res.categories]
                    if ns.eval:
                        labelled.append((item, res))
                if out is not None:
                    out.write(json.dumps(line, ensure_ascii=False) + "\n")
            if out is not None:
                out.flush()
            bar.update(len(chunk))
            chunk.clear()

        for item in _records(ns.data):
            chunk.append(item)
            if len(chunk) == CHUNK:
                flush()
        flush()
        bar.close()
        if not checked:
            why = f"first problem: {first_error[0]}" if first_error else "no records"
            raise HerdError(f"no conversation could be checked ({why}); give {{'messages': [...]}} or "
                            "{'prompt', 'response'} records.")
    skipped = "; not checked: " + ", ".join(f"{n:,} {r}" for r, n in sorted(errors.items())) if errors else ""
    print(f"herd guard: {checked:,} conversations checked, {flagged_n:,} flagged{skipped}", file=sys.stderr)
    if ns.eval:
        metrics = guard_metrics([r.unsafe for r, _ in labelled], [r.categories for r, _ in labelled],
                                [res.flagged(threshold) for _, res in labelled],
                                [res.categories for _, res in labelled], fmt.codes,
                                scores=[res.score for _, res in labelled], threshold=threshold)
        print(metrics.table({c.code: c.name for c in fmt.categories}))
        if ns.report is not None:
            fileio.atomic_write(ns.report, json.dumps(metrics.to_dict(), indent=2) + "\n")
    return 0


def _write_sft(ns: argparse.Namespace, fmt) -> int:
    from herd import fileio
    from herd.safety.records import GuardRecordError, to_guard_record

    written, errors, first_error = 0, {}, None
    with fileio.atomic_open(ns.write_sft, "w") as out:
        for where, raw in _records(ns.data):
            try:
                if isinstance(raw, Exception):
                    raise _record_error(raw)
                rec = to_guard_record(raw, fmt.codes)
                if rec.unsafe is None:
                    raise GuardRecordError("no_label", "training data needs 'label' (safe/unsafe) or 'categories'")
                try:
                    record = fmt.sft_record(rec.messages, rec.categories if rec.unsafe else [], ns.role or rec.role)
                except HerdError as e:
                    raise GuardRecordError("bad_conversation", str(e).rstrip(".")) from None
            except GuardRecordError as e:
                errors[e.reason] = errors.get(e.reason, 0) + 1
                first_error = first_error or f"{where}: {e}"
                continue
            if rec.id is not None:
                record["id"] = rec.id
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
        if not written:
            raise HerdError(f"no record could be rendered (first problem: {first_error or 'no records'}); give "
                            "labelled {'messages'|'prompt', 'label', 'categories'} records.")
    skipped = f"; skipped {sum(errors.values()):,} ({first_error})" if errors else ""
    same = " ".join(f"--{k} {v}" for k, v in (("guard-version", ns.guard_version if ns.guard_version != 3 else None),
                                               ("categories", ns.categories), ("exclude", ns.exclude)) if v)
    print(f"herd guard: wrote {written:,} training records to {ns.write_sft}{skipped}\n"
          f"train with: herd sft --data {ns.write_sft} {fmt.sft_flags()} --init-from MODEL ...\n"
          f"then use the guard with the same prompt: herd guard --checkpoint RUN/final {same}".rstrip(),
          file=sys.stderr)
    return 0


def _write_synthetic(ns: argparse.Namespace) -> int:
    from herd import fileio
    from herd.safety.synthetic import synthetic_guard_records

    try:
        n_train, n_test = (int(x) for x in ns.synthetic_size.split(","))
    except ValueError:
        raise HerdError(f"--synthetic-size takes two counts, train,test (e.g. 2000,300); got "
                        f"'{ns.synthetic_size}'.") from None
    if ns.data:
        raise HerdError("--write-synthetic makes its own data; leave out the DATA arguments.")
    for part, n in (("train", n_train), ("test", n_test)):
        try:
            records = synthetic_guard_records(n, part, seed=ns.seed)
        except ValueError as e:
            raise HerdError(f"{e}.") from None
        fileio.atomic_write(ns.write_synthetic / f"{part}.jsonl",
                            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"herd guard: wrote {n_train:,} train and {n_test:,} test records to {ns.write_synthetic}/", file=sys.stderr)
    return 0
