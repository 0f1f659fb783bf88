"""Preference data: files -> rendered, length-checked, split examples (PreferenceDataset) and a report.

    data = build_preference_data(PreferenceDataConfig(data=["prefs.jsonl"], max_seq_len=1024), tokenizer)
    data.train, data.val      PreferenceDataset: each example's prompt and ranked responses in flat arrays
    data.report               PreferenceReport: read / kept / truncated / dropped (by reason), pairs

What is dropped, by reason (each counted, with the first few file:line kept): records of no known
format or with malformed messages, responses that share no prompt, a prompt that alone fills
max_seq_len (nothing of a response would be left), a chosen or rejected response with no text
(only the chat format's header and end tokens), chosen and rejected that are the same tokens (no
preference to learn), and with overlong="drop" a prompt + response over max_seq_len. With
overlong="truncate" (TRL's keep_start) a response is cut so prompt + response fits. An edited
response (Llama 3's ranked form) that is empty or repeats another response is dropped alone and
the record kept as a pair.

The validation split is the SFT data's: a stable hash of each record's "id" (or its content) with
the seed, independent of file order.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from herd import fileio
from herd.data.pack import is_validation
from herd.errors import HerdError
from herd.posttrain.dataset import OVERLONG, record_key
from herd.posttrain.preference import RANKS, RenderedPreference, render_preference, to_preference
from herd.posttrain.records import data_files, iter_records
from herd.posttrain.render import TEXT_PAIRS, RecordError
from herd.posttrain.report import REASONS, DataReport
from herd.tokenizer.chat import DEFAULT_DATE, ChatFormat

PREFERENCE_REASONS: dict[str, str] = {
    **{k: v for k, v in REASONS.items() if k.endswith("_files") or k in ("malformed_json", "unknown_role")},
    "unknown_format": "a record without both 'chosen' and 'rejected'",
    "bad_messages": "chosen / rejected / prompt that are neither strings nor lists of {'role', 'content'} dicts, "
                    "or content / tool calls of the wrong type",
    "no_shared_prompt": "implicit-prompt conversations that do not start with the same messages",
    "prompt_too_long": "the prompt alone fills max_seq_len tokens",
    "too_long": "prompt + a response longer than max_seq_len tokens (overlong=drop)",
    "empty_response": "a chosen or rejected response with no text (only the chat format's header and end tokens)",
    "identical_responses": "chosen and rejected are the same tokens",
}


@dataclass
class PreferenceDataConfig:
    """How preference data becomes examples (flags of `herd reward` and `herd dpo`)."""

    data: list[str] = field(default_factory=list)
    """Preference data: jsonl(.gz/.zst), json or parquet files or folders of TRL's {"prompt", "chosen", "rejected"} records (strings or message lists; implicit prompt; optional "edited" ranked above chosen)."""
    chat_style: str = "hf"
    """Chat format: hf (Llama 3.1 Instruct's template, with its system date lines) or meta (Meta's plain dialog format)."""
    max_seq_len: int = 2048
    """Longest prompt + response in tokens."""
    overlong: str = "truncate"
    """A prompt + response over max_seq_len: truncate (cut the response) or drop the record."""
    val_fraction: float = 0.02
    """Fraction of records held out for validation (chosen by a stable hash of each record)."""
    seed: int = 0
    """Seed of the validation hash and of the batch order."""
    text_pairs: str = "chat"
    """String prompt/responses: chat (a user turn and an assistant reply) or text (raw text, for base models)."""
    date_string: str = DEFAULT_DATE
    """'Today Date' of the hf chat style's system header."""
    edited: bool = True
    """Use the 'edited' response of Llama 3's ranked records (edited > chosen > rejected: three pairs)."""

    def validate(self) -> None:
        """HerdError for settings that cannot work."""
        if not self.data:
            raise HerdError("no preference data given; pass --data with jsonl/parquet files or folders.")
        for name, value, allowed in (("chat-style", self.chat_style, ("hf", "meta")), ("overlong", self.overlong, OVERLONG),
                                     ("text-pairs", self.text_pairs, TEXT_PAIRS)):
            if value not in allowed:
                raise HerdError(f"unknown --{name} '{value}'; use one of: {', '.join(allowed)}.")
        if self.max_seq_len < 2:
            raise HerdError(f"--max-seq-len must be at least 2 tokens, got {self.max_seq_len}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise HerdError(f"--val-fraction must be in [0, 1), got {self.val_fraction}.")


@dataclass
class PreferenceReport(DataReport):
    """DataReport for preference data: `kept` counts records, `pairs` the preferences they give."""

    pairs: int = 0
    """Preference pairs of the kept records (a ranked triple gives three)."""
    ranked: int = 0
    """Kept records with an edited response (edited > chosen > rejected)."""
    edited_dropped: int = 0
    """Edited responses dropped (empty, or the same tokens as chosen or rejected); their records stay pairs."""
    reasons: ClassVar[dict[str, str]] = PREFERENCE_REASONS
    kind: ClassVar[str] = "preference pair"
    formats: ClassVar[str] = ("TRL's preference format {'prompt', 'chosen', 'rejected'} (strings or message lists, "
                              "or chosen/rejected conversations with an implicit shared prompt)")

    def format(self) -> str:
        lines = super().format().splitlines()
        lines[0] = (f"read {self.records:,} records from {self.files} file(s): kept {self.kept:,} "
                    f"({self.train:,} train, {self.val:,} val) giving {self.pairs:,} pairs ({self.ranked:,} ranked "
                    f"triples), truncated {self.truncated:,}, dropped {self.dropped_records:,}"
                    + (f" and {self.edited_dropped:,} edited responses" if self.edited_dropped else "")
                    + f"; {self.tokens:,} tokens")
        return "\n".join(lines)


class PreferenceDataset:
    """Rendered preference examples in flat arrays.

    Example i has prompt_tokens[prompt_offsets[i]:prompt_offsets[i + 1]] and responses
    first_response[i] .. first_response[i + 1] - 1, best first; response j is
    response_tokens[response_offsets[j]:response_offsets[j + 1]] with its formatting mask and rank
    (0 edited, 1 chosen, 2 rejected). margin[i] is NaN when the record gave none.
    """

    _ARRAYS = ("prompt_tokens", "prompt_offsets", "response_tokens", "response_formatting", "response_offsets",
               "response_rank", "first_response", "margin")

    def __init__(self, prompt_tokens: np.ndarray, prompt_offsets: np.ndarray, response_tokens: np.ndarray,
                 response_formatting: np.ndarray, response_offsets: np.ndarray, response_rank: np.ndarray,
                 first_response: np.ndarray, margin: np.ndarray) -> None:
        self.prompt_tokens, self.prompt_offsets = prompt_tokens, prompt_offsets
        self.response_tokens, self.response_formatting = response_tokens, response_formatting
        self.response_offsets, self.response_rank = response_offsets, response_rank
        self.first_response, self.margin = first_response, margin

    @classmethod
    def from_examples(cls, examples: list[RenderedPreference]) -> "PreferenceDataset":
        def offsets(lengths: list[int]) -> np.ndarray:
            out = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=out[1:])
            return out

        responses = [r for e in examples for r in e.responses]
        return cls(
            np.array([t for e in examples for t in e.prompt], dtype=np.int32),
            offsets([len(e.prompt) for e in examples]),
            np.array([t for r in responses for t in r], dtype=np.int32),
            np.array([f for e in examples for m in e.formatting for f in m], dtype=bool),
            offsets([len(r) for r in responses]),
            np.array([RANKS.index(n) for e in examples for n in e.names], dtype=np.int8),
            offsets([len(e.responses) for e in examples]),
            np.array([np.nan if e.margin is None else e.margin for e in examples], dtype=np.float32))

    def __len__(self) -> int:
        return len(self.prompt_offsets) - 1

    def prompt(self, i: int) -> np.ndarray:
        """Prompt ids of example i, int32 [P]."""
        return self.prompt_tokens[self.prompt_offsets[i]:self.prompt_offsets[i + 1]]

    def responses(self, i: int) -> range:
        """Indices of example i's responses, best first."""
        return range(int(self.first_response[i]), int(self.first_response[i + 1]))

    def response(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [L], formatting bool [L]) of response j."""
        a, b = int(self.response_offsets[j]), int(self.response_offsets[j + 1])
        return self.response_tokens[a:b], self.response_formatting[a:b]

    @property
    def n_responses(self) -> int:
        return len(self.response_offsets) - 1

    @property
    def n_pairs(self) -> int:
        """Preference pairs: k responses ranked give k (k - 1) / 2."""
        k = np.diff(self.first_response)
        return int((k * (k - 1) // 2).sum())

    def lengths(self) -> np.ndarray:
        """Tokens of each example (prompt once + every response), int64 [n]."""
        per_response = np.diff(self.response_offsets)
        sums = np.add.reduceat(per_response, self.first_response[:-1]) if len(self) else np.zeros(0, np.int64)
        return np.diff(self.prompt_offsets) + sums

    def fingerprint(self) -> str:
        """sha256 of every array (to check that a resumed run or a reference cache sees the same data)."""
        h = hashlib.sha256()
        for name in self._ARRAYS:
            h.update(np.ascontiguousarray(getattr(self, name)).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz file atomically."""
        with fileio.atomic_open(path, "wb") as f:
            np.savez(f, **{name: getattr(self, name) for name in self._ARRAYS})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PreferenceDataset":
        try:
            with np.load(path) as z:
                return cls(*(z[name] for name in cls._ARRAYS))
        except (OSError, KeyError, ValueError) as e:
            raise HerdError(f"cannot read preference examples from {path} ({e}); delete it to re-render the data.") from None


@dataclass
class PreferenceData:
    """The result of build_preference_data."""

    train: PreferenceDataset
    val: PreferenceDataset
    report: PreferenceReport


def _has_text(formatting: list[bool]) -> bool:
    return not all(formatting)


def check_lengths(ex: RenderedPreference, max_seq_len: int, overlong: str) -> tuple[RenderedPreference, bool]:
    """The example with every prompt + response within max_seq_len (responses cut), and whether any was cut;
    RecordError prompt_too_long / too_long."""
    room = max_seq_len - len(ex.prompt)
    if room < 1:
        raise RecordError("prompt_too_long", f"prompt of {len(ex.prompt)} tokens, max_seq_len {max_seq_len}")
    longest = max(len(r) for r in ex.responses)
    if longest <= room:
        return ex, False
    if overlong == "drop":
        raise RecordError("too_long", f"{len(ex.prompt) + longest} tokens")
    return RenderedPreference(ex.prompt, [r[:room] for r in ex.responses], [m[:room] for m in ex.formatting],
                              ex.names, ex.margin), True


def clean_responses(ex: RenderedPreference) -> tuple[RenderedPreference, int]:
    """Drop an edited response that is empty or repeats another (returned count); RecordError empty_response /
    identical_responses for chosen and rejected."""
    keep, dropped = [], 0
    for k, name in enumerate(ex.names):
        if name == "edited" and (not _has_text(ex.formatting[k]) or ex.responses[k] in ex.responses[k + 1:]):
            dropped += 1
            continue
        if not _has_text(ex.formatting[k]):
            raise RecordError("empty_response", f"'{name}' has no text")
        keep.append(k)
    chosen, rejected = ex.names.index("chosen"), ex.names.index("rejected")
    if ex.responses[chosen] == ex.responses[rejected]:
        raise RecordError("identical_responses", f"{len(ex.responses[chosen])} identical tokens")
    return RenderedPreference(ex.prompt, [ex.responses[k] for k in keep], [ex.formatting[k] for k in keep],
                              [ex.names[k] for k in keep], ex.margin), dropped


def build_preference_data(cfg: PreferenceDataConfig, tokenizer: Any, progress: bool = True) -> PreferenceData:
    """Read, render, length-check, clean and split the preference data of `cfg`; HerdError if no pair is usable."""
    cfg.validate()
    report = PreferenceReport()
    files = data_files(cfg.data, report)
    chat = ChatFormat(tokenizer, style=cfg.chat_style, date_string=cfg.date_string)
    train: list[RenderedPreference] = []
    val: list[RenderedPreference] = []
    for where, record in tqdm(iter_records(files, report), desc="rendering preferences", unit=" records",
                              disable=not progress, mininterval=1.0, delay=2.0):
        try:
            ex = render_preference(to_preference(record, cfg.text_pairs, cfg.edited), chat)
            ex, cut = check_lengths(ex, cfg.max_seq_len, cfg.overlong)
            ex, dropped = clean_responses(ex)
        except RecordError as e:
            report.count(e.reason, where, e.detail)
            continue
        report.truncated += cut
        report.edited_dropped += dropped
        report.ranked += len(ex.responses) == 3
        report.pairs += len(ex.responses) * (len(ex.responses) - 1) // 2
        report.tokens += len(ex.prompt) + sum(len(r) for r in ex.responses)
        report.trained_tokens += sum(len(r) for r in ex.responses)
        (val if is_validation(record_key(record), cfg.val_fraction, cfg.seed) else train).append(ex)
    report.train, report.val = len(train), len(val)
    report.kept = report.train + report.val
    what = ", ".join(map(str, cfg.data))
    if not report.kept:
        raise report.nothing_usable(what)
    if not train:
        raise HerdError(f"all {report.kept} usable preference records of {what} fell into the validation split; "
                        "lower --val-fraction or add data.")
    return PreferenceData(PreferenceDataset.from_examples(train), PreferenceDataset.from_examples(val), report)
