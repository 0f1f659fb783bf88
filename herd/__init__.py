"""herd: the Llama 3 system, end to end, in one readable PyTorch package.

The public names are imported lazily so `import herd` stays fast and a missing optional
dependency only matters to the part that needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelArgs": "herd.model",
    "Transformer": "herd.model",
    "KVCache": "herd.model",
    "get_preset": "herd.configs",
    "PRESETS": "herd.configs",
    "HerdError": "herd.errors",
    "load_checkpoint": "herd.checkpoint",
    "save_checkpoint": "herd.checkpoint",
    "Tokenizer": "herd.tokenizer",
    "ChatFormat": "herd.tokenizer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'herd' has no attribute {name!r}")
