"""Streaming decode: turn token ids into text one token at a time without printing garbage.

A character of 2-4 UTF-8 bytes is often split across byte-level BPE tokens; the decoder holds
back the incomplete tail until the next token completes it (an incremental UTF-8 decoder, so
invalid bytes still become U+FFFD exactly as a whole-sequence decode would).
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from herd.tokenizer.core import Tokenizer


class StreamDecoder:
    """push(id) -> newly complete text; flush() -> whatever is still held back (as U+FFFD)."""

    def __init__(self, tokenizer: "Tokenizer") -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(int(token_id)))

    def push_many(self, ids) -> str:
        return self._utf8.decode(b"".join(self.tokenizer.token_bytes(int(i)) for i in ids))

    def flush(self) -> str:
        """End of stream: a dangling partial character becomes U+FFFD; the decoder is reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
