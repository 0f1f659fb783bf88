"""Which checkpoint format a folder holds, and where its tokenizer is.

Markers, checked in this order so a folder matches exactly one format:
  herd: herd.json (+ model.safetensors or shards)
  meta: params.json + consolidated.NN.pth (also under original/, as on the Hugging Face hub)
  hf:   config.json + model.safetensors or model.safetensors.index.json
  gguf: a single .gguf file (llama.cpp's format; read here, written by `herd export`)
"""

from __future__ import annotations

from pathlib import Path

from herd.errors import HerdError

FORMATS = ("herd", "hf", "meta")
"""Folder formats herd reads and writes; GGUF (one file) is read by load_checkpoint and written by herd export."""


def _folder(path: Path) -> Path:
    return path.parent if path.is_file() else path


def detect_format(path: str | Path, strict: bool = True) -> tuple[str, Path] | None:
    """(format, folder holding the weights) of a checkpoint path (a folder or a file inside it).

    With strict=True a path that is missing or holds no checkpoint raises HerdError; otherwise
    None is returned.
    """
    path = Path(path)
    if not path.exists():
        if not strict:
            return None
        raise HerdError(f"checkpoint path {path} does not exist; check the path, or create a checkpoint "
                        f"with `herd init PRESET {path}`.")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf", path
    folder = _folder(path)
    if (folder / "herd.json").is_file():
        return "herd", folder
    has_st = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    if (folder / "config.json").is_file() and has_st:
        return "hf", folder
    for candidate in (folder, folder / "original"):
        if (candidate / "params.json").is_file() and any(candidate.glob("consolidated.*.pth")):
            return "meta", candidate
    if not strict:
        return None
    if (folder / "config.json").is_file() and any(folder.glob("*.bin")):
        raise HerdError(f"{folder} holds a Hugging Face checkpoint in the old .bin format; re-save it with "
                        "`save_pretrained(..., safe_serialization=True)` to get model.safetensors.")
    if (folder / "params.json").is_file():
        raise HerdError(f"{folder} has params.json but no consolidated.NN.pth weights; copy the .pth shards "
                        "next to params.json.")
    if (folder / "config.json").is_file():
        raise HerdError(f"{folder} has config.json but no model.safetensors or model.safetensors.index.json; "
                        "copy the weight files next to config.json.")
    raise HerdError(f"no checkpoint found in {folder} (expected herd.json, config.json + model.safetensors, "
                    "or params.json + consolidated.00.pth); point to the folder that holds the weights.")


def find_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer file that belongs to a checkpoint: tokenizer.model beside it or under original/."""
    folder = _folder(Path(path))
    for candidate in (folder / "tokenizer.model", folder / "original" / "tokenizer.model",
                      folder.parent / "tokenizer.model" if folder.name == "original" else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None
