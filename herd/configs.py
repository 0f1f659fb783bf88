"""Named model presets: the official Llama 3 family and small from-scratch sizes.

Presets are looked up by exact name. The official shapes come from Meta's params.json files
(meta-llama/llama-models, models/llama3*/ params.json; Hugging Face config.json of each release). The small sizes keep Llama 3's proportions (SwiGLU at ~8/3 dim, GQA,
head_dim 64, tied embeddings like Llama 3.2 1B/3B) and use a smaller vocabulary, trained with
`herd tokenizer train`, because a 128K-row embedding would be most of a small model:

- herd-1m   (~1.3M): unit tests and CPU demos; trains to a falling loss in a minute on a laptop.
- herd-15m  (~16M): the CPU speedrun size; a few minutes per few million tokens on 2 cores.
- herd-100m (~101M): teaching size (GPT-2-small-like width and depth) for one GPU.
- herd-1b   (~1.24B): Llama 3.2 1B's shape with the official 128K vocabulary, no long-context
  rope scaling, for pre-training from scratch on one or a few GPUs.
"""

from __future__ import annotations

from herd.errors import HerdError
from herd.model import ModelArgs

_LLAMA3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                  multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0)
_LLAMA3_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
                   multiple_of=4096, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0)
_SCALED_31 = dict(use_scaled_rope=True, rope_scale_factor=8.0, max_seq_len=131072)
_SCALED_32 = dict(use_scaled_rope=True, rope_scale_factor=32.0, max_seq_len=131072, tie_embeddings=True)

PRESETS: dict[str, dict] = {
    "llama3-8b": dict(**_LLAMA3_8B, max_seq_len=8192),
    "llama3-70b": dict(**_LLAMA3_70B, max_seq_len=8192),
    "llama3.1-8b": dict(**_LLAMA3_8B, **_SCALED_31),
    "llama3.1-70b": dict(**_LLAMA3_70B, **_SCALED_31),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256,
                          multiple_of=4096, ffn_dim_multiplier=1.2, norm_eps=1e-5, rope_theta=500000.0,
                          **_SCALED_31),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                        multiple_of=256, ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0,
                        **_SCALED_32),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256,
                        multiple_of=256, ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=500000.0,
                        **_SCALED_32),
    "herd-1m": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=64,
                    max_seq_len=512, tie_embeddings=True),
    "herd-15m": dict(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, vocab_size=8192, multiple_of=256,
                     max_seq_len=1024, tie_embeddings=True),
    "herd-100m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32768, multiple_of=256,
                      max_seq_len=2048, tie_embeddings=True),
    "herd-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                    ffn_dim_multiplier=1.5, max_seq_len=8192, tie_embeddings=True),
}


def get_preset(name: str, **overrides) -> ModelArgs:
    """The ModelArgs of a preset by exact name, with optional field overrides."""
    if name not in PRESETS:
        raise HerdError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}.")
    return ModelArgs(**{**PRESETS[name], **overrides})
