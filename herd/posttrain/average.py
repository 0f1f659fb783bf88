"""Model averaging: the weighted mean of checkpoints of one architecture, tensor by tensor.

Llama 3 §4.1.5: "at each RM, SFT, or DPO stage, we average models obtained from experiments using
various versions of data or hyperparameters" (Wortsman et al. 2022, model soups); pre-training
also ends with an average of the annealing checkpoints (§3.4.3).

    average_checkpoints(["run-a", "run-b", "run-c"], "soup", format="hf")

Inputs may mix herd, Hugging Face and Meta formats (the weights are compared in herd's layout:
HF's q/k row order is undone per tensor) and must have the same architecture (every ModelArgs
field but max_seq_len) and tensors. Each output tensor is the float32 weighted sum of the inputs'
tensors, read from their memory maps one tensor at a time, then cast to the output dtype: memory
stays near one model (the output) plus one float32 tensor, whatever the number of inputs. The
output is written atomically (herd.checkpoint), with the inputs' tokenizer, which must be one.

Reward models (LlamaForSequenceClassification folders) average the same way, head included.

LoRA adapters of one base average exactly: the mean of merged models W + sum_i w_i s_i B_i A_i is
the base plus one adapter whose A stacks the A_i and whose B stacks the w_i s_i B_i (rank sum r_i,
scaling 1; peft's add_weighted_adapter "cat" combination). Averaging A and B separately would not
give the average model (a product of means is not a mean of products).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from herd import fileio
from herd.checkpoint.common import read_json, read_safetensors, read_safetensors_folder
from herd.checkpoint.detect import detect_format, find_tokenizer
from herd.errors import HerdError
from herd.model import ModelArgs

_KINDS = {"model": "language model", "reward": "reward model", "adapter": "LoRA adapter"}
_LORA_KEY = re.compile(r"^(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass
class Source:
    """One input: what it is and how to read each of its tensors in herd's layout."""

    path: Path
    kind: str
    """model, reward or adapter."""
    fmt: str
    """herd, hf, meta (or gguf and other formats herd.checkpoint loads whole), or peft."""
    names: list[str]
    get: Callable[[str], Tensor]
    args: ModelArgs | None = None
    tokenizer: Path | None = None
    config: dict = field(default_factory=dict)
    """config.json of a reward model, adapter_config.json of an adapter."""


def _hf_source(path: Path, folder: Path, kind: str) -> Source:
    from herd.checkpoint.hf import args_from_config, from_hf_state_dict, herd_name

    cfg = read_json(folder / "config.json")
    args = args_from_config(cfg, source=str(folder / "config.json"))
    raw = read_safetensors_folder(folder)
    to_hf: dict[str, str] = {}
    for k in raw:
        if k.endswith("rotary_emb.inv_freq") or (k == "lm_head.weight" and (args.tie_embeddings or kind == "reward")):
            continue
        name = "score.weight" if k == "score.weight" and kind == "reward" else herd_name(k)
        if name is None:
            raise HerdError(f"{folder} holds '{k}', which is not a Llama weight; average Llama checkpoints only.")
        to_hf[name] = k

    def get(name: str) -> Tensor:
        k = to_hf[name]
        if name == "score.weight":
            return raw[k]
        return from_hf_state_dict({k: raw[k]}, args)[name]  # undoes HF's q/k row order for this tensor only

    return Source(path, kind, "hf", list(to_hf), get, args, find_tokenizer(folder), cfg)


def _meta_source(path: Path, folder: Path) -> Source:
    from herd.checkpoint import meta

    args = meta.load_args(folder)
    shards = [meta.load_shard(f) for f in meta.shard_files(folder)]  # memory maps, nothing read yet
    names = [k for k in shards[0] if not (k == "output.weight" and args.tie_embeddings)]

    def get(name: str) -> Tensor:
        parts = [s[name] for s in shards]
        dim = meta.split_dim(name)
        return parts[0] if len(parts) == 1 or dim is None else torch.cat(parts, dim)

    return Source(path, "model", "meta", names, get, args, find_tokenizer(path))


def _adapter_source(path: Path) -> Source:
    from herd.posttrain.adapter import CONFIG, WEIGHTS, check_adapter_config

    cfg = read_json(path / CONFIG)
    check_adapter_config(cfg, path / CONFIG)
    if not (path / WEIGHTS).is_file():
        raise HerdError(f"{path} has {CONFIG} but no {WEIGHTS}; copy the whole adapter folder.")
    tensors = {k: v for k, v in read_safetensors(path / WEIGHTS).items() if not k.endswith(".base_layer.weight")}
    for k in tensors:
        if _LORA_KEY.match(k) is None:
            raise HerdError(f"{path / WEIGHTS} holds '{k}', which is not a LoRA A/B matrix; herd averages plain "
                            "LoRA adapters only.")
    return Source(path, "adapter", "peft", list(tensors), tensors.__getitem__, None, None, cfg)


def open_source(path: str | os.PathLike) -> Source:
    """An input checkpoint, adapter or reward model, opened lazily (memory maps; tensors read on get)."""
    from herd.posttrain.reward import is_reward_model

    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _adapter_source(path)
    if is_reward_model(path):
        return _hf_source(path, path.parent if path.is_file() else path, "reward")
    fmt, folder = detect_format(path)
    if fmt == "herd":
        meta = read_json(folder / "herd.json")
        if meta.get("quantization") is not None:
            raise HerdError(f"{path} is quantized; average the float checkpoints it was made from.")
        from herd.checkpoint import native

        tensors = read_safetensors_folder(folder)
        return Source(path, "model", "herd", list(tensors), tensors.__getitem__, native.load_args(folder),
                      find_tokenizer(folder))
    if fmt == "hf":
        return _hf_source(path, folder, "model")
    if fmt == "meta":
        return _meta_source(path, folder)
    from herd.checkpoint import load_checkpoint  # formats without a lazy reader: loaded whole

    model = load_checkpoint(path)
    state = model.state_dict()
    return Source(path, "model", fmt, list(state), state.__getitem__, model.args, find_tokenizer(path))


def _check_same(sources: list[Source]) -> None:
    first = sources[0]
    for s in sources[1:]:
        if s.kind != first.kind:
            raise HerdError(f"{first.path} is a {_KINDS[first.kind]} but {s.path} is a {_KINDS[s.kind]}; average "
                            "inputs of one kind.")
        if first.args is not None:
            a, b = first.args.to_dict(), s.args.to_dict()
            diff = [k for k in a if k != "max_seq_len" and a[k] != b[k]]
            if diff:
                raise HerdError(f"{s.path} has {diff[0]}={b[diff[0]]} but {first.path} has {a[diff[0]]}; average "
                                "checkpoints of the same architecture only.")
        if set(s.names) != set(first.names):
            extra = sorted(set(s.names) ^ set(first.names))
            raise HerdError(f"{s.path} and {first.path} hold different tensors (e.g. '{extra[0]}'); average "
                            "checkpoints of the same architecture only.")


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise HerdError(f"{len(w)} weights for {n} checkpoints; give one weight per checkpoint.")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise HerdError(f"weights must be >= 0 with a positive sum, got {w}.")
    return [x / sum(w) for x in w]


def _tokenizer(sources: list[Source], given: str | os.PathLike | None) -> Path | None:
    found = [(s.path, s.tokenizer) for s in sources if s.tokenizer is not None]
    digests = {p: hashlib.sha256(t.read_bytes()).hexdigest() for p, t in found}
    if digests:
        first, want = next(iter(digests.items()))
        for p, d in digests.items():
            if d != want:
                raise HerdError(f"{first} and {p} come with different tokenizers (sha256 {want[:12]}... vs {d[:12]}...); "
                                "models of different vocabularies cannot be averaged.")
    if given is not None:
        return Path(given)
    return found[0][1] if found else None


def average_tensors(sources: list[Source], weights: list[float], dtype: torch.dtype | None,
                    progress: bool = True) -> dict[str, Tensor]:
    """The weighted float32 sum of every tensor over the sources, cast to `dtype` (default: the first
    source's dtype per tensor), one tensor at a time."""
    out: dict[str, Tensor] = {}
    names = sources[0].names
    for name in tqdm(names, desc="averaging", unit=" tensors", disable=not progress, delay=2.0):
        acc: Tensor | None = None
        first: Tensor | None = None
        for w, src in zip(weights, sources):
            t = src.get(name)
            if first is None:
                first = t
            elif t.shape != first.shape:
                raise HerdError(f"tensor '{name}' is {list(t.shape)} in {src.path} but {list(first.shape)} in "
                                f"{sources[0].path}; average checkpoints of the same architecture only.")
            if not t.is_floating_point():
                raise HerdError(f"tensor '{name}' in {src.path} is {t.dtype}, not a float; it cannot be averaged.")
            acc = t.float() * w if acc is None else acc.add_(t.float(), alpha=w)
        out[name] = acc.to(dtype or first.dtype)
        del acc
    return out


def _average_adapters(sources: list[Source], weights: list[float], out: Path, overwrite: bool) -> str:
    from herd.checkpoint.common import write_safetensors
    from herd.posttrain.adapter import CONFIG, WEIGHTS
    from herd.posttrain.lora import scaling

    bases = {s.config.get("base_model_name_or_path") for s in sources} - {None}
    if len(bases) > 1:
        raise HerdError(f"the adapters were trained on different bases ({', '.join(sorted(map(str, bases)))}); "
                        "average adapters of one base model.")
    modules: dict[str, dict[str, list[Tensor]]] = {}
    for s in sources:
        for k in s.names:
            m = _LORA_KEY.match(k)
            modules.setdefault(m.group(1), {"A": [], "B": []})[m.group(2)].append(s.get(k))
    ranks = []
    tensors = {}
    for module, ab in modules.items():
        if len(ab["A"]) != len(sources) or len(ab["B"]) != len(sources):
            raise HerdError(f"not every adapter adapts {module}; average adapters with the same target modules.")
        parts_b = []
        for s, w, a, b in zip(sources, weights, ab["A"], ab["B"]):
            r = a.shape[0]
            if b.shape[1] != r:
                raise HerdError(f"{s.path}: {module} has lora_A rank {r} but lora_B rank {b.shape[1]}; re-save the adapter.")
            s_i = scaling(float(s.config["lora_alpha"]), r, bool(s.config.get("use_rslora")))
            parts_b.append(b.float() * (w * s_i))
        a_cat = torch.cat([a.float() for a in ab["A"]], 0)  # [sum r_i, in]
        b_cat = torch.cat(parts_b, 1)  # [out, sum r_i]
        if len({a.shape[1] for a in ab["A"]}) > 1 or len({b.shape[0] for b in ab["B"]}) > 1:
            raise HerdError(f"the adapters' {module} matrices have different shapes; average adapters of one base model.")
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a_cat, b_cat
        ranks.append(a_cat.shape[0])
    if len(set(ranks)) > 1:
        raise HerdError("the adapters adapt different modules with different ranks; average adapters made with one "
                        "LoRA setting.")
    rank = ranks[0]
    config = dict(sources[0].config)
    config.update(r=rank, lora_alpha=rank, use_rslora=False)  # scaling 1: each w_i s_i is inside B
    with fileio.atomic_folder(out, overwrite=overwrite, replaceable=lambda d: (d / CONFIG).is_file()) as tmp:
        write_safetensors(tmp / WEIGHTS, tensors, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return f"LoRA adapter of rank {rank} ({len(modules)} modules; the ranks of the inputs stacked)"


def average_checkpoints(paths: Sequence[str | os.PathLike], out: str | os.PathLike, format: str | None = None,
                        dtype: torch.dtype | str | None = None, weights: Sequence[float] | None = None,
                        shards: int = 1, tokenizer: str | os.PathLike | None = None, overwrite: bool = False,
                        progress: bool = True) -> str:
    """Write the weighted average of `paths` to `out`; returns a description of what was written.

    format: herd / hf / meta for models (default herd); reward models are written as
    LlamaForSequenceClassification (hf) and adapters in peft's layout whatever it says.
    dtype: of the output (default: the first input's). weights: one per input (normalized; default equal).
    """
    from herd.checkpoint.common import parse_dtype

    if len(paths) < 2:
        raise HerdError("averaging needs at least two checkpoints.")
    out = Path(out)
    if any(Path(p).resolve() == out.resolve() for p in paths):
        raise HerdError(f"OUT {out} is one of the inputs; write the average to a new folder.")
    sources = [open_source(p) for p in paths]
    _check_same(sources)
    w = _weights(weights, len(sources))
    kind = sources[0].kind
    if kind == "adapter":
        if format not in (None, "peft"):
            raise HerdError("averaged adapters are written in peft's layout; drop --format.")
        return _average_adapters(sources, w, out, overwrite)
    if kind == "reward" and format not in (None, "hf"):
        raise HerdError("reward models are written as transformers' LlamaForSequenceClassification (hf); drop --format.")
    tok = _tokenizer(sources, tokenizer)
    state = average_tensors(sources, w, parse_dtype(dtype), progress)
    args = sources[0].args
    if kind == "reward":
        return _save_reward(sources, state, out, tok, shards, overwrite)
    from herd.checkpoint import save_checkpoint
    from herd.checkpoint.common import model_from_state_dict

    model = model_from_state_dict(args, state, source="the averaged weights")
    fmt = format or "herd"
    save_checkpoint(model, out, format=fmt, shards=shards, tokenizer_path=tok, overwrite=overwrite)
    dt = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    return f"{fmt} checkpoint ({dt}{', tokenizer' if tok else ''})"


def _save_reward(sources: list[Source], state: dict[str, Tensor], out: Path, tok: Path | None, shards: int,
                 overwrite: bool) -> str:
    from herd.posttrain.reward import RewardConfig, RewardModel, save_reward_model

    styles = {json.dumps(s.config.get("herd_reward"), sort_keys=True) for s in sources}
    if len(styles) > 1:
        raise HerdError("the reward models read conversations in different chat styles; average models trained "
                        "on one format.")
    extra = sources[0].config.get("herd_reward") or {}
    config = RewardConfig(chat_style=extra.get("chat_style", "hf"), pad_id=sources[0].config.get("pad_token_id"),
                          **({"date_string": extra["date_string"]} if "date_string" in extra else {}))
    with torch.device("meta"):
        model = RewardModel(sources[0].args, config)
    model.load_state_dict(state, assign=True, strict=True)
    model.reset_buffers()
    save_reward_model(model, out, tokenizer_path=tok, shards=shards, overwrite=overwrite)
    dt = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    return f"reward model ({dt}{', tokenizer' if tok else ''})"
