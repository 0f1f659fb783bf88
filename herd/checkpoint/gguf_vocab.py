"""herd's tiktoken vocabulary <-> the tokenizer metadata of a GGUF file (llama.cpp's `gpt2` BPE model).

llama.cpp reads a Llama 3 tokenizer as (gguf constants.py, llama-vocab.cpp):

    tokenizer.ggml.model       "gpt2" (byte-level BPE)
    tokenizer.ggml.pre         "llama-bpe": the Llama 3 pre-tokenizer regex, whole-word vocabulary
                               hits bypass the merges (ignore_merges, as tiktoken does), BOS added
    tokenizer.ggml.tokens      every token as text, bytes mapped through GPT-2's byte-to-unicode table
    tokenizer.ggml.token_type  1 NORMAL for BPE tokens, 3 CONTROL for the special tokens
    tokenizer.ggml.merges      "left right" pairs in priority order (the key must exist)

Merges are derived from the tiktoken ranks the way Hugging Face's tiktoken converter does: every
split of a token into two tokens is a merge, ordered by the rank of the merged token (then of the
left and right pieces). llama.cpp applies the lowest-ranked adjacent merge first, and tiktoken merges
the adjacent pair whose concatenation has the lowest rank, so both produce the same tokens. For
Meta's tokenizer this list is exactly the 280,147 merges of the official tokenizer.json.
"""

from __future__ import annotations

import functools

from herd.tokenizer import Tokenizer

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5
"""gguf.TokenType values (NORMAL, CONTROL, UNUSED)."""

LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
"""Meta's Llama 3 dialog format as a Jinja chat template: each message is its header, the stripped
content and <|eot_id|> (llama-models `ChatFormat`, herd's ChatFormat(style="meta"))."""

OLLAMA_TEMPLATE = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)
"""The same format as an Ollama (Go) TEMPLATE, as in Ollama's llama3 Modelfile."""


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def token_text(token: bytes) -> str:
    """A token's bytes in GPT-2's byte-to-unicode form ('Ġthe' for b' the')."""
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def token_bytes(text: str) -> bytes | None:
    """Inverse of token_text; None if `text` has a character outside the table."""
    table = {c: b for b, c in byte_to_unicode().items()}
    try:
        return bytes(table[c] for c in text)
    except KeyError:
        return None


def ranks_in_order(tokenizer: Tokenizer) -> list[bytes]:
    """The BPE tokens of `tokenizer` by rank (id)."""
    return [tokenizer.token_bytes(i) for i in range(tokenizer.n_bpe)]


def merges_from_ranks(tokens: list[bytes]) -> list[str]:
    """Every (left, right) split of each token into two tokens, in rank order, as 'left right' text."""
    rank = {t: i for i, t in enumerate(tokens)}
    merges: list[str] = []
    for token in tokens:
        if len(token) < 2:
            continue
        pairs = [(rank[token[:i]], rank[token[i:]], i) for i in range(1, len(token))
                 if token[:i] in rank and token[i:] in rank]
        for _, _, i in sorted(pairs):
            merges.append(f"{token_text(token[:i])} {token_text(token[i:])}")
    return merges


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for a model with `vocab_size` rows (extra rows become unused pads)."""
    tokens_b = ranks_in_order(tokenizer)
    tokens = [token_text(t) for t in tokens_b]
    types = [TOKEN_NORMAL] * len(tokens)
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    tokens += [name for name, _ in specials]
    types += [TOKEN_CONTROL] * len(specials)
    for i in range(vocab_size - len(tokens)):  # llama.cpp wants one token per embedding row
        tokens.append(f"[PAD{i}]")
        types.append(TOKEN_UNUSED)
    return tokens, types, merges_from_ranks(tokens_b)


def ranks_from_gguf(tokens: list[str], types: list[int]) -> dict[bytes, int] | None:
    """tiktoken ranks of a GGUF vocabulary laid out as Llama 3's (BPE tokens first, then 256 specials);
    None when it is not one herd's Tokenizer can represent."""
    n_bpe = next((i for i, t in enumerate(types) if t != TOKEN_NORMAL), len(types))
    if n_bpe < 256 or len(tokens) < n_bpe + 256:
        return None
    if any(t == TOKEN_NORMAL for t in types[n_bpe:n_bpe + 256]):
        return None
    ranks: dict[bytes, int] = {}
    for i in range(n_bpe):
        b = token_bytes(tokens[i])
        if b is None or b in ranks:
            return None
        ranks[b] = i
    if any(bytes([b]) not in ranks for b in range(256)):
        return None
    return ranks
