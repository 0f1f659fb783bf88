"""`herd tokenizer train|encode|decode|stats`: train vocabularies, inspect ids, compare tokenizers."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from herd.flags import HelpFormatter, add_bool_flag, add_dataclass_args, dataclass_from_args
from herd.errors import HerdError
from herd.tokenizer.core import Tokenizer
from herd.tokenizer.train import iter_files, read_documents


@dataclass
class BPETrainConfig:
    """Options of `herd tokenizer train`."""

    vocab_size: int = 32768
    """total vocabulary size n_words, INCLUDING the 256 special tokens appended after the BPE ranks
    (4096 -> 3840 BPE tokens + 256 specials; matches the herd-1m/15m/100m presets' vocab_size)"""
    min_frequency: int = 2
    """a pair must occur at least this often to be merged"""
    glob: str = "*"
    """file-name pattern for files inside input folders (e.g. '*.py')"""
    max_token_chars: int | None = None
    """longest token in characters (unset: no limit)"""


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fmt = HelpFormatter

    p = sub.add_parser("train",
                       help="learn a byte-level BPE vocabulary (Llama 3 pattern) and write a tiktoken file",
                       description="Learn a byte-level BPE with Llama 3's pre-tokenization using the Hugging Face "
                                   "`tokenizers` trainer and write a tiktoken-format file (base64 token + rank per "
                                   "line) that herd loads like Meta's tokenizer.model. The 256 Llama 3.1 special "
                                   "tokens follow the BPE ranks, so --vocab-size counts them: n_words == --vocab-size.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files, .jsonl files (one JSON object with a 'text' field per line) or folders")
    p.add_argument("--output", required=True, metavar="PATH", help="where to write the tokenizer file")
    add_dataclass_args(p, BPETrainConfig)

    p = sub.add_parser("encode", formatter_class=fmt, help="text -> token ids",
                       description="Print the token ids of a text (--text, --input FILE, or stdin).")
    _tokenizer_arg(p)
    p.add_argument("--text", help="text to encode (default: read --input or stdin)")
    p.add_argument("--input", metavar="FILE", help="UTF-8 file to encode")
    add_bool_flag(p, "--bos", default=False, help="prepend <|begin_of_text|>")
    add_bool_flag(p, "--eos", default=False, help="append <|end_of_text|>")
    add_bool_flag(p, "--allow-special", default=False,
                  help="turn special-token strings in the text (e.g. '<|eot_id|>') into their ids")
    p.add_argument("--format", choices=("ids", "json", "tokens"), default="ids",
                   help="ids: space-separated; json: a list; tokens: one 'id<TAB>repr(bytes)' per line")

    p = sub.add_parser("decode", formatter_class=fmt, help="token ids -> text",
                       description="Print the text of token ids given as arguments, in --input FILE, or on "
                                   "stdin (separated by spaces, commas or newlines, or a JSON list).")
    _tokenizer_arg(p)
    p.add_argument("ids", nargs="*", help="token ids")
    p.add_argument("--input", metavar="FILE", help="file of token ids")

    p = sub.add_parser("stats", formatter_class=fmt, help="characters and bytes per token, round-trip share",
                       description="Measure tokenizers on a corpus: characters per token, bytes per token and the "
                                   "share of documents whose decode(encode(x)) == x. Give several --tokenizer "
                                   "paths to compare vocabularies side by side.")
    p.add_argument("--tokenizer", nargs="+", required=True, metavar="PATH",
                   help="tokenizer.model files (or folders holding one)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="text/.jsonl files or folders")
    p.add_argument("--glob", default="*", help="file-name pattern inside input folders")
    add_bool_flag(p, "--json", default=False, help="print one JSON object per tokenizer instead of a table")


def _tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="tiktoken-format file: Meta's tokenizer.model or one from `herd tokenizer train`")
    p.add_argument("--sha256", default=None, help="refuse the file unless its sha256 is this hex digest")


def run_tokenizer(args: argparse.Namespace) -> int:
    return {"train": _train, "encode": _encode, "decode": _decode, "stats": _stats}[args.action](args)


def _train(args: argparse.Namespace) -> int:
    from herd.tokenizer.train import train_bpe

    cfg = dataclass_from_args(BPETrainConfig, args)
    # Path objects, so a mistyped name is reported as missing rather than trained on as text
    tok, st = train_bpe([Path(p) for p in args.input], cfg.vocab_size, args.output, min_frequency=cfg.min_frequency,
                        glob=cfg.glob, max_token_chars=cfg.max_token_chars)
    mb = st.bytes / 1e6
    print(f"wrote {args.output}: n_words {tok.n_words} ({tok.n_bpe} BPE + 256 special), sha256 {tok.sha256}")
    print(f"trained on {st.documents} documents, {mb:.1f} MB in {st.seconds:.1f} s "
          f"({st.seconds / max(mb, 1e-9) * 100:.0f} s per 100 MB)"
          + (f"; skipped {st.skipped_files} files that are not UTF-8" if st.skipped_files else ""))
    return 0


def _read_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        return args.text
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise HerdError(f"input file '{path}' does not exist; pass an existing UTF-8 file.")
        data, name = path.read_bytes(), f"'{path}'"
    else:
        data, name = sys.stdin.buffer.read(), "stdin"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HerdError(f"{name} is not valid UTF-8 (byte {e.start}); convert it with `iconv -t UTF-8` first.") from None


def _encode(args: argparse.Namespace) -> int:
    tok = Tokenizer.from_file(args.tokenizer, expected_sha256=args.sha256)
    ids = tok.encode(_read_text(args), bos=args.bos, eos=args.eos,
                     allowed_special="all" if args.allow_special else ())
    if args.format == "json":
        print(json.dumps(ids))
    elif args.format == "tokens":
        for i in ids:
            print(f"{i}\t{tok.token_bytes(i)!r}")
    else:
        print(" ".join(map(str, ids)))
    return 0


def _decode(args: argparse.Namespace) -> int:
    tok = Tokenizer.from_file(args.tokenizer, expected_sha256=args.sha256)
    if args.ids:
        raw = " ".join(args.ids)
    elif args.input:
        if not Path(args.input).is_file():
            raise HerdError(f"input file '{args.input}' does not exist; pass a file of token ids.")
        raw = Path(args.input).read_text(encoding="utf-8", errors="replace")
    else:
        raw = sys.stdin.read()
    raw = raw.strip()
    try:
        ids = json.loads(raw) if raw.startswith("[") else [int(x) for x in raw.replace(",", " ").split()]
        if not all(isinstance(i, int) for i in ids):
            raise ValueError
    except ValueError:
        raise HerdError("token ids must be integers separated by spaces or commas, or a JSON list of integers.") from None
    sys.stdout.write(tok.decode(ids) + "\n")  # a line, like every other command's output
    return 0


def corpus_stats(tok: Tokenizer, documents: list[str], progress: bool = False) -> dict[str, float]:
    """Characters/bytes per token and the share of exact round trips over `documents`."""
    from tqdm import tqdm

    n_tok = exact = 0
    batch = 256
    with tqdm(total=len(documents), desc=f"encoding ({tok.n_words} words)", unit="doc",
              disable=not progress) as bar:
        for start in range(0, len(documents), batch):
            docs = documents[start:start + batch]
            for ids, doc in zip(tok.encode_batch(docs, num_threads=2), docs):
                n_tok += len(ids)
                exact += tok.decode(ids) == doc
            bar.update(len(docs))
    chars = sum(map(len, documents))
    nbytes = sum(len(d.encode("utf-8")) for d in documents)
    return {"tokenizer": tok.path, "n_words": tok.n_words, "documents": len(documents), "characters": chars,
            "bytes": nbytes, "tokens": n_tok, "chars_per_token": chars / max(n_tok, 1),
            "bytes_per_token": nbytes / max(n_tok, 1), "roundtrip_share": exact / max(len(documents), 1)}


def _stats(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    files = list(iter_files(args.input, args.glob))
    explicit = {Path(i) for i in args.input if Path(i).is_file()}
    docs = [d for f in tqdm(files, desc="reading", unit="file", disable=len(files) < 50)
            for d in read_documents(f, strict=f in explicit)]
    if not docs:
        raise HerdError("no documents found in --input; pass UTF-8 text, .jsonl files or folders (check --glob).")
    big = sum(map(len, docs)) > 20_000_000
    rows = [corpus_stats(Tokenizer.from_file(p), docs, progress=big) for p in args.tokenizer]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"{len(docs)} documents, {rows[0]['characters']:,} characters, {rows[0]['bytes']:,} bytes")
    print(f"{'tokenizer':<48} {'n_words':>8} {'tokens':>11} {'chars/tok':>9} {'bytes/tok':>9} {'roundtrip':>9}")
    for r in rows:
        name = str(r["tokenizer"])
        name = name if len(name) <= 48 else "..." + name[-45:]
        print(f"{name:<48} {r['n_words']:>8} {r['tokens']:>11,} {r['chars_per_token']:>9.3f} "
              f"{r['bytes_per_token']:>9.3f} {r['roundtrip_share']:>9.1%}")
    return 0
