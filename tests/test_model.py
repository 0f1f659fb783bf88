"""The model against Hugging Face transformers' LlamaForCausalLM, and its own invariants.

The weights go to transformers through the q/k permutation of Hugging Face's converter (transformers'
convert_llama_weights_to_hf.py), written out here independently of herd.checkpoint so a mistake in either shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from herd import ModelArgs, Transformer, get_preset
from herd.model import document_mask, document_positions, rope_frequencies

transformers = pytest.importorskip("transformers")


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _to_hf(model: Transformer, scaling: dict | None) -> "transformers.LlamaForCausalLM":
    a = model.args
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        head_dim=a.head_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
        max_position_embeddings=a.max_seq_len, tie_word_embeddings=a.tie_embeddings, rope_scaling=scaling,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.tok_embeddings.weight if a.tie_embeddings else model.output.weight}
    for i, layer in enumerate(model.layers):
        p, att, ff = f"model.layers.{i}.", layer.attention, layer.feed_forward
        sd[p + "self_attn.q_proj.weight"] = _permute(att.wq.weight, a.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _permute(att.wk.weight, a.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = att.wv.weight
        sd[p + "self_attn.o_proj.weight"] = att.wo.weight
        sd[p + "mlp.gate_proj.weight"] = ff.w1.weight
        sd[p + "mlp.up_proj.weight"] = ff.w3.weight
        sd[p + "mlp.down_proj.weight"] = ff.w2.weight
        sd[p + "input_layernorm.weight"] = layer.attention_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


CASES = {
    "gqa": (dict(n_kv_heads=2), None),
    "single-kv-head": (dict(n_kv_heads=1), None),
    "rope-3.1-factor-8": (dict(n_kv_heads=2, use_scaled_rope=True, rope_scale_factor=8.0), 8.0),
    "rope-3.2-factor-32-tied": (dict(n_kv_heads=4, use_scaled_rope=True, rope_scale_factor=32.0, tie_embeddings=True), 32.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    overrides, factor = CASES[case]
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=320, multiple_of=32, max_seq_len=32768, **overrides)
    model = Transformer(args).eval()
    model.init_weights(std=0.1)  # larger than training init so attention patterns are not uniform
    scaling = None if factor is None else {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    hf = _to_hf(model, scaling)
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    with torch.no_grad():
        ours = model(tokens)
        ref = hf(tokens).logits
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
        # Far positions exercise the long-wavelength part of the 3.1 scaling.
        pos = torch.arange(24) + 20000
        torch.testing.assert_close(model(tokens, positions=pos), hf(tokens, position_ids=pos.expand(2, -1)).logits,
                                   atol=1e-5, rtol=1e-4)


def test_rope_scaling_by_hand():
    """Three frequencies of the Llama 3.1 rule computed by hand from apply_scaling in Meta's llama-models reference."""
    args = ModelArgs(dim=128, n_heads=1, use_scaled_rope=True, rope_scale_factor=8.0)
    freqs = rope_frequencies(args)
    base = [500000.0 ** (-2 * i / 128) for i in range(64)]
    bands = {}
    for i in (0, 32, 63):
        wl = 2 * math.pi / base[i]
        if wl < 8192 / 4:
            want, bands[i] = base[i], "kept"
        elif wl > 8192:
            want, bands[i] = base[i] / 8, "divided"
        else:
            s = (8192 / wl - 1) / 3
            want, bands[i] = (1 - s) * base[i] / 8 + s * base[i], "blended"
        assert freqs[i].item() == pytest.approx(want, rel=1e-5)
    assert bands == {0: "kept", 32: "blended", 63: "divided"}  # all three rules are exercised


def test_document_masking_equals_separate_documents():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32)
    model = Transformer(args).eval()
    model.init_weights(std=0.1)
    lengths = [5, 9, 3, 7]
    docs = [torch.randint(0, 100, (n,)) for n in lengths]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        out = model(packed, document_ids=doc_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


def test_document_positions_and_mask_by_hand():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0]]
    m = document_mask(ids)[0, 0]
    assert m[4].tolist() == [False, False, False, True, True, False]
    assert m[2].tolist() == [True, True, True, False, False, False]


def test_meta_device_build_then_init():
    with torch.device("meta"):
        model = Transformer(get_preset("herd-1m"))
    assert model.tok_embeddings.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(torch.randint(0, 4096, (1, 8)))
    assert torch.isfinite(out).all() and out.shape == (1, 8, 4096)
    # The rope buffer was recomputed, not left as uninitialized memory.
    torch.testing.assert_close(model.rope_inv_freq, rope_frequencies(model.args))


@pytest.mark.parametrize("name,hidden", [("llama3-8b", 14336), ("llama3-70b", 28672), ("llama3.1-405b", 53248),
                                         ("llama3.2-1b", 8192), ("llama3.2-3b", 8192)])
def test_official_ffn_sizes(name, hidden):
    assert get_preset(name).hidden_dim == hidden


def test_bad_args_say_why():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        ModelArgs(dim=65, n_heads=4)
