"""herd's own checkpoint format: the resolved ModelArgs in herd.json + weights in safetensors.

    herd.json            {"format": "herd", "version": 1, "model_args": {...every ModelArgs field...},
                          "dtype": "bfloat16"}
    model.safetensors    Meta's parameter names (tok_embeddings, layers.N.attention.wq, ...), or
                         model-0000i-of-0000n.safetensors + model.safetensors.index.json

No name map and no permutation: the tensors are exactly the model's state_dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from herd.checkpoint.common import (dtype_name, model_from_state_dict, read_json, read_safetensors_folder,
                                    write_safetensors_shards)
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer

VERSION = 1


def load_args(folder: Path) -> ModelArgs:
    """The ModelArgs recorded in herd.json."""
    meta = read_json(folder / "herd.json")
    if not isinstance(meta.get("model_args"), dict):
        raise HerdError(f"{folder / 'herd.json'} has no 'model_args' object; regenerate the checkpoint.")
    try:
        return ModelArgs.from_dict(meta["model_args"])
    except (TypeError, ValueError) as e:
        raise HerdError(f"{folder / 'herd.json'} has invalid model_args ({e}); fix that file.") from None


def load(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    args = load_args(folder)
    state = read_safetensors_folder(folder)
    return model_from_state_dict(args, state, device, dtype, source=str(folder))


def save(model: Transformer, folder: Path, shards: int = 1) -> None:
    """Write `model` into an (empty, temporary) folder."""
    state = {k: v for k, v in model.state_dict().items()}
    dtype = next(iter(state.values())).dtype
    write_safetensors_shards(folder, state, shards, metadata={"format": "pt"})
    meta = {"format": "herd", "version": VERSION, "model_args": model.args.to_dict(), "dtype": dtype_name(dtype)}
    (folder / "herd.json").write_text(json.dumps(meta, indent=2) + "\n")
