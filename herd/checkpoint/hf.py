"""Hugging Face format: config.json (LlamaForCausalLM) + model.safetensors (or shards + index).

Two differences from herd's own layout (transformers' convert_llama_weights_to_hf.py):
- names: model.layers.N.self_attn.q_proj <-> layers.N.attention.wq, and so on (_LAYER_NAMES);
- RoPE convention: Hugging Face rotates halves of each head, Meta adjacent pairs, so the rows of
  wq and wk are permuted within each head (n_kv_heads heads for wk). wv and wo are not.

`hf_config`, `to_hf_state_dict` and `from_hf_state_dict` are public so other parts (bench/decode,
tests) can build a transformers model from herd weights without going through files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from herd.checkpoint.common import (dtype_name, model_from_state_dict, read_json, read_safetensors_folder,
                                    write_safetensors_shards)
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer

_LAYER_NAMES = {  # herd name inside layers.N -> Hugging Face name inside model.layers.N
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
# (multiple_of, ffn_dim_multiplier) pairs of the official family, tried first when recovering them
# from intermediate_size so official checkpoints get their params.json values back.
_FFN_CANDIDATES = [(1024, 1.3), (4096, 1.3), (4096, 1.2), (256, 1.5), (256, 1.0), (256, None)]


def _permute(w: Tensor, n_heads: int) -> Tensor:
    """Meta (adjacent pairs) -> Hugging Face (halves) row order within each head. [out, in] -> [out, in]."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Hugging Face (halves) -> Meta (adjacent pairs) row order; inverse of _permute."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of transformers' LlamaForCausalLM for these ModelArgs."""
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {"rope_type": "llama3", "factor": args.rope_scale_factor,
                        "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                        "original_max_position_embeddings": args.rope_original_max_seq_len}
    official_vocab = args.vocab_size >= 128256  # the Llama 3 special-token ids exist
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": rope_scaling,
        "tie_word_embeddings": args.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": 128000 if official_vocab else None, "eos_token_id": 128001 if official_vocab else None,
        "torch_dtype": dtype_name(dtype), "dtype": dtype_name(dtype),
        # Not read by transformers; lets herd recover the exact feed-forward rounding rule.
        "herd_ffn": {"multiple_of": args.multiple_of, "ffn_dim_multiplier": args.ffn_dim_multiplier},
    }


def _ffn_args(cfg: dict, dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that reproduce intermediate_size with Meta's rounding rule."""
    target = cfg["intermediate_size"]
    extra = cfg.get("herd_ffn") or {}
    candidates = [(extra.get("multiple_of"), extra.get("ffn_dim_multiplier"))] + _FFN_CANDIDATES
    for multiple_of, mult in candidates:
        if isinstance(multiple_of, int) and multiple_of > 0 and \
                ModelArgs(dim=dim, n_heads=1, head_dim=2, multiple_of=multiple_of, ffn_dim_multiplier=mult).hidden_dim == target:
            return multiple_of, mult
    base = int(2 * 4 * dim / 3)
    # Rounding up to a multiple of the target itself lands exactly on it.
    return target, (None if base <= target else target / base)


def args_from_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs from a Hugging Face LlamaForCausalLM config (rope settings under rope_scaling or rope_parameters)."""
    model_type = cfg.get("model_type")
    if model_type is not None and model_type != "llama":
        arch = ", ".join(cfg.get("architectures") or []) or model_type
        raise HerdError(f"{source} describes a '{model_type}' model ({arch}), not Llama; herd loads Llama "
                        "checkpoints (model_type 'llama') only.")
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise HerdError(f"{source} uses rope_type '{rope_type}', which Llama 3 does not; "
                            "herd supports the default and 'llama3' RoPE only.")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        multiple_of, mult = _ffn_args(cfg, dim)
        kw = dict(dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=n_heads,
                  n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads), vocab_size=int(cfg["vocab_size"]),
                  multiple_of=multiple_of, ffn_dim_multiplier=mult, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                  rope_theta=float(theta), max_seq_len=int(cfg.get("max_position_embeddings", 8192)),
                  tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                  head_dim=int(cfg.get("head_dim") or dim // n_heads))
        if rope_type == "llama3":
            kw.update(use_scaled_rope=True, rope_scale_factor=float(rope["factor"]),
                      rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                      rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                      rope_original_max_seq_len=int(rope.get("original_max_position_embeddings", 8192)))
        return ModelArgs(**kw)
    except KeyError as e:
        raise HerdError(f"{source} lacks the field {e}; it is not a complete LlamaForCausalLM config.") from None
    except (TypeError, ValueError) as e:
        raise HerdError(f"{source} has an invalid value ({e}); fix that file.") from None


def to_hf_state_dict(state_dict: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """herd names and RoPE layout -> Hugging Face's (wq/wk rows permuted; tied models get no lm_head)."""
    out = {}
    for k, v in state_dict.items():
        if k in _TOP_NAMES:
            out[_TOP_NAMES[k]] = v
            continue
        _, i, rest = k.split(".", 2)  # layers.N.rest
        if rest == "attention.wq.weight":
            v = _permute(v, args.n_heads)
        elif rest == "attention.wk.weight":
            v = _permute(v, args.n_kv_heads)
        out[f"model.layers.{i}.{_LAYER_NAMES[rest]}"] = v
    return out


def from_hf_state_dict(state_dict: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Hugging Face names and RoPE layout -> herd's. Unknown names are kept (and reported by the loader)."""
    top = {v: k for k, v in _TOP_NAMES.items()}
    layer = {v: k for k, v in _LAYER_NAMES.items()}
    out = {}
    for k, v in state_dict.items():
        if k.endswith("rotary_emb.inv_freq"):  # older transformers saved this buffer; herd recomputes it
            continue
        if k in top:
            if k == "lm_head.weight" and args.tie_embeddings:
                continue  # transformers ties it to the embedding and ignores the stored copy
            out[top[k]] = v
            continue
        parts = k.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in layer:
            name = layer[parts[3]]
            rows = {"attention.wq.weight": args.n_heads * args.head_dim,
                    "attention.wk.weight": args.n_kv_heads * args.head_dim}.get(name)
            if rows is not None and v.ndim == 2 and v.shape[0] == rows:  # else the loader reports the shape
                v = _unpermute(v, rows // args.head_dim)
            out[f"layers.{parts[2]}.{name}"] = v
        else:
            out[k] = v
    return out


def load_args(folder: Path) -> ModelArgs:
    return args_from_config(read_json(folder / "config.json"), source=str(folder / "config.json"))


def load(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    archs = read_json(folder / "config.json").get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise HerdError(f"{folder} is a reward model ({archs[0]}: a scalar head, no vocabulary head), not a language "
                        "model; score with it through `herd score --reward-model` or herd.posttrain.load_reward_model.")
    args = load_args(folder)
    state = from_hf_state_dict(read_safetensors_folder(folder), args)
    return model_from_state_dict(args, state, device, dtype, source=str(folder))


def save(model: Transformer, folder: Path, shards: int = 1) -> None:
    """Write `model` as config.json + safetensors into an (empty, temporary) folder."""
    state = to_hf_state_dict(dict(model.state_dict()), model.args)
    dtype = model.tok_embeddings.weight.dtype
    write_safetensors_shards(folder, state, shards, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(model.args, dtype), indent=2) + "\n")
    gen = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]} if model.args.vocab_size >= 128256 else {}
    (folder / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}, indent=2) + "\n")



def hf_name(name: str) -> str:
    """The Hugging Face name of a herd parameter (layers.0.attention.wq.weight -> model.layers.0.self_attn.q_proj.weight)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "layers" or parts[2] not in _LAYER_NAMES:
        raise HerdError(f"'{name}' is not a herd parameter name with a Hugging Face counterpart.")
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"


def herd_name(name: str) -> str | None:
    """The herd name of a Hugging Face parameter name, or None if it has none (inverse of hf_name)."""
    top = {v: k for k, v in _TOP_NAMES.items()}
    if name in top:
        return top[name]
    layer = {v: k for k, v in _LAYER_NAMES.items()}
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in layer:
        return f"layers.{parts[2]}.{layer[parts[3]]}"
    return None


def _row_heads(name: str, args: ModelArgs) -> int | None:
    """Heads whose rows the RoPE layouts order differently: wq (n_heads), wk (n_kv_heads), else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf_rows(w: Tensor, name: str, args: ModelArgs) -> Tensor:
    """Rows of a [out, k] matrix on herd parameter `name`'s output side in Hugging Face's order
    (permuted within each head for wq / wk; unchanged otherwise). Also serves LoRA B matrices."""
    heads = _row_heads(name, args)
    return w if heads is None else _permute(w, heads)


def from_hf_rows(w: Tensor, name: str, args: ModelArgs) -> Tensor:
    """Inverse of to_hf_rows."""
    heads = _row_heads(name, args)
    return w if heads is None else _unpermute(w, heads)
