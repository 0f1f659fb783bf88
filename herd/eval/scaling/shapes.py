"""Model shapes for scaling sweeps, from one rule in Llama 3's proportions, and their FLOP counts.

The rule, given the depth L (the only free variable):
    dim          = aspect * L            Llama 3 keeps dim / layers near 128 (8B 4096/32, 405B
                                         16384/126); the default aspect 64 lets 1..8-layer models
                                         span the sizes a CPU can train (Llama 3.2 1B has 128 too)
    head_dim     = 64                    (Llama 3.2 1B), so n_heads = dim / head_dim; the CPU
                                         mini-sweep in the README scales aspect and head_dim to 32
    n_kv_heads   = n_heads / 4, rounded down to a divisor of n_heads, at least 1
                                         (grouped-query attention with 4 query heads per KV head, as 8B)
    ffn hidden   = 1.3 * 8/3 * dim rounded up to a multiple of 64   (8B and 70B use 1.3)
    vocabulary   = the training data's tokenizer, embeddings tied   (as Llama 3.2 1B / 3B)
    RoPE theta 500000, RMSNorm eps 1e-5, no biases                  (every Llama 3)

Model size N, as the IsoFLOP fits use it, counts the parameters that cost FLOPs per token: the
non-embedding weights plus the output layer (herd.train.metrics.flops_per_token's 6N term).
Training tokens for a budget C: D = C / flops_per_token(shape, seq_len), attention included.
"""

from __future__ import annotations

from herd.errors import HerdError
from herd.model import ModelArgs
from herd.train.metrics import flops_per_token

HEAD_DIM = 64


def shape_for_depth(n_layers: int, vocab_size: int, seq_len: int, aspect: int = 64,
                    head_dim: int = HEAD_DIM) -> ModelArgs:
    """The ModelArgs of an L-layer model under the rule above."""
    if n_layers < 1:
        raise HerdError(f"a model needs at least 1 layer, got {n_layers}.")
    if head_dim < 2 or head_dim % 2:
        raise HerdError(f"--head-dim {head_dim} must be a positive even number (RoPE rotates pairs).")
    if aspect < head_dim or aspect % head_dim:
        raise HerdError(f"--aspect {aspect} must be a multiple of --head-dim {head_dim}.")
    dim = aspect * n_layers
    heads = dim // head_dim
    kv = max(1, heads // 4)
    while heads % kv:
        kv -= 1
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=kv, vocab_size=vocab_size,
                     multiple_of=64, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                     max_seq_len=seq_len, tie_embeddings=True)


def flop_params(args: ModelArgs) -> int:
    """N: non-embedding parameters plus the output layer (what costs 6 FLOPs per token in training)."""
    non_embedding = args.num_params(exclude_embeddings=True) - (0 if args.tie_embeddings else args.vocab_size * args.dim)
    return non_embedding + args.vocab_size * args.dim


def tokens_for_budget(args: ModelArgs, budget: float, seq_len: int) -> float:
    """D = C / FLOPs per token (6N plus attention at this sequence length)."""
    return budget / flops_per_token(args, seq_len)


def describe(args: ModelArgs) -> str:
    return (f"{args.n_layers} layers, dim {args.dim}, {args.n_heads} heads ({args.n_kv_heads} KV), ffn {args.hidden_dim}, "
            f"N {flop_params(args) / 1e6:.2f}M")
