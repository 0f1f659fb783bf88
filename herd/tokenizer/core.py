"""The Llama 3 tokenizer on tiktoken: loading tokenizer.model files, encoding and decoding.

Owns the exact pre-tokenization pattern, the 256 special tokens with their Llama 3.1 names, and
the splitting Meta's reference does before tiktoken sees the text (400,000-character chunks, then
no more than 25,000 consecutive whitespace or non-whitespace characters per piece). The same code
loads vocabularies trained by `herd tokenizer train` (any number of BPE ranks, specials appended).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import tiktoken

from herd.errors import HerdError

if TYPE_CHECKING:
    from herd.tokenizer.stream import StreamDecoder

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama 3's pre-tokenization regex exactly as in Meta's reference."""

OFFICIAL_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
"""sha256 of Meta's Llama 3 / 3.1 / 3.2 tokenizer.model (128,000 ranks)."""

NUM_SPECIAL_TOKENS = 256
MAX_ENCODE_CHARS = 400_000  # tiktoken's Rust side slows down on very long inputs
MAX_RUN_CHARS = 25_000  # ... and on very long runs of (non-)whitespace inside one regex match

_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
SPECIAL_TOKEN_NAMES: list[str] = _NAMED_SPECIALS + [
    f"<|reserved_special_token_{3 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS))]
"""The 256 special tokens in id order (Llama 3.1 names; Llama 3.2's tokenizer.json calls 128005
`<|step_id|>` and numbers the reserved tokens from 2 at 128011; the ids herd uses are the same)."""

# Runs longer than MAX_RUN_CHARS of whitespace (str.isspace, which is what `\s` means in `re`)
# or of non-whitespace. The lookbehinds make the scan start only at run boundaries, so finding
# them costs a few steps per character instead of one attempt per character per run length.
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))


def _has_long_run(chunk: str) -> bool:
    """Whether `chunk` holds a run of more than MAX_RUN_CHARS whitespace or non-whitespace characters.

    Every such run covers one of the positions 0, L, 2L, ... (L = MAX_RUN_CHARS), so it is enough to
    measure the run through each of those positions. str.strip/split use str.isspace, like Meta's
    loop, and scan only the run itself, so this costs almost nothing next to a full regex scan.
    """
    n, limit = len(chunk), MAX_RUN_CHARS
    for p in range(0, n, limit):
        after, before = chunk[p:p + limit + 1], chunk[max(0, p - limit):p]
        if chunk[p].isspace():
            run = (len(after) - len(after.lstrip())) + (len(before) - len(before.rstrip()))
        else:
            run = len(after.split(None, 1)[0]) + (len(before.rsplit(None, 1)[-1]) if before and not before[-1].isspace() else 0)
        if run > limit:
            return True
    return False


def split_for_tiktoken(text: str) -> list[str]:
    """Meta's pieces: 400,000-char chunks, each cut so no run of (non-)whitespace exceeds 25,000 chars.

    Gives the same pieces as the reference's character loop: a run longer than the limit is cut
    every 25,000 characters counted from the start of the run (the start of the chunk for a run
    the chunk begins inside).
    """
    pieces: list[str] = []
    for start in range(0, max(len(text), 1), MAX_ENCODE_CHARS):
        chunk = text[start:start + MAX_ENCODE_CHARS]
        if len(chunk) <= MAX_RUN_CHARS:
            pieces.append(chunk)
            continue
        if not _has_long_run(chunk):
            pieces.append(chunk)
            continue
        cut = 0
        for m in _LONG_RUN.finditer(chunk):
            for pos in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
                pieces.append(chunk[cut:pos])
                cut = pos
        pieces.append(chunk[cut:])
    return pieces


def _read_ranks(path: Path) -> tuple[dict[bytes, int], str]:
    """Parse a tiktoken file (`base64(token) rank` per line) into ranks, plus the file's sha256."""
    if not path.is_file():
        raise HerdError(f"tokenizer file '{path}' does not exist; pass the path of a Llama 3 "
                        "tokenizer.model or a file written by `herd tokenizer train`.")
    data = path.read_bytes()
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except ValueError:
            raise HerdError(f"tokenizer file '{path}' is malformed at line {lineno} (expected "
                            "'<base64 token> <rank>'); pass a tiktoken-format tokenizer.model.") from None
        ranks[token] = rank
    if not ranks:
        raise HerdError(f"tokenizer file '{path}' holds no tokens; pass a tiktoken-format tokenizer.model.")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise HerdError(f"tokenizer file '{path}' does not number its {len(ranks)} tokens 0..{len(ranks) - 1} "
                        "without gaps or repeats; re-export it with `herd tokenizer train`.")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise HerdError(f"tokenizer file '{path}' lacks {len(missing)} of the 256 single bytes, so some text "
                        "could not be encoded; re-export it with `herd tokenizer train`.")
    return ranks, hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> tuple[dict[bytes, int], str, tiktoken.Encoding]:
    """Parse + build once per file version: loading the 128K official ranks takes ~0.3 s, and data,
    training and serving code all load the same file. tiktoken Encodings are immutable and thread-safe."""
    ranks, digest = _read_ranks(Path(path))
    n = len(ranks)
    specials = {tok: n + i for i, tok in enumerate(SPECIAL_TOKEN_NAMES)}
    model = tiktoken.Encoding(name=Path(path).stem, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return ranks, digest, model


class Tokenizer:
    """Llama 3 byte-level BPE tokenizer (tiktoken) with the 256 Llama 3.1 special tokens.

    Special-token strings inside ordinary text are encoded as plain text unless `allowed_special`
    names them, as in Meta's reference; decode() never fails (invalid UTF-8 becomes U+FFFD).
    """

    pattern = PATTERN

    def __init__(self, mergeable_ranks: dict[bytes, int], *, name: str = "llama3",
                 path: str | os.PathLike | None = None, sha256: str | None = None,
                 _model: tiktoken.Encoding | None = None) -> None:
        self.n_bpe = len(mergeable_ranks)
        self.special_tokens: dict[str, int] = {
            tok: self.n_bpe + i for i, tok in enumerate(SPECIAL_TOKEN_NAMES)}
        self.model = _model or tiktoken.Encoding(name=name, pat_str=PATTERN, mergeable_ranks=mergeable_ranks,
                                                 special_tokens=self.special_tokens)
        core = getattr(self.model, "_core_bpe", None)
        self._core_encode_ordinary = core.encode_ordinary if core is not None else self.model.encode_ordinary
        self.n_words: int = self.n_bpe + NUM_SPECIAL_TOKENS
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.start_header_id: int = self.special_tokens["<|start_header_id|>"]
        self.end_header_id: int = self.special_tokens["<|end_header_id|>"]
        self.stop_tokens: set[int] = {self.eos_id, self.eom_id, self.eot_id}
        self.path: str | None = None if path is None else str(path)
        self.sha256: str | None = sha256

    def _encode_ordinary(self, text: str) -> list[int]:
        # tiktoken's Rust core directly: its Python wrapper only adds a retry for lone surrogates,
        # which we keep, and per-call overhead matters for short documents
        try:
            return self._core_encode_ordinary(text)
        except UnicodeEncodeError:
            return self.model.encode_ordinary(text)

    @classmethod
    def from_file(cls, path: str | os.PathLike, expected_sha256: str | None = None) -> "Tokenizer":
        """Load a tiktoken-format file (Meta's tokenizer.model or one from `herd tokenizer train`).

        A directory is accepted too: its tokenizer.model is loaded (e.g. a checkpoint folder).
        """
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.model"
        if not p.is_file():
            raise HerdError(f"tokenizer file '{p}' does not exist; pass the path of a Llama 3 "
                            "tokenizer.model or a file written by `herd tokenizer train`.")
        st = p.stat()
        ranks, digest, model = _load_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise HerdError(f"tokenizer file '{p}' has sha256 {digest}, not the expected {expected_sha256}; "
                            "use the tokenizer the model was trained with.")
        return cls(ranks, name=p.stem, path=p, sha256=digest, _model=model)

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allowed_special: Collection[str] | Literal["all"] = ()) -> list[int]:
        """Token ids of `text`; special-token strings count as text unless listed in `allowed_special`."""
        if not isinstance(text, str):
            raise HerdError(f"Tokenizer.encode takes a str, got {type(text).__name__}; decode bytes as UTF-8 first.")
        if not allowed_special:
            pieces = [text] if len(text) <= MAX_RUN_CHARS else split_for_tiktoken(text)
            if len(pieces) == 1:  # the common case: no copying
                ids = self._encode_ordinary(pieces[0])
            else:
                ids = []
                for piece in pieces:
                    ids.extend(self._encode_ordinary(piece))
            if bos:
                ids.insert(0, self.bos_id)
            if eos:
                ids.append(self.eos_id)
            return ids
        ids: list[int] = [self.bos_id] if bos else []
        allowed = "all" if allowed_special == "all" else set(allowed_special)
        for piece in split_for_tiktoken(text):
            ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = 2) -> list[list[int]]:
        """encode() of many texts on `num_threads` threads (tiktoken releases the GIL while encoding)."""
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise HerdError(f"encode_batch takes a list of str; item {i} is {type(text).__name__}.")
            if len(text) <= MAX_RUN_CHARS:
                pieces.append(text)
                owners.append(i)
            else:
                for piece in split_for_tiktoken(text):
                    pieces.append(piece)
                    owners.append(i)
        encoded = self.model.encode_ordinary_batch(pieces, num_threads=num_threads)
        out: list[list[int]] = [[self.bos_id] if bos else [] for _ in texts]
        for i, ids in zip(owners, encoded):
            out[i].extend(ids)
        if eos:
            for ids in out:
                ids.append(self.eos_id)
        return out

    # -- decoding -----------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; bytes that do not form valid UTF-8 become U+FFFD."""
        ids = list(ids)
        try:
            return self.model.decode(ids)
        except (KeyError, OverflowError, TypeError):
            raise self._bad_ids(ids) from None

    def _bad_ids(self, ids: list) -> HerdError:
        for i in ids:
            if not isinstance(i, int) and not hasattr(i, "__index__"):
                return HerdError(f"token ids must be integers, got {type(i).__name__} {i!r}.")
            if not 0 <= int(i) < self.n_words:
                return HerdError(f"token id {int(i)} is outside this tokenizer's vocabulary (0..{self.n_words - 1}); "
                                 "decode with the tokenizer the ids came from.")
        return HerdError("token ids could not be decoded; pass a list of integer ids.")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of token ids (special tokens as their strings)."""
        ids = list(ids)
        try:
            return self.model.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            raise self._bad_ids(ids) from None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for."""
        if not 0 <= token_id < self.n_words:
            raise HerdError(f"token id {token_id} is outside this tokenizer's vocabulary (0..{self.n_words - 1}); "
                            "decode with the tokenizer the ids came from.")
        return self.model.decode_single_token_bytes(token_id)

    def stream_decoder(self) -> "StreamDecoder":
        """An incremental decoder: push ids one at a time, get text only once characters are complete."""
        from herd.tokenizer.stream import StreamDecoder

        return StreamDecoder(self)

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.n_bpe

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, n_words={self.n_words})"

