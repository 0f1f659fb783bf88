"""herd's tokenizer package: the official Llama 3 tokenizer, the chat format, and BPE training.

- core.py   Tokenizer (tiktoken), the pattern, special tokens, Meta's chunking
- stream.py StreamDecoder (token-by-token text that never splits a character)
- chat.py   ChatFormat (Llama 3.1 dialogs, tool calls, parsing replies)
- train.py  train_bpe (Hugging Face `tokenizers` trainer -> tiktoken-format file)
- cli.py    `herd tokenizer train|encode|decode|stats`
"""

from herd.tokenizer.chat import ChatFormat
from herd.tokenizer.core import OFFICIAL_SHA256, PATTERN, SPECIAL_TOKEN_NAMES, Tokenizer
from herd.tokenizer.stream import StreamDecoder


def train_bpe(*args, **kwargs):
    """Train a byte-level BPE vocabulary; see herd.tokenizer.train.train_bpe."""
    from herd.tokenizer.train import train_bpe as _train

    return _train(*args, **kwargs)


__all__ = ["Tokenizer", "ChatFormat", "StreamDecoder", "train_bpe", "PATTERN", "SPECIAL_TOKEN_NAMES",
           "OFFICIAL_SHA256"]
