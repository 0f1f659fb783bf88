"""The Llama 3 transformer: ModelArgs, RMSNorm, RoPE (with Llama 3.1 scaling), GQA attention,
SwiGLU feed-forward, blocks and the full model.

Single device and pure: no torch.distributed, no device moves, no training or inference policy.
Parameter names follow Meta's reference (tok_embeddings, layers.N.attention.wq, ...) so Meta
checkpoints load without a name map. The KV cache, attention masks and positions are passed in
by the caller (herd.inference builds them for decoding, herd.train for packed documents).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention  # the fast document-masked kernel on GPU

from herd.errors import ConfigError


@dataclass
class ModelArgs:
    """Architecture of a Llama 3 model. Field names match Meta's params.json."""

    dim: int = 4096
    """Width of the residual stream."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Query heads per attention layer."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means n_heads."""
    vocab_size: int = 128256
    """Rows of the embedding and output matrices."""
    multiple_of: int = 256
    """The feed-forward hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Scales the default 8/3 * dim feed-forward size before rounding."""
    norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    rope_theta: float = 500000.0
    """RoPE base frequency."""
    use_scaled_rope: bool = False
    """Apply the Llama 3.1 long-context frequency scaling."""
    rope_scale_factor: float = 8.0
    """Llama 3.1 scaling factor (8 for 3.1, 32 for 3.2 1B/3B)."""
    rope_low_freq_factor: float = 1.0
    """Llama 3.1 scaling: wavelengths above original_len / this are divided by the factor."""
    rope_high_freq_factor: float = 4.0
    """Llama 3.1 scaling: wavelengths below original_len / this are kept."""
    rope_original_max_seq_len: int = 8192
    """Llama 3.1 scaling: the context length the model was pre-trained at."""
    max_seq_len: int = 8192
    """Longest sequence (prompt + generation) the model supports."""
    tie_embeddings: bool = False
    """Share the output matrix with tok_embeddings (Llama 3.2 1B/3B)."""
    head_dim: int | None = None
    """Per-head width; None means dim // n_heads."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(
                    f"dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                    "choose a dim that is a multiple of n_heads or set head_dim."
                )
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}; "
                "grouped-query attention needs each KV head to serve the same number of query heads."
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} is odd; RoPE rotates pairs, so it must be even.")

    @property
    def hidden_dim(self) -> int:
        """Feed-forward hidden size, computed as in Meta's reference code."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count from the shape alone (a tied output matrix is the embedding, counted once)."""
        attention = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)  # wq, wo, wk, wv
        block = attention + 3 * self.dim * self.hidden_dim + 2 * self.dim  # + w1, w2, w3 and two norms
        embedding = self.vocab_size * self.dim
        output = 0 if self.tie_embeddings else self.vocab_size * self.dim
        total = self.n_layers * block + self.dim + embedding + output  # + the final norm
        return total - embedding if exclude_embeddings else total

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        """Build from a dict, ignoring keys that are not fields (params.json has extras)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, then scaled by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, with the Llama 3.1 scaling if enabled. float32 [d/2]."""
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32)[: d // 2] / d))
    if not args.use_scaled_rope:
        return freqs
    factor, old_len = args.rope_scale_factor, args.rope_original_max_seq_len
    low_wl = old_len / args.rope_low_freq_factor  # longer wavelengths: divide by factor
    high_wl = old_len / args.rope_high_freq_factor  # shorter wavelengths: keep
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - args.rope_low_freq_factor) / (args.rope_high_freq_factor - args.rope_low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > low_wl, freqs / factor, blended)
    return torch.where(wavelen < high_wl, freqs, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, float32 [..., d/2] for positions [...]."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., d/2]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x [B, S, H, D] by cos/sin [B, S, D/2], in float32 (Meta's convention)."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, S, H, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Static key/value buffers for every layer: [batch, n_kv_heads, max_len, head_dim] each.

    Keys are stored after RoPE and without repetition over query heads (as in Meta's reference).
    The caller chooses which slots a forward writes (cache_pos) and which it reads (the mask width).
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    def update(self, layer: int, k: Tensor, v: Tensor, cache_pos: Tensor | None, kv_len: int) -> tuple[Tensor, Tensor]:
        """Write this step's k, v [B, H, S, D] into slots cache_pos [S] of every row; return the first
        kv_len slots [B, H, kv_len, D] that attention reads.

        Every cache passed to the model has this method: herd.inference's paged cache implements it with
        per-row slots instead (the model only asks "store these, give me what I may read").
        """
        if cache_pos is None:
            raise ValueError("a static KVCache needs cache_pos, the slots this step writes")
        k_buf, v_buf = self.k[layer], self.v[layer]
        k_buf.index_copy_(2, cache_pos, k.to(k_buf.dtype))
        v_buf.index_copy_(2, cache_pos, v.to(v_buf.dtype))
        return k_buf[:, :, :kv_len], v_buf[:, :, :kv_len]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    """Grouped-query self-attention: query head j reads KV head j // (n_heads / n_kv_heads)."""

    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id  # which layer of a KV cache this attention reads and writes
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | Any | None,
                cache: Any | None = None, cache_pos: Tensor | None = None) -> Tensor:
        bsz, seqlen, _ = x.shape
        # Head counts come from the weights (-1), so a tensor-parallel shard holding a slice of the
        # heads runs this same code.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        if cache is not None:  # the mask's last dim says how many cached positions this step reads
            k, v = cache.update(self.layer_id, k, v, cache_pos, mask.shape[-1])
        if isinstance(mask, BlockMask):
            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # [B, S, H * D]
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | Any | None,
                cache: Any | None = None, cache_pos: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, cache_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def document_positions(document_ids: Tensor) -> Tensor:
    """Positions that restart at 0 where the document id changes. [B, S] -> [B, S]."""
    bsz, seqlen = document_ids.shape
    idx = torch.arange(seqlen, device=document_ids.device).expand(bsz, seqlen)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def document_mask(document_ids: Tensor) -> Tensor:
    """Causal mask that also forbids attention across documents. [B, S] -> bool [B, 1, S, S]."""
    seqlen = document_ids.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)  # [B, S, S]
    return (same_doc & causal).unsqueeze(1)


def init_std(name: str, ndim: int, args: ModelArgs, std: float = 0.02) -> float | None:
    """The init rule of one parameter: None for ones (norm weights), else the normal std.

    Normal(0, std) everywhere, except that the projections writing into the residual stream (wo,
    w2) get std / sqrt(2 * n_layers), so the residual variance does not grow with depth (GPT-2).
    """
    if ndim == 1:
        return None
    if name.endswith(("wo.weight", "w2.weight")):
        return std / math.sqrt(2 * args.n_layers)
    return std


class Transformer(nn.Module):
    """The Llama 3 model: tokens [B, S] -> float32 logits [B, S, vocab]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        # Tied models (Llama 3.2 1B/3B) have no output layer of their own: the logits use
        # tok_embeddings.weight directly, so the tie survives to_empty, load_state_dict and FSDP.
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        # Recomputed from args, never saved: a model built on the meta device gets it in init_weights.
        self.register_buffer("rope_inv_freq", rope_frequencies(args), persistent=False)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch (also materializes meta-device models after to_empty):
        each parameter as `init_std` says."""
        for name, p in self.named_parameters():
            s = init_std(name, p.ndim, self.args, std)
            if s is None:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, s)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the RoPE frequencies on the model's current device (after to_empty or load with assign)."""
        device = self.tok_embeddings.weight.device
        if device.type == "meta":
            return
        self.rope_inv_freq = rope_frequencies(self.args, device=device)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count of the architecture (see ModelArgs.num_params; sharded or meta models too)."""
        return self.args.num_params(exclude_embeddings)

    def features(self, tokens: Tensor, *, positions: Tensor | None = None, mask: Tensor | Any | None = None,
                 document_ids: Tensor | None = None, cache: KVCache | None = None,
                 cache_pos: Tensor | None = None) -> Tensor:
        """The final normed hidden states [B, S, dim] (the input of the output layer).

        tokens: LongTensor [B, S].
        positions: RoPE positions [B, S] or [S]; default 0..S-1 (or restarting per document).
        mask: bool [B or 1, 1, S, T] (True = may attend) or a FlexAttention BlockMask; default causal.
            With a cache, T is the number of cache slots read and the mask is required.
        document_ids: [B, S] ids of the packed document each token belongs to; attention stays
            inside a document and positions restart at each document's start.
        cache, cache_pos: a KVCache and the LongTensor [S] of slots this step writes; or any object with
            KVCache's `update(layer, k, v, cache_pos, kv_len)` (herd.inference's paged cache).
        """
        bsz, seqlen = tokens.shape
        if cache is not None and mask is None:
            raise ValueError("decoding with a KV cache needs a mask (its last dim: the cached positions read)")
        if document_ids is not None:
            if positions is None:
                positions = document_positions(document_ids)
            if mask is None:
                mask = document_mask(document_ids)
        if positions is None:
            positions = torch.arange(seqlen, device=tokens.device)
        if positions.ndim == 1:
            positions = positions.unsqueeze(0)
        cos, sin = rope_cos_sin(self.rope_inv_freq, positions)  # [B or 1, S, D/2]
        h = self.tok_embeddings(tokens)  # [B, S, dim]
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, cache_pos)
        return self.norm(h)

    def forward(self, tokens: Tensor, *, positions: Tensor | None = None, mask: Tensor | Any | None = None,
                document_ids: Tensor | None = None, cache: KVCache | None = None,
                cache_pos: Tensor | None = None, last_only: bool = False,
                head: Callable[[Tensor, Tensor], Any] | None = None) -> Any:
        """Float32 logits [B, S, vocab] ([B, 1, vocab] with last_only). Arguments as in features().

        head: instead of the logits, return head(hidden [B, S, dim], output matrix [vocab, dim]),
            computed inside forward (e.g. a loss over slices of the vocabulary, so the full logits
            never exist; wrappers such as FSDP see the output matrix used inside forward).
        """
        h = self.features(tokens, positions=positions, mask=mask, document_ids=document_ids,
                          cache=cache, cache_pos=cache_pos)
        if last_only:
            h = h[:, -1:]
        if head is not None:
            return head(h, self.output_weight())
        return self.logits(h)

    def output_weight(self) -> Tensor:
        """The output matrix [vocab, dim] (the embedding when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def logits(self, h: Tensor) -> Tensor:
        """The output layer: hidden states [..., dim] -> float32 logits [..., vocab]."""
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight).float()
        # A module call, not its weight: a wrapped output layer (a LoRA adapter, with its dropout,
        # or a quantized layer from herd.quant with its own kernel) takes part as it computes itself.
        return self.output(h).float()
