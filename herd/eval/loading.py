"""Loading a checkpoint and its tokenizer for evaluation, with one-line errors, and a fingerprint
that tells whether a saved result belongs to the same weights."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from herd.errors import HerdError


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 of the names, sizes and modification times of the checkpoint's files (cheap, changes
    whenever the weights are rewritten)."""
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def pick_device(device: str | None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        raise HerdError(f"device '{device}' is not available here; use --device cpu.") from None
    return device


def load_model_and_tokenizer(checkpoint: str | Path, tokenizer: str | Path | None = None, dtype: str | None = None,
                             device: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, Tokenizer, info for results files) of a herd / Hugging Face / Meta checkpoint."""
    from herd.checkpoint import find_tokenizer, load_checkpoint
    from herd.tokenizer import Tokenizer

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise HerdError(f"checkpoint {checkpoint} does not exist; pass the folder `herd init`, `herd pretrain` "
                        "or `herd convert` wrote.")
    tok_path = Path(tokenizer) if tokenizer else find_tokenizer(checkpoint)
    if tok_path is None:
        raise HerdError(f"no tokenizer.model found with the checkpoint {checkpoint}; pass --tokenizer PATH.")
    if not tok_path.exists():
        raise HerdError(f"tokenizer file {tok_path} does not exist; pass an existing tokenizer.model with --tokenizer.")
    tok = Tokenizer.from_file(tok_path)
    model = load_checkpoint(checkpoint, device=pick_device(device), dtype=dtype)
    if tok.n_words > model.args.vocab_size:
        raise HerdError(f"the tokenizer has {tok.n_words} tokens but the model only {model.args.vocab_size}; "
                        "use the tokenizer the model was trained with.")
    model.eval()
    info = {"checkpoint": str(checkpoint), "fingerprint": checkpoint_fingerprint(checkpoint),
            "params": model.num_params(), "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
            "max_seq_len": model.args.max_seq_len, "tokenizer": str(tok_path), "tokenizer_sha256": tok.sha256}
    return model, tok, info
