"""Training new byte-level BPE vocabularies for from-scratch models.

The Hugging Face `tokenizers` BPE trainer (Rust, multi-threaded) learns the merges with Llama 3's
pre-tokenization (a Split on the exact pattern, then ByteLevel without its own regex); the result
is converted from GPT-2's printable byte alphabet back to raw bytes and written as a tiktoken
file (`base64(bytes) rank` per line) that `Tokenizer.from_file` loads like Meta's tokenizer.model.
Ranks: the 256 single bytes first (rank = byte value), then merged tokens in the order the trainer
learned them, so tiktoken's lowest-rank-first merging replays the training merges.

vocab_size everywhere here is the total n_words *including* the 256 special tokens, so
`--vocab-size 4096` fits the herd-1m preset (3840 BPE ranks + 256 specials).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from herd.errors import HerdError
from herd.tokenizer.core import NUM_SPECIAL_TOKENS, PATTERN, Tokenizer
from herd.fileio import atomic_open

TEXT_FIELD = "text"


@dataclass
class TrainStats:
    """What train_bpe did: sizes, input volume and wall time."""

    n_words: int
    n_bpe: int
    documents: int
    characters: int
    bytes: int
    seconds: float
    skipped_files: int


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel emits)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def iter_files(inputs: Iterable[str | os.PathLike], glob: str = "*") -> Iterator[Path]:
    """Files named by `inputs`; folders are walked recursively (hidden entries skipped, `glob` filters names)."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.rglob(glob)):
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts):
                    yield f
        elif p.is_file():
            yield p
        else:
            raise HerdError(f"input '{p}' does not exist; pass text files, .jsonl files with a "
                            f"'{TEXT_FIELD}' field, or folders of them.")


def read_documents(path: Path, strict: bool = True) -> Iterator[str]:
    """Documents in one file: the whole file for text, one per line's "text" field for .jsonl.

    strict: invalid UTF-8 raises a HerdError; otherwise the file is skipped (folders of mixed files).
    """
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise HerdError(f"'{path}' is not valid UTF-8 (byte {e.start}); convert it with "
                            "`iconv -t UTF-8` or leave it out.") from None
        return
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj[TEXT_FIELD]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise HerdError(f"'{path}' line {lineno} is not a JSON object with a '{TEXT_FIELD}' "
                                "string; fix the line or pass the file as plain text.") from None
            if isinstance(text, str):
                yield text
    else:
        yield raw


def train_bpe(inputs: Iterable[str | os.PathLike], vocab_size: int, out_path: str | os.PathLike,
              *, min_frequency: int = 2, glob: str = "*", max_token_chars: int | None = None,
              show_progress: bool | None = None) -> tuple[Tokenizer, TrainStats]:
    """Learn a byte-level BPE with Llama 3's pattern and write it in tiktoken format.

    inputs: files/folders (.jsonl: the "text" field of each line; other files: the whole file) given
    as Path objects (a missing one is an error) or as strings naming existing paths; any other
    string is taken as in-memory training text.
    vocab_size: total n_words including the 256 special tokens (> 512).
    max_token_chars: longest token in characters (None for no limit); caps tokens made of long runs.
    show_progress: the trainer's progress bars (default: when stderr is a terminal).
    Returns the loaded Tokenizer and TrainStats.
    """
    from tokenizers import Regex, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    n_bpe = int(vocab_size) - NUM_SPECIAL_TOKENS
    if n_bpe < 256 + 1:
        raise HerdError(f"--vocab-size {vocab_size} leaves no room for merges: it counts 256 single bytes and "
                        f"256 special tokens, so pass at least {2 * 256 + 1}.")
    out = Path(out_path)
    counts = {"documents": 0, "characters": 0, "bytes": 0, "skipped": 0}

    files: list[Path] = []
    texts: list[str] = []
    explicit: set[Path] = set()  # files named directly must be UTF-8; files found in folders may be skipped
    for item in inputs:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and len(item) < 4096
                                             and "\n" not in item and os.path.exists(item)):
            found = list(iter_files([item], glob))
            if Path(item).is_file():
                explicit.update(found)
            files.extend(found)
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise HerdError(f"train_bpe inputs must be paths or strings, got {type(item).__name__}.")
    if not files and not texts:
        raise HerdError("no training text found; pass files, folders or texts (check --glob).")

    def documents() -> Iterator[str]:
        for text in texts:
            counts["documents"] += 1
            counts["characters"] += len(text)
            counts["bytes"] += len(text.encode("utf-8"))
            yield text
        for f in files:
            n_before = counts["documents"]
            for doc in read_documents(f, strict=f in explicit):
                counts["documents"] += 1
                counts["characters"] += len(doc)
                counts["bytes"] += len(doc.encode("utf-8"))
                yield doc
            if counts["documents"] == n_before and f.stat().st_size > 0:
                counts["skipped"] += 1

    failure: list[BaseException] = []

    def guarded() -> Iterator[str]:
        # an exception raised inside the trainer's iterator does not reach the caller intact,
        # so stop feeding text and re-raise it after train_from_iterator returns
        try:
            yield from documents()
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            failure.append(e)

    hf = HFTokenizer(BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=min_frequency, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
                                  max_token_length=max_token_chars)
    t0 = time.perf_counter()
    hf.train_from_iterator(guarded(), trainer)
    seconds = time.perf_counter() - t0
    if failure:
        raise failure[0]

    to_byte = {ch: b for b, ch in _byte_to_unicode().items()}
    vocab = hf.get_vocab()  # byte-level string -> id, ids in the order tokens were learned
    learned = sorted(vocab.items(), key=lambda kv: kv[1])
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for token, _ in learned:
        raw = bytes(to_byte[ch] for ch in token)
        if raw not in ranks:
            ranks[raw] = len(ranks)
    if len(ranks) < n_bpe:
        raise HerdError(f"the corpus only supports {len(ranks)} BPE tokens (+256 special = {len(ranks) + 256}), "
                        f"fewer than --vocab-size {vocab_size}; pass more text or a smaller --vocab-size.")
    ranks = _reachable(ranks)
    write_tiktoken(ranks, out)
    tok = Tokenizer.from_file(out)
    return tok, TrainStats(n_words=tok.n_words, n_bpe=tok.n_bpe, documents=counts["documents"],
                           characters=counts["characters"], bytes=counts["bytes"], seconds=seconds,
                           skipped_files=counts["skipped"])


def _reachable(ranks: dict[bytes, int]) -> dict[bytes, int]:
    """Check that tiktoken's merging turns every token's bytes back into that one token.

    HF's trainer records one merge (left, right) per token; tiktoken merges any adjacent pair whose
    concatenation has the lowest rank. A token that tiktoken could never produce would waste an
    embedding row, so fail loudly if the export ever yields one.
    """
    import tiktoken

    enc = tiktoken.Encoding(name="check", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    bad = [t for t, r in ranks.items() if enc._encode_single_piece(t) != [r]]
    if bad:
        raise HerdError(f"{len(bad)} trained tokens cannot be reproduced by tiktoken (e.g. {bad[0]!r}); "
                        "retrain with a different --min-frequency.")
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write `base64(token) rank` lines in rank order, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [base64.b64encode(t).decode("ascii") + f" {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    with atomic_open(path, "w", encoding="ascii") as f:
        f.writelines(lines)
