"""int8 / int4 weight-only quantization and llama.cpp's Q8_0 / Q4_0 blocks.

References: hand-written formulas (per-channel and group-wise error bounds), the float model (logits
cosine, greedy agreement), autograd through the dequantized weight (input gradients), and
llama.cpp's own Python quantizer `gguf.quants` (bit equality of Q8_0 / Q4_0 blocks).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from herd.checkpoint import load_checkpoint, save_checkpoint
from herd.errors import HerdError
from herd.inference import Engine, SamplingParams
from herd.model import ModelArgs, Transformer
from herd.quant import (Int4Linear, Int8Linear, QuantConfig, dequantize_blocks, dequantize_int4, quantize_blocks,
                        quantize_int4, quantize_int8, quantize_model)
from herd.quant.int4 import _from_cpu_layout, _to_cpu_layout, int4_kernel_available, pack_nibbles, unpack_nibbles


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def tiny_model(seed: int = 0, **kw) -> Transformer:
    args = ModelArgs(**{**dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=64,
                               max_seq_len=128, tie_embeddings=True), **kw})
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():  # peaked next-token distributions, as a trained model has
        model.tok_embeddings.weight.mul_(4)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# int8


def test_int8_per_channel_formula_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different ranges
    w[5] = 0  # an all-zero row
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    expected = (w.abs().amax(1) / 127).to(torch.bfloat16)  # max |w| / 127, rounded to bf16
    assert torch.equal(scale[w.abs().amax(1) > 0], expected[w.abs().amax(1) > 0])
    err = (q.float() * scale.float().unsqueeze(1) - w).abs()
    assert (err <= scale.float().unsqueeze(1) / 2 * 1.0001).all()
    assert torch.equal(q[5], torch.zeros(96, dtype=torch.int8))


def test_int8_linear_kernel_and_fallback_match_dequantized_weight():
    torch.manual_seed(0)
    w = torch.randn(80, 64)
    layer = Int8Linear.from_float(w)
    ref_w = layer.dequantize()
    for rows in (1, 3, 40):  # 1 and 3: the int8 kernel (bf16 activations); 40: dequantize + GEMM
        x = torch.randn(rows, 64)
        y = layer(x)
        assert y.dtype == torch.float32 and y.shape == (rows, 80)
        # the kernel rounds activations and outputs to bf16 (8 mantissa bits): ~0.3% relative error
        assert rel_err(y, F.linear(x, ref_w)) < 1e-2
    x = torch.randn(2, 5, 64)  # batch and sequence dims
    assert rel_err(layer(x), F.linear(x, ref_w)) < 1e-2
    big = Int8Linear.from_float(torch.randn(1100, 64))  # prefill dequantizes 512 rows at a time
    x = torch.randn(3, 20, 64)
    torch.testing.assert_close(big(x), F.linear(x, big.dequantize()), rtol=1e-5, atol=1e-4)


def test_int8_input_gradient_is_the_gradient_through_the_dequantized_weight():
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(48, 32))
    x = torch.randn(4, 32, requires_grad=True)
    g = torch.randn(4, 48)
    (layer(x) * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, layer.dequantize()) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert not any(b.requires_grad for b in layer.buffers())


# ---------------------------------------------------------------------------------------------
# int4


def test_int4_group_formula_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(32, 256) * 3
    for group in (32, 128):
        q, sz = quantize_int4(w, group)
        assert q.max() <= 15 and sz.shape == (256 // group, 32, 2) and sz.dtype == torch.bfloat16
        g = w.reshape(32, -1, group)
        scale = ((g.amax(-1) - g.amin(-1)) / 15).to(torch.bfloat16).float()  # (max - min) / 15
        assert torch.equal(sz[..., 0].float().T, scale)
        err = (dequantize_int4(q, sz) - w).abs().reshape(32, -1, group)
        # half a step, plus the bf16 rounding of the zero point (up to 1/256 of its magnitude)
        bound = scale / 2 + sz[..., 1].float().T.abs() / 256
        assert (err <= bound.unsqueeze(-1) * 1.0001).all()


@pytest.mark.parametrize("n", [16, 48, 64, 80, 192])
def test_int4_cpu_layout_round_trip(n):
    if not int4_kernel_available(torch.device("cpu")):
        pytest.skip("no CPU int4 kernel in this torch build")
    q = torch.randint(0, 16, (n, 128), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    assert torch.equal(_from_cpu_layout(_to_cpu_layout(q), n, 128), q)


def test_int4_linear_matches_dequantized_weight_and_saves_portable_layout():
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    layer = Int4Linear.from_float(w, group_size=32)
    q, sz = quantize_int4(w, 32)
    assert torch.equal(layer.state_dict()["weight_int4"], pack_nibbles(q))  # whatever the in-memory layout
    ref_w = dequantize_int4(q, sz)
    for rows in (1, 20):
        x = torch.randn(rows, 128)
        assert rel_err(layer(x), F.linear(x, ref_w)) < 1e-2
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, ref_w.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


def test_int4_rejects_shapes_it_cannot_pack():
    with pytest.raises(HerdError, match="multiple of the group size"):
        quantize_int4(torch.randn(32, 100), 32)
    with pytest.raises(HerdError, match="int4 group size"):
        QuantConfig(method="int4", group_size=48)
    with pytest.raises(HerdError, match="unknown quantization"):
        QuantConfig(method="int3")


# ---------------------------------------------------------------------------------------------
# Whole models


@pytest.mark.parametrize("config, min_cos", [(QuantConfig("int8"), 0.999), (QuantConfig("int4", 32), 0.98),
                                             (QuantConfig("int4", 128, output="none"), 0.98)])
def test_quantized_model_logits_and_greedy_agree_with_float(config, min_cos):
    model = tiny_model()
    qmodel = quantize_model(copy.deepcopy(model), config)
    assert qmodel.quantization == config
    kinds = {type(m).__name__ for m in qmodel.modules()}
    assert "Linear" not in kinds or config.output == "none"
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 512, (8, 24), generator=gen)  # held-out: not used to build anything
    with torch.no_grad():
        ref, out = model(prompts), qmodel(prompts)
    cos = F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1)
    assert cos.min() >= min_cos
    if config.method == "int8":  # greedy decoding agrees token for token on every prompt
        params = SamplingParams(temperature=0, max_new_tokens=12)
        plist = prompts[:, :8].tolist()
        a = Engine(model, max_batch_size=8, max_seq_len=32).generate(plist, params)
        b = Engine(qmodel, max_batch_size=8, max_seq_len=32).generate(plist, params)
        same = sum(x.tokens == y.tokens for x, y in zip(a, b))
        assert same >= 7  # near-ties may flip one continuation out of 8


def test_quantized_checkpoint_saves_and_loads_without_requantizing(tmp_path):
    for config in (QuantConfig("int8"), QuantConfig("int4", 32)):
        model = tiny_model(tie_embeddings=False)
        qmodel = quantize_model(model, config)
        path = save_checkpoint(qmodel, tmp_path / config.method)
        loaded = load_checkpoint(path)
        assert loaded.quantization == config
        loaded_state = loaded.state_dict()
        for k, v in qmodel.state_dict().items():
            assert torch.equal(loaded_state[k], v), k
        # the int8 kernel crashes on misaligned data, and memory-mapped tensors can start anywhere
        assert all(b.data_ptr() % 64 == 0 for n, b in loaded.named_buffers() if not b.is_floating_point()
                   or n.endswith(("scale", "scales_zeros")))
        x = torch.randint(0, 512, (1, 10))
        with torch.no_grad():
            assert torch.equal(loaded(x), qmodel(x))
        with pytest.raises(HerdError, match="only be saved in herd's own format"):
            save_checkpoint(qmodel, tmp_path / "hf", format="hf")
        with pytest.raises(HerdError, match="already quantized"):
            quantize_model(loaded, config)


# ---------------------------------------------------------------------------------------------
# llama.cpp blocks


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_q8_0_q4_0_blocks_bit_equal_to_gguf_reference(fmt):
    gguf = pytest.importorskip("gguf")
    kind = gguf.GGMLQuantizationType.Q8_0 if fmt == "q8_0" else gguf.GGMLQuantizationType.Q4_0
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = torch.linspace(-1, 1, 32)  # values on exact half steps
    w[2] *= 1e-4
    w[3] *= 1e4
    w[4, :32] = 0.5  # every value tied for the largest
    got = quantize_blocks(w, fmt).numpy()
    ref = gguf.quants.quantize(w.numpy(), kind)
    assert got.shape == ref.shape and np.array_equal(got, ref)
    assert np.array_equal(dequantize_blocks(torch.from_numpy(ref), fmt).numpy(), gguf.quants.dequantize(ref, kind))
    with pytest.raises(HerdError, match="multiple of 32"):
        quantize_blocks(torch.randn(4, 40), fmt)


def test_quantize_refuses_wrapped_layers():
    """A LoRA-wrapped layer is not silently quantized around (its adapter matrices included)."""
    from herd.posttrain.lora import LoRAConfig, apply_lora

    model = tiny_model()
    apply_lora(model, LoRAConfig(lora_rank=4))
    with pytest.raises(HerdError, match="merge adapters"):
        quantize_model(model, "int8")
