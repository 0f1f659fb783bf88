"""What every checkpoint format shares: safetensors read and write, atomic folders, and building a
model from a state dict without holding the weights twice.

Memory rule: a model is built on the meta device (no storage), each tensor comes from a
memory-mapped file, is converted to the requested dtype and device one at a time, and is handed to
the model with `load_state_dict(assign=True)`. When the stored dtype is the one asked for on the
CPU, the parameter *is* the mapped file (copy-on-write, MAP_PRIVATE), so loading costs ~1x the
weights and its pages are file-backed and reclaimable.

safetensors is read and written here directly (8-byte header length, JSON header, raw bytes)
rather than through `safetensors.torch`, because its save builds the whole file in memory first
and its load copies out of the map; the format is the same (transformers reads what we write).
"""

from __future__ import annotations

import json
import math
import mmap
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import Tensor
from tqdm import tqdm

from herd import fileio
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from a name like 'bf16' (None stays None: keep what the checkpoint stores)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise HerdError(f"unknown dtype '{dtype}'; use one of fp32, bf16, fp16.")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the spelling config files use)."""
    return str(dtype).removeprefix("torch.")


def read_json(path: Path) -> dict:
    """A JSON object from a config file, with a HerdError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HerdError(f"cannot read {path} as JSON ({e}); fix or regenerate that file.") from None
    if not isinstance(data, dict):
        raise HerdError(f"{path} holds a JSON {type(data).__name__}, not an object; fix or regenerate that file.")
    return data


# ---------------------------------------------------------------------------------------------
# safetensors


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a .safetensors file, each a zero-copy private memory map of its bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except (OSError, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise HerdError(f"{path} is not a valid safetensors file (corrupt or truncated header); "
                        "re-download or re-save the checkpoint.")
    header.pop("__metadata__", None)
    start = 8 + n
    try:
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        raise HerdError(f"{path} has a malformed safetensors header; re-download or re-save the checkpoint.") from None
    if start + end > size:
        raise HerdError(f"{path} is truncated ({size} bytes, its header needs {start + end}); "
                        "re-download or re-save the checkpoint.")
    out = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            dtype = _ST_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise HerdError(f"tensor '{name}' in {path} has unsupported dtype {info.get('dtype')}; "
                                "save it as float32, bfloat16 or float16.")
            begin, stop = (start + int(o) for o in info["data_offsets"])
            shape = tuple(int(d) for d in info.get("shape", ()))
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if stop - begin != math.prod(shape) * itemsize or begin < start:
                raise HerdError(f"tensor '{name}' in {path} has {stop - begin} bytes for shape {list(shape)}; "
                                "the file is corrupt, re-download or re-save it.")
            out[name] = _map_tensor(f, begin, stop, dtype, shape)
    return out


def _map_tensor(f, begin: int, stop: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """Bytes [begin, stop) of an open file as a tensor backed by its own private (copy-on-write) map.

    One map per tensor, so each tensor has a storage of exactly its own size: torch.save and
    friends then write just that tensor, and tensors of different dtypes never share a storage.
    """
    if stop == begin:
        return torch.empty(shape, dtype=dtype)
    base = begin - begin % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(f.fileno(), stop - base, access=mmap.ACCESS_COPY, offset=base)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    t = torch.frombuffer(mm, dtype=dtype, count=(stop - begin) // itemsize, offset=begin - base)
    if t.data_ptr() % itemsize:  # unaligned data: copy rather than hand kernels a misaligned pointer
        t = t.clone()
    return t.view(shape)


def write_safetensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None,
                      progress: "tqdm | None" = None) -> None:
    """Write a .safetensors file tensor by tensor (no second copy of the weights in memory).

    Tensors are laid out largest element size first so every tensor starts aligned, which keeps
    zero-copy loading possible.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.numel() * t.element_size()]}
        offset += t.numel() * t.element_size()
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))
            if progress is not None:
                progress.update(t.numel() * t.element_size())


def shard_names(n: int) -> list[str]:
    """Hugging Face's shard file names: model.safetensors, or model-0000i-of-0000n.safetensors."""
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_safetensors_shards(folder: Path, tensors: Mapping[str, Tensor], shards: int,
                             metadata: dict[str, str] | None = None) -> None:
    """Write tensors into `shards` files of about equal size (+ model.safetensors.index.json if > 1)."""
    if shards < 1:
        raise HerdError(f"--shards must be at least 1, got {shards}.")
    names = shard_names(shards)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[dict[str, Tensor]] = [{} for _ in names]
    filled, i = 0, 0
    for key, t in tensors.items():  # in model order, so layers stay together
        if filled >= (i + 1) * total / shards and i < shards - 1:
            i += 1
        groups[i][key] = t
        filled += t.numel() * t.element_size()
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", leave=False,
              disable=total < 256 * 2**20) as progress:
        for name, group in zip(names, groups):
            write_safetensors(folder / name, group, metadata, progress)
    if shards > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: n for n, g in zip(names, groups) for k in g}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def read_safetensors_folder(folder: Path) -> dict[str, Tensor]:
    """Tensors of model.safetensors, or of every shard listed in model.safetensors.index.json."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HerdError(f"{index} has no 'weight_map'; fix or regenerate that file.")
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, Tensor] = {}
    for name in files:
        if not (folder / name).exists():
            raise HerdError(f"shard {folder / name} is missing; copy the complete checkpoint folder.")
        out.update(read_safetensors(folder / name))
    return out


# ---------------------------------------------------------------------------------------------
# Building models


def meta_model(args: ModelArgs) -> Transformer:
    """A Transformer with no storage (parameters on the meta device)."""
    with torch.device("meta"):
        return Transformer(args)


def model_from_state_dict(args: ModelArgs, state_dict: dict[str, Tensor], device: torch.device | str = "cpu",
                          dtype: torch.dtype | None = None, source: str = "the checkpoint") -> Transformer:
    """A model in eval mode whose parameters are `state_dict`'s tensors (moved/converted one by one).

    Consumes `state_dict` (its entries are removed as they are loaded).

    Raises HerdError for missing or unexpected names and for shape mismatches, naming the tensor.
    """
    model = meta_model(args)
    expected = dict(model.state_dict())
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"has {len(unexpected)} unexpected tensor(s) ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        raise HerdError(f"{source} is {' and '.join(parts)} for its config; "
                        "make the config match the weights or use the checkpoint that belongs to it.")
    for k, ref in expected.items():
        if tuple(state_dict[k].shape) != tuple(ref.shape):
            raise HerdError(f"tensor '{k}' in {source} has shape {list(state_dict[k].shape)} but the config "
                            f"expects {list(ref.shape)}; fix the config or use the checkpoint that belongs to it.")
    loaded = {}
    for k in expected:  # pop as we go so a converted tensor never coexists with its source for long
        t = state_dict.pop(k)
        if not t.is_floating_point():
            raise HerdError(f"tensor '{k}' in {source} has dtype {t.dtype}, not a float; "
                            "the file is not a model checkpoint.")
        loaded[k] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(loaded, assign=True, strict=True)
    model.reset_buffers()
    return model.eval()


def tied_output_check(state_dict: dict[str, Tensor], key: str, embed_key: str) -> bool:
    """Whether an output matrix stored beside a tied embedding is exactly the embedding."""
    out, emb = state_dict.get(key), state_dict.get(embed_key)
    return out is not None and emb is not None and out.shape == emb.shape and torch.equal(out, emb)


# ---------------------------------------------------------------------------------------------
# Atomic folders


@contextmanager
def atomic_folder(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `dst`; on success it replaces `dst` in one rename.

    An existing `dst` is replaced only with overwrite=True and only if it is empty or a checkpoint
    (so a typo cannot delete an unrelated folder). On failure the temporary folder is removed.
    """
    dst = Path(dst)
    if dst.exists():
        from herd.checkpoint.detect import detect_format

        if not overwrite:
            raise HerdError(f"{dst} already exists; choose a new path or pass --overwrite (overwrite=True).")
        if dst.is_file() or (any(dst.iterdir()) and detect_format(dst, strict=False) is None):
            raise HerdError(f"{dst} exists and is not a checkpoint folder, so it will not be replaced; "
                            "choose another path.")
    with fileio.atomic_folder(dst, overwrite=True, replaceable=lambda d: True) as tmp:
        yield tmp


def copy_tokenizer(tokenizer_path: str | Path | None, folder: Path) -> None:
    """Copy a tokenizer file into a checkpoint folder as tokenizer.model."""
    if tokenizer_path is None:
        return
    src = Path(tokenizer_path)
    if not src.is_file():
        raise HerdError(f"tokenizer file {src} does not exist; pass the path of a tokenizer.model file.")
    shutil.copyfile(src, folder / "tokenizer.model")


def peak_memory() -> dict[str, int]:
    """Peak resident memory of this process in bytes: 'maxrss' (all pages) and, on Linux, the
    current 'rss_anon' / 'rss_file' split from /proc/self/status."""
    import resource

    out = {"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[{"RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "hwm"}[key]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out
