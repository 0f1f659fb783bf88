"""JSON mode: a byte-level pushdown automaton for "is this a prefix of valid JSON?", and the token
constraint built on it that keeps a generated reply valid JSON (OpenAI's response_format
{"type": "json_object"}: the reply is one JSON object).

The automaton follows the grammar of RFC 8259 (objects, arrays, strings with escapes, numbers,
true/false/null, whitespace) one byte at a time; its state is an immutable tuple, so checking a
candidate token is a walk over the token's bytes from the current state with no copying. Bytes of
multi-byte UTF-8 characters are accepted inside strings (they cannot be JSON syntax). Once the
top-level object is closed only the request's stop tokens may follow, so generation ends there.
Special tokens (other than the stop tokens at the end) are never allowed inside the JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')


class State(NamedTuple):
    mode: str  # what the next byte may be (see step())
    stack: tuple[str, ...]  # "{" / "[" for each open container
    rest: bytes = b""  # the remaining bytes of a literal (true/false/null) or the \\u digits left


START_OBJECT = State("top", ())
"""Before the top-level value, which must be an object (json_object mode)."""
START_VALUE = State("value", ())
"""Before any top-level JSON value."""


def _after_value(stack: tuple[str, ...]) -> State:
    return State("after", stack)


def _start_value(b: int, stack: tuple[str, ...]) -> State | None:
    if b == ord("{"):
        return State("key_or_end", stack + ("{",))
    if b == ord("["):
        return State("value_or_end", stack + ("[",))
    if b == ord('"'):
        return State("string", stack)
    if b == ord("-"):
        return State("minus", stack)
    if b == ord("0"):
        return State("zero", stack)
    if b in DIGITS:
        return State("int", stack)
    for lit in (b"true", b"false", b"null"):
        if b == lit[0]:
            return State("literal", stack, lit[1:])
    return None


def _end_number(b: int, stack: tuple[str, ...]) -> State | None:
    """A byte that is not part of the number ends it and is read as what follows a value."""
    return step(_after_value(stack), b)


def step(s: State, b: int) -> State | None:
    """The state after byte b, or None if b cannot come next in valid JSON."""
    mode, stack = s.mode, s.stack
    if mode == "string":
        if b == ord('"'):
            return _after_value(stack)
        if b == ord("\\"):
            return State("escape", stack)
        return None if b < 0x20 else s
    if mode == "key":
        if b == ord('"'):
            return State("colon", stack)
        if b == ord("\\"):
            return State("key_escape", stack)
        return None if b < 0x20 else s
    if mode in ("escape", "key_escape"):
        back = "string" if mode == "escape" else "key"
        if b == ord("u"):
            return State("unicode", stack, back.encode() + b":4")
        return State(back, stack) if b in ESCAPES else None
    if mode == "unicode":
        back, left = s.rest.split(b":")
        if b not in HEX:
            return None
        left_n = int(left) - 1
        return State(back.decode(), stack) if left_n == 0 else State("unicode", stack, back + b":" + str(left_n).encode())
    if mode == "literal":
        if b != s.rest[0]:
            return None
        return _after_value(stack) if len(s.rest) == 1 else State("literal", stack, s.rest[1:])
    # Numbers: -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?
    if mode == "minus":
        return State("zero", stack) if b == ord("0") else State("int", stack) if b in DIGITS else None
    if mode in ("zero", "int"):
        if mode == "int" and b in DIGITS:
            return s
        if b == ord("."):
            return State("frac0", stack)
        if b in b"eE":
            return State("exp0", stack)
        return _end_number(b, stack)
    if mode == "frac0":
        return State("frac", stack) if b in DIGITS else None
    if mode == "frac":
        if b in DIGITS:
            return s
        return State("exp0", stack) if b in b"eE" else _end_number(b, stack)
    if mode == "exp0":
        return State("exp_sign", stack) if b in b"+-" else State("exp", stack) if b in DIGITS else None
    if mode == "exp_sign":
        return State("exp", stack) if b in DIGITS else None
    if mode == "exp":
        return s if b in DIGITS else _end_number(b, stack)
    # Structure: whitespace is allowed between all tokens.
    if b in WS:
        return s
    if mode == "top":
        return State("key_or_end", ("{",)) if b == ord("{") else None
    if mode == "value":
        return _start_value(b, stack)
    if mode == "value_or_end":
        if b == ord("]"):
            return _after_value(stack[:-1])
        return _start_value(b, stack)
    if mode == "key_or_end":
        if b == ord("}"):
            return _after_value(stack[:-1])
        return State("key", stack) if b == ord('"') else None
    if mode == "key_start":
        return State("key", stack) if b == ord('"') else None
    if mode == "colon":
        return State("value", stack) if b == ord(":") else None
    if mode == "after":
        if not stack:
            return None  # the top-level value is complete: only whitespace may follow
        top = stack[-1]
        if b == ord(","):
            return State("key_start" if top == "{" else "value", stack)
        if (top == "{" and b == ord("}")) or (top == "[" and b == ord("]")):
            return _after_value(stack[:-1])
        return None
    raise AssertionError(f"unknown JSON state {mode}")


def feed(s: State | None, data: bytes) -> State | None:
    for b in data:
        if s is None:
            return None
        s = step(s, b)
    return s


def is_complete(s: State | None) -> bool:
    """Whether the bytes so far are a whole JSON value (a top-level number is complete at its end too)."""
    return s is not None and not s.stack and s.mode in ("after", "zero", "int", "frac", "exp")


def is_prefix(text: str | bytes, start: State = START_VALUE) -> bool:
    """Whether `text` can be continued into valid JSON."""
    return feed(start, text.encode() if isinstance(text, str) else text) is not None


class JsonVocab:
    """The bytes of every token id of a tokenizer (None for special tokens), shared by all requests."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        n = vocab_size or tokenizer.n_words
        self.token_bytes: list[bytes | None] = [
            None if i >= tokenizer.n_words or tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(n)]
        self.size = n
        self.by_first: dict[int, list[int]] = {}  # tokens by first byte: most first bytes fail at once
        for i, tb in enumerate(self.token_bytes):
            if tb:
                self.by_first.setdefault(tb[0], []).append(i)
        self._masks: dict[State, Tensor] = {}

    def mask(self, s: State) -> Tensor:
        """Bool [vocab] of the non-special tokens whose bytes keep state s valid (cached per state)."""
        m = self._masks.get(s)
        if m is None:
            allowed = []
            for first, ids in self.by_first.items():
                after = step(s, first)
                if after is not None:
                    allowed += [i for i in ids if feed(after, self.token_bytes[i][1:]) is not None]
            m = torch.zeros(self.size, dtype=torch.bool)
            m[allowed] = True
            if len(self._masks) < 4096:
                self._masks[s] = m
        return m


class JsonConstraint:
    """A TokenConstraint: the reply must be a JSON object (or continue one from `start`)."""

    def __init__(self, vocab: JsonVocab, stop_tokens: Iterable[int], start: State = START_OBJECT,
                 prefix: bytes = b""):
        self.vocab = vocab
        self.stop_tokens = frozenset(stop_tokens)
        self.state: State | None = feed(start, prefix)
        if self.state is None:
            raise ValueError(f"{prefix!r} is not a JSON prefix")

    @property
    def complete(self) -> bool:
        return is_complete(self.state)

    def allows(self, token: int) -> bool:
        if token in self.stop_tokens:
            return self.complete
        if self.complete:
            return False  # nothing but the end after the object (whitespace forever is no use)
        if not 0 <= token < self.vocab.size:
            return False
        tb = self.vocab.token_bytes[token]
        return bool(tb) and feed(self.state, tb) is not None

    def allowed_mask(self, vocab_size: int) -> Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        if self.complete:
            mask[[t for t in self.stop_tokens if t < vocab_size]] = True
            return mask
        m = self.vocab.mask(self.state)
        n = min(vocab_size, m.shape[0])
        mask[:n] = m[:n]
        return mask

    def advance(self, token: int) -> None:
        if token in self.stop_tokens:
            return
        tb = self.vocab.token_bytes[token] if 0 <= token < self.vocab.size else None
        self.state = feed(self.state, tb or b"")


def longest_valid_prefix(data: bytes, start: State = START_VALUE) -> int:
    """How many leading bytes of `data` form a JSON prefix (for tests and error messages)."""
    s: State | None = start
    for i, b in enumerate(data):
        s = step(s, b)
        if s is None:
            return i
    return len(data)


def tokens_text(vocab: JsonVocab, ids: Sequence[int]) -> bytes:
    return b"".join(vocab.token_bytes[i] or b"" for i in ids)
