"""SFT data: chat files -> rendered, length-checked, split examples (SFTDataset) and a DataReport.

    data = build_sft_data(SFTDataConfig(data=["chats.jsonl"], max_seq_len=2048), tokenizer)
    data.train, data.val      SFTDataset: every example's ids and loss mask in three flat arrays
    data.report               DataReport: read / kept / truncated / dropped (by reason)

Examples longer than max_seq_len tokens are cut to that length (overlong="truncate"; an example
left with nothing to learn is dropped) or dropped (overlong="drop"). The validation split is
chosen by hashing each record's "id" field, or its content when it has none, with the seed: the
same record lands in the same split whatever the file order or the number of files. Nothing is
shuffled here; the batch loader shuffles (herd.posttrain.packing).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from herd import fileio
from herd.data.pack import is_validation
from herd.errors import HerdError
from herd.posttrain.records import data_files, iter_records
from herd.posttrain.render import TEXT_PAIRS, RecordError, render, to_conversation
from herd.posttrain.report import DataReport
from herd.tokenizer.chat import DEFAULT_DATE, TRAIN_ON, ChatFormat

OVERLONG = ("truncate", "drop")


@dataclass
class SFTDataConfig:
    """How chat data becomes training examples (flags of `herd sft`)."""

    data: list[str] = field(default_factory=list)
    """Chat data: jsonl(.gz/.zst), json or parquet files or folders of TRL's {"messages": [...]} or {"prompt", "completion"} records."""
    chat_style: str = "hf"
    """Chat format: hf (Llama 3.1 Instruct's template, with its system date lines) or meta (Meta's plain dialog format)."""
    train_on: str = "assistant"
    """Tokens the loss learns: assistant (every assistant reply and its end token), last (the last reply only) or all."""
    max_seq_len: int = 2048
    """Longest example in tokens (and the length of a packed row)."""
    overlong: str = "truncate"
    """Examples over max_seq_len: truncate (keep the first max_seq_len tokens) or drop."""
    val_fraction: float = 0.02
    """Fraction of records held out for validation (chosen by a stable hash of each record)."""
    seed: int = 0
    """Seed of the validation hash and of the batch order."""
    text_pairs: str = "chat"
    """Prompt/completion strings: chat (a user turn and an assistant reply) or text (raw text, for base models)."""
    date_string: str = DEFAULT_DATE
    """'Today Date' of the hf chat style's system header."""

    def validate(self) -> None:
        """HerdError for settings that cannot work."""
        if not self.data:
            raise HerdError("no chat data given; pass --data with jsonl/parquet files or folders.")
        for name, value, allowed in (("chat-style", self.chat_style, ("hf", "meta")),
                                     ("train-on", self.train_on, TRAIN_ON), ("overlong", self.overlong, OVERLONG),
                                     ("text-pairs", self.text_pairs, TEXT_PAIRS)):
            if value not in allowed:
                raise HerdError(f"unknown --{name} '{value}'; use one of: {', '.join(allowed)}.")
        if self.max_seq_len < 2:
            raise HerdError(f"--max-seq-len must be at least 2 tokens, got {self.max_seq_len}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise HerdError(f"--val-fraction must be in [0, 1), got {self.val_fraction}.")


class SFTDataset:
    """Rendered examples in three flat arrays: tokens int32, mask bool (True = learned), offsets int64 [n + 1].

    Example i is tokens[offsets[i]:offsets[i + 1]] with its mask. `mask[j]` says token j is a
    learned target, so the loss of predicting it from tokens[:j] counts; the first token (bos) is
    never a target.
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray) -> None:
        self.tokens, self.mask, self.offsets = tokens, mask, offsets

    @classmethod
    def from_examples(cls, examples: list[tuple[list[int], list[bool]]]) -> "SFTDataset":
        lengths = np.fromiter((len(ids) for ids, _ in examples), dtype=np.int64, count=len(examples))
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter((t for ids, _ in examples for t in ids), dtype=np.int32, count=int(offsets[-1]))
        mask = np.fromiter((m for _, ms in examples for m in ms), dtype=bool, count=int(offsets[-1]))
        return cls(tokens, mask, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n], mask bool [n]) of example i."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.mask[a:b]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example, int64 [n]."""
        return np.diff(self.offsets)

    def learned_tokens(self) -> int:
        """Targets the loss learns (mask True, first tokens excluded)."""
        return int(self.mask.sum() - self.mask[self.offsets[:-1]].sum()) if len(self) else 0

    def fingerprint(self) -> str:
        """sha256 of the tokens, mask and boundaries (to check a resumed run trains on the same data)."""
        h = hashlib.sha256()
        for a in (self.tokens, self.mask, self.offsets):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz file atomically."""
        with fileio.atomic_open(path, "wb") as f:
            np.savez(f, tokens=self.tokens, mask=self.mask, offsets=self.offsets)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SFTDataset":
        try:
            with np.load(path) as z:
                return cls(z["tokens"], z["mask"], z["offsets"])
        except (OSError, KeyError, ValueError) as e:
            raise HerdError(f"cannot read SFT examples from {path} ({e}); delete it to re-render the data.") from None


@dataclass
class SFTData:
    """The result of build_sft_data."""

    train: SFTDataset
    val: SFTDataset
    report: DataReport


def record_key(record: dict[str, Any]) -> str:
    """What the validation hash sees: the record's "id" if it has one, else its canonical JSON."""
    rid = record.get("id")
    if isinstance(rid, (str, int)) and not isinstance(rid, bool):
        return f"id:{rid}"
    return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)


def build_sft_data(cfg: SFTDataConfig, tokenizer: Any, progress: bool = True) -> SFTData:
    """Read, render, length-check and split the chat data of `cfg`; HerdError if no example is usable."""
    cfg.validate()
    report = DataReport()
    files = data_files(cfg.data, report)
    chat = ChatFormat(tokenizer, style=cfg.chat_style, date_string=cfg.date_string)
    train: list[tuple[list[int], list[bool]]] = []
    val: list[tuple[list[int], list[bool]]] = []
    records = iter_records(files, report)
    for where, record in tqdm(records, desc="rendering chats", unit=" records", disable=not progress,
                              mininterval=1.0, delay=2.0):  # a bar only when it takes a while
        try:
            ids, mask = render(to_conversation(record, cfg.text_pairs), chat, cfg.train_on)
        except RecordError as e:
            report.count(e.reason, where, e.detail)
            continue
        if len(ids) > cfg.max_seq_len:
            if cfg.overlong == "drop":
                report.count("too_long", where, f"{len(ids)} tokens")
                continue
            ids, mask = ids[:cfg.max_seq_len], mask[:cfg.max_seq_len]
            if not any(mask[1:]):
                report.count("nothing_left_after_truncation", where, f"learned tokens start after {cfg.max_seq_len}")
                continue
            report.truncated += 1
        elif not any(mask[1:]):  # e.g. an assistant turn with empty content and no end token to learn
            report.count("no_assistant_turn", where, "no token to learn")
            continue
        held = is_validation(record_key(record), cfg.val_fraction, cfg.seed)
        (val if held else train).append((ids, mask))
        report.tokens += len(ids)
        report.trained_tokens += sum(mask[1:])
    report.train, report.val = len(train), len(val)
    report.kept = report.train + report.val
    what = ", ".join(map(str, cfg.data))
    if not report.kept:
        raise report.nothing_usable(what)
    if not train:
        raise HerdError(f"all {report.kept} usable examples of {what} fell into the validation split; "
                        "lower --val-fraction or add data.")
    return SFTData(SFTDataset.from_examples(train), SFTDataset.from_examples(val), report)


def load_tokenizer_for(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                       vocab_size: int | None = None) -> Any:
    """The tokenizer to fine-tune `checkpoint` with: the one stored beside it, or `tokenizer` if it is the same.

    A tokenizer that differs from the checkpoint's (sha256) would turn the data into ids the model
    learned for other text, so it is refused; so is one with more tokens than the model's vocabulary.
    """
    from herd.checkpoint import find_tokenizer
    from herd.tokenizer import Tokenizer

    stored = find_tokenizer(checkpoint)
    if tokenizer is None and stored is None:
        raise HerdError(f"no tokenizer.model beside the checkpoint {checkpoint}; pass --tokenizer with the "
                        "tokenizer the model was trained with.")
    tok = Tokenizer.from_file(tokenizer if tokenizer is not None else stored)
    if tokenizer is not None and stored is not None:
        have = Tokenizer.from_file(stored)
        if have.sha256 != tok.sha256:
            raise HerdError(f"--tokenizer {tokenizer} differs from the checkpoint's own {stored} (sha256 "
                            f"{tok.sha256[:12]}... vs {have.sha256[:12]}...), so the data would become ids the model "
                            "learned for other text; drop --tokenizer to use the checkpoint's.")
    if vocab_size is not None and tok.n_words > vocab_size:
        raise HerdError(f"the tokenizer has {tok.n_words} tokens but the model only {vocab_size}; use the tokenizer "
                        "the model was trained with.")
    return tok
