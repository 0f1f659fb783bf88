"""GGUF, llama.cpp's single-file format (also what Ollama runs): write herd models, read llama GGUFs.

    write_gguf(model, tokenizer, "model.gguf", qtype="q8_0")     # f32 | f16 | bf16 | q8_0 | q4_0
    model = load_checkpoint("model.gguf")                          # dequantized to float

Writing uses the `gguf` package (llama.cpp's own Python writer, gguf-py) for GGUF v3 and the
`llama` architecture (gguf constants.py, llama.cpp src/llama-model.cpp):

- hyper-parameters under `llama.*`; RoPE base and dimension count; Llama 3.1 frequency scaling as
  the extra `rope_freqs.weight` tensor of per-frequency divisors, as llama.cpp's converter writes it
  (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors);
- tensor names token_embd, blk.N.attn_q/k/v/output, ffn_gate (w1) / ffn_up (w3) / ffn_down (w2),
  attn_norm, ffn_norm, output_norm, output; a tied model has no `output` and llama.cpp reuses
  token_embd;
- no q/k permutation: llama.cpp's LLM_ARCH_LLAMA applies "normal" RoPE to adjacent pairs, which is
  Meta's layout and herd's. (llama.cpp's converter permutes Hugging Face checkpoints *back* to it.)
- Q8_0 / Q4_0 blocks from herd.quant.ggml (bit-equal to gguf.quants); norms and rope_freqs stay F32,
  rows not a multiple of 32 fall back to F16. q4_0 keeps token_embd / output at Q8_0 (llama.cpp's
  own Q4_0 recipe keeps the output matrix at higher precision too);
- the tokenizer (herd.checkpoint.gguf_vocab) and a Llama 3 chat template;
- `herd.model_args`: herd's exact ModelArgs as JSON, so a herd GGUF reads back without guessing.

Tensors are computed and written one at a time (tensor infos first, then data), so exporting
needs about one tensor of extra memory; the file is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from herd import fileio
from herd.checkpoint.common import model_from_state_dict
from herd.checkpoint.gguf_vocab import LLAMA3_CHAT_TEMPLATE, gguf_vocab, ranks_from_gguf
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer, rope_frequencies
from herd.quant.ggml import BLOCK, quantize_blocks, dequantize_blocks
from herd.tokenizer import Tokenizer

QTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")

_LAYER_NAMES = {  # herd name inside layers.N -> GGUF name inside blk.N
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}


def gguf_name(name: str) -> str:
    """herd parameter name -> GGUF tensor name (layers.3.attention.wq.weight -> blk.3.attn_q.weight)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, i, rest = name.split(".", 2)
    return f"blk.{i}.{_LAYER_NAMES[rest]}"


def herd_name(name: str) -> str | None:
    """GGUF tensor name -> herd parameter name (None for a name herd does not know)."""
    top = {v: k for k, v in _TOP_NAMES.items()}
    if name in top:
        return top[name]
    parts = name.split(".", 2)
    layer = {v: k for k, v in _LAYER_NAMES.items()}
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer:
        return f"layers.{parts[1]}.{layer[parts[2]]}"
    return None


def rope_factors(args: ModelArgs) -> Tensor:
    """llama.cpp's rope_freqs: per frequency, the number the base frequency is divided by. float32 [head_dim / 2]."""
    base = rope_frequencies(ModelArgs(**{**args.to_dict(), "use_scaled_rope": False}))
    return (base / rope_frequencies(args)).float()


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    ggml_type: Any  # gguf.GGMLQuantizationType (gguf is imported lazily)
    nbytes: int
    data: Callable[[], np.ndarray]


def _tensor_type(name: str, t: Tensor, qtype: str):
    """The GGML type a tensor is stored as for this export type."""
    from gguf import GGMLQuantizationType as G

    if t.ndim == 1 or qtype == "f32":
        return G.F32
    if qtype in ("q8_0", "q4_0") and t.shape[-1] % BLOCK == 0:
        big = name in ("token_embd.weight", "output.weight")
        return G.Q8_0 if qtype == "q8_0" or big else G.Q4_0
    return G.BF16 if qtype == "bf16" else G.F16


def _encode(t: Tensor, ggml_type) -> np.ndarray:
    from gguf import GGMLQuantizationType as G

    t = t.detach().cpu()
    if ggml_type == G.F32:
        return t.float().contiguous().numpy()
    if ggml_type == G.F16:
        return t.half().contiguous().numpy()
    if ggml_type == G.BF16:
        return t.bfloat16().contiguous().view(torch.uint8).numpy()  # [N, 2K] bytes
    return quantize_blocks(t, "q8_0" if ggml_type == G.Q8_0 else "q4_0").numpy()


def _nbytes(shape: tuple[int, ...], ggml_type) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[ggml_type]
    return math.prod(shape) // block * size


def _plan(model: Transformer, qtype: str) -> list[_Planned]:
    plan = []
    state = model.state_dict()
    for name, t in state.items():
        g = gguf_name(name)
        ggml_type = _tensor_type(g, t, qtype)
        plan.append(_Planned(g, tuple(t.shape), ggml_type, _nbytes(tuple(t.shape), ggml_type),
                             lambda t=t, ty=ggml_type: _encode(t, ty)))
    if model.args.use_scaled_rope:
        from gguf import GGMLQuantizationType as G

        factors = rope_factors(model.args)
        plan.append(_Planned("rope_freqs.weight", tuple(factors.shape), G.F32, factors.numel() * 4,
                             lambda: factors.numpy()))
    return plan


def _file_type(qtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[qtype]


def write_gguf(model: Transformer, tokenizer: Tokenizer, path: str | Path, qtype: str = "f16",
               name: str = "herd", chat_template: str | None = LLAMA3_CHAT_TEMPLATE, progress: bool = True) -> Path:
    """Write `model` and its tokenizer as a GGUF file llama.cpp and Ollama load. Returns the path."""
    import gguf

    if qtype not in QTYPES:
        raise HerdError(f"unknown GGUF type '{qtype}'; use one of: {', '.join(QTYPES)}.")
    if getattr(model, "quantization", None) is not None:
        raise HerdError("this model is quantized in herd's int8/int4 format; export the float checkpoint "
                        "(GGUF gets its own q8_0/q4_0 blocks with --type).")
    args = model.args
    if tokenizer.n_words > args.vocab_size:
        raise HerdError(f"the tokenizer has {tokenizer.n_words} tokens but the model only {args.vocab_size} rows; "
                        "use the tokenizer the model was trained with.")
    path = Path(path)
    w = gguf.GGUFWriter(path=None, arch="llama")
    w.add_name(name)
    w.add_file_type(_file_type(qtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_dim)
    if args.head_dim * args.n_heads != args.dim:
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    w.add_string("herd.model_args", json.dumps(args.to_dict()))

    tokens, types, merges = gguf_vocab(tokenizer, args.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_eot_token_id(tokenizer.eot_id)
    w.add_eom_token_id(tokenizer.eom_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(True)
    if chat_template:
        w.add_chat_template(chat_template)

    plan = _plan(model, qtype)
    for p in plan:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.ggml_type)
    total = sum(p.nbytes for p in plan)
    with fileio.atomic_path(path) as tmp, torch.no_grad():
        try:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {path.name}", leave=False,
                      disable=not progress or total < 64 * 2**20) as bar:
                for p in plan:
                    data = p.data()
                    if data.nbytes != p.nbytes:  # a bug, not bad input: never write a file llama.cpp misreads
                        raise RuntimeError(f"{p.name}: {data.nbytes} bytes encoded, {p.nbytes} planned")
                    w.write_tensor_data(data)
                    bar.update(p.nbytes)
        finally:
            w.close()
    return path


# ---------------------------------------------------------------------------------------------
# Reading


class _Reader:
    """A GGUFReader with HerdErrors for files that are not (complete) llama GGUFs."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = path
        try:
            self.r = GGUFReader(path)
        except (ValueError, IndexError, OSError, KeyError, TypeError, OverflowError) as e:
            reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
            raise HerdError(f"{path} is not a readable GGUF file, or it is truncated ({reason}); "
                            "re-download or re-export it.") from None
        arch = self.get("general.architecture")
        if arch != "llama":
            raise HerdError(f"{path} holds a '{arch}' model; herd reads GGUF files of the 'llama' architecture "
                            "(Llama 3 and models with its shape) only.")

    def get(self, key: str, default=None):
        field = self.r.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise HerdError(f"{self.path} lacks the metadata key {key}; it is not a complete llama GGUF file.")
        return value

    def tensors(self) -> dict[str, object]:
        return {t.name: t for t in self.r.tensors}


def _args_from_metadata(rd: _Reader, tensors: dict) -> ModelArgs:
    """ModelArgs from herd's own record, else from the llama.* keys (and rope_freqs, if present)."""
    recorded = rd.get("herd.model_args")
    if recorded:
        try:
            return ModelArgs.from_dict(json.loads(recorded))
        except (ValueError, TypeError) as e:
            raise HerdError(f"{rd.path} has an invalid herd.model_args record ({e}); re-export the file.") from None
    from herd.checkpoint.hf import _ffn_args

    dim = int(rd.require("llama.embedding_length"))
    n_heads = int(rd.require("llama.attention.head_count"))
    ffn = int(rd.require("llama.feed_forward_length"))
    multiple_of, mult = _ffn_args({"intermediate_size": ffn}, dim)
    embd = tensors.get("token_embd.weight")
    vocab = rd.get("llama.vocab_size") or (int(embd.shape[-1]) if embd is not None else None) \
        or len(rd.require("tokenizer.ggml.tokens"))
    head_dim = rd.get("llama.attention.key_length") or rd.get("llama.rope.dimension_count") or dim // n_heads
    scaling = rd.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise HerdError(f"{rd.path} uses RoPE scaling '{scaling}', which Llama 3 does not; herd supports "
                        "Llama 3.1's scaling (rope_freqs) only.")
    kw = dict(dim=dim, n_layers=int(rd.require("llama.block_count")), n_heads=n_heads,
              n_kv_heads=int(rd.get("llama.attention.head_count_kv") or n_heads), vocab_size=int(vocab),
              multiple_of=multiple_of, ffn_dim_multiplier=mult,
              norm_eps=float(rd.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
              rope_theta=float(rd.get("llama.rope.freq_base", 10000.0)),
              max_seq_len=int(rd.get("llama.context_length", 8192)),
              tie_embeddings="output.weight" not in tensors, head_dim=int(head_dim))
    try:
        args = ModelArgs(**kw)
    except (TypeError, ValueError) as e:
        raise HerdError(f"{rd.path} has model hyper-parameters herd cannot use ({e}).") from None
    if "rope_freqs.weight" in tensors:
        args = _match_rope_scaling(args, _tensor(tensors["rope_freqs.weight"], rd.path).flatten(), rd.path)
    return args


def _match_rope_scaling(args: ModelArgs, factors: Tensor, path: Path) -> ModelArgs:
    """Llama 3.1 scaling parameters that reproduce a file's rope_freqs (factor = the largest divisor;
    the low/high frequency factors and original length of Llama 3.1 / 3.2, checked to 1e-4)."""
    candidate = ModelArgs(**{**args.to_dict(), "use_scaled_rope": True, "rope_scale_factor": float(factors.max()),
                             "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
                             "rope_original_max_seq_len": 8192})
    expected = rope_factors(candidate)
    if expected.shape != factors.shape or not torch.allclose(expected, factors.float(), rtol=1e-4, atol=1e-4):
        raise HerdError(f"{path} has rope_freqs that do not follow Llama 3.1's scaling rule; herd cannot "
                        "reproduce its RoPE.")
    return candidate


def _tensor(t, path: Path, dtype: torch.dtype | None = None) -> Tensor:
    """A GGUF tensor as a float torch tensor in PyTorch's [out, in] order (dequantized)."""
    from gguf import GGMLQuantizationType as G

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    kind = G(t.tensor_type)
    data = np.asarray(t.data)
    if kind == G.F32:
        out = torch.from_numpy(data.astype(np.float32, copy=True)).reshape(shape)
    elif kind == G.F16:
        out = torch.from_numpy(data.astype(np.float16, copy=True)).reshape(shape)
    elif kind == G.BF16:
        out = torch.from_numpy(np.ascontiguousarray(data).view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
    elif kind in (G.Q8_0, G.Q4_0):
        fmt = "q8_0" if kind == G.Q8_0 else "q4_0"
        out = dequantize_blocks(torch.from_numpy(np.array(data, copy=True)), fmt).reshape(shape)
    else:
        raise HerdError(f"tensor {t.name} in {path} is stored as {kind.name}, which herd cannot read (it reads "
                        "F32, F16, BF16, Q8_0 and Q4_0); requantize the file to one of those with llama.cpp's "
                        "llama-quantize, or export it again.")
    return out if dtype is None else out.to(dtype)


def load_args(path: Path) -> ModelArgs:
    rd = _Reader(path)
    return _args_from_metadata(rd, rd.tensors())


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """A float model from a llama GGUF file (quantized tensors are dequantized; dtype default float32)."""
    rd = _Reader(path)
    tensors = rd.tensors()
    args = _args_from_metadata(rd, tensors)
    state: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue
        key = herd_name(name)
        if key is None:
            raise HerdError(f"{path} has a tensor '{name}' that a Llama model does not have; herd reads plain "
                            "llama GGUF files only.")
        state[key] = _tensor(t, path, dtype or torch.float32)
    if args.tie_embeddings:
        state.pop("output.weight", None)
    return model_from_state_dict(args, state, device, dtype, source=str(path))


def read_tokenizer(path: str | Path) -> Tokenizer | None:
    """herd's Tokenizer from a GGUF's vocabulary, when it has Llama 3's layout (None otherwise)."""
    rd = _Reader(Path(path))
    if rd.get("tokenizer.ggml.model") != "gpt2":
        return None
    ranks = ranks_from_gguf(rd.get("tokenizer.ggml.tokens") or [], rd.get("tokenizer.ggml.token_type") or [])
    return None if ranks is None else Tokenizer(ranks, name=Path(path).stem)


def tokenizer_file_text(tokenizer: Tokenizer) -> str:
    """A tokenizer.model (tiktoken format: base64 token, rank) for `tokenizer`'s BPE ranks."""
    import base64

    return "".join(f"{base64.b64encode(tokenizer.token_bytes(i)).decode()} {i}\n" for i in range(tokenizer.n_bpe))
