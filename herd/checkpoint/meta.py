"""Meta's format: params.json + consolidated.NN.pth, one file per model-parallel rank.

Shards split wq/wk/wv/w1/w3/output and tok_embeddings along dim 0 (output features, vocab rows),
wo/w2 along dim 1 (input features); norms are replicated (the ColumnParallelLinear, RowParallelLinear
and ParallelEmbedding layers of Meta's meta-llama/llama3 model.py). herd uses Meta's parameter
names, so no name map is needed.

params.json has no field for the tie or the rope factor: Meta's code hard-codes factor 8, yet the
Llama 3.2 1B/3B checkpoints (the tied ones, whose output.weight equals the embedding) need 32
(meta-llama/llama-models issues 166 and 241). So the loader reads `rope_scaling_factor` when
present and otherwise uses 32 for tied and 8 for untied models. herd writes `rope_scaling_factor` plus its own fields under
"herd"; llama-models' ModelArgs ignores keys it does not know.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from herd.checkpoint.common import model_from_state_dict, read_json, tied_output_check
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer

_DIM0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
         "feed_forward.w3.weight", "output.weight", "tok_embeddings.weight")
_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight")
_PARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
           "norm_eps", "rope_theta", "use_scaled_rope")


def split_dim(name: str) -> int | None:
    """The dimension a tensor is split along across model-parallel shards (None: replicated)."""
    if name.endswith(_DIM0):
        return 0
    if name.endswith(_DIM1):
        return 1
    return None


def params_json(args: ModelArgs) -> dict:
    """params.json for these ModelArgs: Meta's fields first, herd's extras after."""
    params = {k: getattr(args, k) for k in _PARAMS}
    if args.use_scaled_rope:
        params["rope_scaling_factor"] = args.rope_scale_factor
    params["herd"] = {k: getattr(args, k) for k in ("max_seq_len", "tie_embeddings", "head_dim",
                                                    "rope_low_freq_factor", "rope_high_freq_factor",
                                                    "rope_original_max_seq_len")}
    return params


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("consolidated.*.pth"))


def load_shard(path: Path) -> dict[str, Tensor]:
    """One consolidated.NN.pth as a dict of memory-mapped tensors (HerdError if it is not one)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise HerdError(f"{path} is corrupt or truncated ({reason}); re-download or re-save the checkpoint.") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise HerdError(f"{path} does not hold a dict of tensors; it is not a Meta checkpoint shard.")
    state.pop("rope.freqs", None)  # Llama 2 checkpoints stored the RoPE table; herd recomputes it
    return state


def _merge(shards: list[dict[str, Tensor]], dtype: torch.dtype | None, device: torch.device | str,
           source: Path) -> dict[str, Tensor]:
    """One state dict from model-parallel shards, written straight into tensors of the final dtype."""
    if len(shards) == 1:
        return shards[0]
    out = {}
    for name in shards[0]:
        parts = [s.get(name) for s in shards]
        if any(p is None for p in parts):
            raise HerdError(f"tensor '{name}' is missing from some shards of {source}; copy every consolidated.NN.pth.")
        dim = split_dim(name)
        if dim is None or parts[0].ndim <= dim:
            out[name] = parts[0]
            continue
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        full = torch.empty(shape, dtype=dtype or parts[0].dtype, device=device)
        offset = 0
        for p in parts:
            full.narrow(dim, offset, p.shape[dim]).copy_(p)
            offset += p.shape[dim]
        out[name] = full
    return out


def load_args(folder: Path, tied: bool | None = None) -> ModelArgs:
    """ModelArgs from params.json. `tied` (from the weights) picks the rope factor when params.json has none."""
    params = read_json(folder / "params.json")
    extra = params.get("herd") if isinstance(params.get("herd"), dict) else {}
    if tied is None and "tie_embeddings" not in extra and shard_files(folder):
        # Shard 0 holds matching row slices of both matrices; mmap makes this cheap.
        first = load_shard(shard_files(folder)[0])
        tied = "output.weight" not in first or tied_output_check(first, "output.weight", "tok_embeddings.weight")
    kw = {k: params[k] for k in _PARAMS if k in params}
    if kw.get("use_scaled_rope"):
        factor = params.get("rope_scaling_factor")
        kw["rope_scale_factor"] = float(factor if factor is not None else (32.0 if tied else 8.0))
        kw["max_seq_len"] = 131072
    if tied is not None:
        kw["tie_embeddings"] = tied
    kw.update(extra)
    try:
        return ModelArgs(**kw)
    except (TypeError, ValueError) as e:
        raise HerdError(f"{folder / 'params.json'} is not a valid Llama params file ({e}); fix that file.") from None


def _check_shard_set(folder: Path, files: list[Path], state: dict[str, Tensor]) -> None:
    """HerdError when model-parallel shards are missing (a gap in the numbering, or too few for the shapes)."""
    numbers = sorted(int(f.name.split(".")[1]) for f in files if f.name.split(".")[1].isdigit())
    gaps = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
    if gaps:
        raise HerdError(f"{folder} lacks consolidated.{gaps[0]:02d}.pth ({len(files)} shard file(s) found); "
                        "copy every consolidated.NN.pth of the checkpoint.")
    vocab = int(read_json(folder / "params.json").get("vocab_size", 0) or 0)
    rows = state["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in state else 0
    if rows and vocab > rows and vocab % rows == 0:
        need = len(files) * vocab // rows
        raise HerdError(f"{folder} holds {len(files)} model-parallel shard(s) but its weights are split {need} "
                        f"ways (tok_embeddings has {rows} of {vocab} rows); copy the missing consolidated.NN.pth files.")


def load(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    files = shard_files(folder)
    shards = [load_shard(f) for f in files]
    state = _merge(shards, dtype, device, folder)
    del shards
    _check_shard_set(folder, files, state)
    extra = read_json(folder / "params.json").get("herd")
    recorded = extra.get("tie_embeddings") if isinstance(extra, dict) else None
    out, emb = state.get("output.weight"), state.get("tok_embeddings.weight")
    if recorded is None:  # Meta's own params.json: the weights decide (a full compare)
        tied = out is None or tied_output_check(state, "output.weight", "tok_embeddings.weight")
    else:  # herd wrote it: spot-check two rows instead of reading the whole matrix twice
        tied = bool(recorded)
        if tied and out is not None and not (out.shape == emb.shape and torch.equal(out[0], emb[0])
                                             and torch.equal(out[-1], emb[-1])):
            raise HerdError(f"{folder} says the embeddings are tied but output.weight differs from "
                            "tok_embeddings; set herd.tie_embeddings to false in params.json.")
    args = load_args(folder, tied)
    if args.tie_embeddings:
        state.pop("output.weight", None)
    return model_from_state_dict(args, state, device, dtype, source=str(folder))


def _own(t: Tensor) -> Tensor:
    """A tensor whose storage holds just itself (torch.save writes whole storages)."""
    t = t.detach().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def save(model: Transformer, folder: Path, shards: int = 1) -> None:
    """Write params.json + `shards` consolidated.NN.pth files into an (empty, temporary) folder."""
    args = model.args
    state = dict(model.state_dict())
    if args.tie_embeddings:  # Meta's loader expects output.weight even for tied models
        state["output.weight"] = state["tok_embeddings.weight"]
    for name, t in state.items():
        dim = split_dim(name)
        if dim is not None and t.shape[dim] % shards:
            raise HerdError(f"cannot split '{name}' ({t.shape[dim]} along dim {dim}) into {shards} shards; "
                            f"choose a shard count that divides n_kv_heads ({args.n_kv_heads}).")
    big = sum(t.numel() * t.element_size() for t in state.values()) > 256 * 2**20
    for i in tqdm(range(shards), desc="writing shards", disable=not big, leave=False):
        part = {}
        for name, t in state.items():
            dim = split_dim(name)
            part[name] = _own(t) if dim is None or shards == 1 else t.chunk(shards, dim)[i].clone()
        torch.save(part, folder / f"consolidated.{i:02d}.pth")
        del part
    (folder / "params.json").write_text(json.dumps(params_json(args), indent=2) + "\n")
