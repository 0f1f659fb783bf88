"""GGUF export and import, proved against llama.cpp itself (the prebuilt `xllamacpp` package) and
against llama.cpp's own Python package `gguf` (its reader and its Q8_0/Q4_0 reference quantizer).

- llama.cpp's next-token probabilities on given ids equal herd's forward within 1e-3 (f32), with
  the same greedy continuation; Q8_0 within a stated bound; Llama 3.1 RoPE scaling included.
- A negative control: the same model written with q/k in Hugging Face's rotate-half layout must fail
  that check (greedy tokens alone would not catch it on a small random model).
- llama.cpp tokenizes text (specials, code, non-English, long whitespace) exactly as herd does, for
  Meta's tokenizer and a herd-trained one; the chat template renders herd's ChatFormat("meta").
- The derived BPE merges equal the official tokenizer.json's; GGUF -> herd -> GGUF is byte-identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")

from herd.checkpoint import load_checkpoint  # noqa: E402
from herd.checkpoint.gguf import read_tokenizer, write_gguf  # noqa: E402
from herd.checkpoint.gguf_vocab import gguf_vocab  # noqa: E402
from herd.checkpoint.hf import to_hf_state_dict  # noqa: E402
from herd.errors import HerdError  # noqa: E402
from herd.model import ModelArgs, Transformer  # noqa: E402
from herd.tokenizer import ChatFormat, Tokenizer, train_bpe  # noqa: E402
from llamacpp import llamacpp  # noqa: E402

STDLIB = Path(os.__file__).parent


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Tokenizer:
    """A 768-word BPE (512 ranks + 256 specials) trained by herd on a few stdlib files."""
    files = sorted(p for p in STDLIB.glob("*.py") if 20_000 < p.stat().st_size < 200_000)[:6]
    tok, _ = train_bpe(files, 768, tmp_path_factory.mktemp("tok") / "tokenizer.model", show_progress=False)
    return tok


@pytest.fixture(scope="module")
def official(official_tokenizer_model) -> Tokenizer:
    return Tokenizer.from_file(official_tokenizer_model)


def sharp_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """A random model with peaked next-token distributions and sharp attention, so that probability
    comparisons mean something and a q/k layout error changes the output a lot."""
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=0.05)
    with torch.no_grad():  # logits of std ~3-5: top probabilities between ~0.3 and ~0.9
        model.tok_embeddings.weight.mul_(8 if model.output is not None else 3)
        if model.output is not None:
            model.output.weight.mul_(12)
        for layer in model.layers:
            layer.attention.wq.weight.mul_(6)
            layer.attention.wk.weight.mul_(6)
    return model.eval()


def small_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=768, multiple_of=32, max_seq_len=256)
    return ModelArgs(**{**base, **kw})


def herd_probs(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([ids]))[0, -1].double(), -1)


def max_prob_error(server, model: Transformer, prompt: list[int], lengths=(3, 9, 17, 24)) -> float:
    """Largest |p_llama.cpp - p_herd| over llama.cpp's top-10 tokens at several prompt prefixes."""
    worst = 0.0
    for n in lengths:
        ref = herd_probs(model, prompt[:n])
        for token, p in server.top_probs(prompt[:n], k=10).items():
            worst = max(worst, abs(p - ref[token].item()))
    return worst


def herd_greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


PROMPT_TEXT = "def parse(self, text):\n    return [line.strip() for line in text.splitlines()]\n"


# ---------------------------------------------------------------------------------------------
# llama.cpp runs herd's file


def test_llamacpp_f32_probabilities_and_greedy_match_herd(tmp_path, small_tokenizer):
    model = sharp_model(small_args())
    path = write_gguf(model, small_tokenizer, tmp_path / "m.gguf", qtype="f32", progress=False)
    prompt = small_tokenizer.encode(PROMPT_TEXT, bos=True)[:24]
    assert len(prompt) == 24
    top = herd_probs(model, prompt).max().item()
    assert top > 0.2  # the check below compares real probability mass, not near-uniform noise
    with llamacpp(path) as server:
        assert max_prob_error(server, model, prompt) < 1e-3
        assert server.greedy(prompt, 8) == herd_greedy(model, prompt, 8)


def test_negative_control_hf_qk_layout_is_caught(tmp_path, small_tokenizer):
    """Writing wq/wk in Hugging Face's rotate-half row order (what a converter that forgets llama.cpp
    wants Meta's layout would do) must fail the probability check above."""
    model = sharp_model(small_args())
    wrong = sharp_model(small_args())
    hf = to_hf_state_dict(dict(model.state_dict()), model.args)
    with torch.no_grad():
        for i, layer in enumerate(wrong.layers):
            layer.attention.wq.weight.copy_(hf[f"model.layers.{i}.self_attn.q_proj.weight"])
            layer.attention.wk.weight.copy_(hf[f"model.layers.{i}.self_attn.k_proj.weight"])
    path = write_gguf(wrong, small_tokenizer, tmp_path / "wrong.gguf", qtype="f32", progress=False)
    prompt = small_tokenizer.encode(PROMPT_TEXT, bos=True)[:24]
    with llamacpp(path) as server:
        assert max_prob_error(server, model, prompt) > 5e-2  # measured 0.18


def test_llamacpp_q8_0_within_bound(tmp_path, small_tokenizer):
    """llama.cpp on a Q8_0 file vs herd on the same Q8_0 weights (dequantized on load): llama.cpp also
    rounds activations to Q8_0 blocks, so the bound is 2e-2 rather than 1e-3 (measured: 0.009 against
    the same weights, 0.023 against the float model, on this deliberately peaked model); greedy tokens match."""
    model = sharp_model(small_args())
    path = write_gguf(model, small_tokenizer, tmp_path / "m.gguf", qtype="q8_0", progress=False)
    dequantized = load_checkpoint(path)
    prompt = small_tokenizer.encode(PROMPT_TEXT, bos=True)[:24]
    with llamacpp(path) as server:
        assert max_prob_error(server, dequantized, prompt) < 2e-2
        assert max_prob_error(server, model, prompt) < 5e-2  # and against the unquantized model
        assert server.greedy(prompt, 8) == herd_greedy(dequantized, prompt, 8)


def test_llamacpp_rope_scaling_and_tied_output(tmp_path, small_tokenizer):
    """Llama 3.1 frequency scaling (rope_freqs.weight) with a short original length so every
    frequency band is affected, GQA 4:1, a tied output matrix and head_dim != dim / n_heads."""
    args = small_args(n_heads=4, n_kv_heads=1, head_dim=32, tie_embeddings=True, use_scaled_rope=True,
                      rope_theta=10000.0, rope_scale_factor=8.0, rope_original_max_seq_len=16)
    model = sharp_model(args)
    plain = ModelArgs(**{**args.to_dict(), "use_scaled_rope": False})
    path = write_gguf(model, small_tokenizer, tmp_path / "m.gguf", qtype="f32", progress=False)
    reader = gguf.GGUFReader(path)
    assert "output.weight" not in {t.name for t in reader.tensors}
    prompt = small_tokenizer.encode(PROMPT_TEXT, bos=True)[:24]
    unscaled = Transformer(plain).eval()
    unscaled.load_state_dict(model.state_dict())
    with llamacpp(path) as server:
        assert max_prob_error(server, model, prompt) < 1e-3
        assert max_prob_error(server, unscaled, prompt) > 1e-3  # the scaling really changed the output


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template

TEXTS = [
    "Hello world! It's 2024; isn't it?",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "def f(x):\n\treturn {k: v ** 2 for k, v in x.items()}  # squares\n",
    "Ünïcödé façade — 日本語のテキスト, 中文, русский текст, العربية 😀🎉",
    "spaces     and\n\n\n\ttabs   \r\n  " + " " * 300 + "end",
    "numbers 1234567 and 3.14159, e-mail a.b@c.de, URL https://x.org/a?b=c",
]


@pytest.fixture(scope="module")
def official_gguf(tmp_path_factory, official) -> Path:
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=128256, multiple_of=32, max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    return write_gguf(model.eval(), official, tmp_path_factory.mktemp("gguf") / "official.gguf", qtype="f16",
                      progress=False)


def test_llamacpp_tokenizes_like_herd_official_vocab(official_gguf, official):
    with llamacpp(official_gguf) as server:
        for text in TEXTS:
            assert server.tokenize(text) == official.encode(text, allowed_special="all"), text
            assert server.tokenize(text, specials=False) == official.encode(text), text
        assert server.tokenize("Hi", add_bos=True) == official.encode("Hi", bos=True)


def test_llamacpp_tokenizes_like_herd_trained_vocab(tmp_path, small_tokenizer):
    """A herd-trained vocabulary in a model with more embedding rows than tokens (as herd's presets
    have): the extra rows become unused pad tokens, and the vocabulary reads back unchanged."""
    model = sharp_model(small_args(vocab_size=800))
    path = write_gguf(model, small_tokenizer, tmp_path / "m.gguf", qtype="f16", progress=False)
    with llamacpp(path) as server:
        for text in TEXTS:
            assert server.tokenize(text) == small_tokenizer.encode(text, allowed_special="all"), text
    back = read_tokenizer(path)
    assert back.n_words == small_tokenizer.n_words == 768
    assert all(back.token_bytes(i) == small_tokenizer.token_bytes(i) for i in range(768))


def test_chat_template_renders_herd_meta_chat_format(official_gguf, official):
    chat = ChatFormat(official, style="meta")
    dialogs = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "  Hi!\n"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a prime."}],
    ]
    with llamacpp(official_gguf) as server:
        for messages in dialogs:
            text = server.apply_template(messages)
            ids = server.tokenize(text, add_bos=True)
            assert ids == chat.encode_dialog_prompt(messages)


def test_merges_equal_official_tokenizer_json(official, official_tokenizer_json):
    tokens, types, merges = gguf_vocab(official, 128256)
    ref = json.loads(Path(official_tokenizer_json).read_text())["model"]
    assert merges == ref["merges"]
    assert all(ref["vocab"][t] == i for i, t in enumerate(tokens[:official.n_bpe]))
    assert tokens[128000] == "<|begin_of_text|>" and tokens[128009] == "<|eot_id|>"
    assert set(types[:128000]) == {1} and set(types[128000:]) == {3}


# ---------------------------------------------------------------------------------------------
# Format details and round trips


def test_metadata_names_and_quantized_blocks(tmp_path, small_tokenizer):
    model = sharp_model(small_args(use_scaled_rope=True, rope_original_max_seq_len=64))
    path = write_gguf(model, small_tokenizer, tmp_path / "m.gguf", qtype="q4_0", progress=False)
    r = gguf.GGUFReader(path)
    field = lambda k: r.get_field(k).contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 64
    assert field("llama.attention.head_count_kv") == 2 and field("llama.rope.dimension_count") == 16
    assert field("llama.feed_forward_length") == model.args.hidden_dim
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "llama-bpe"
    assert field("tokenizer.ggml.bos_token_id") == small_tokenizer.bos_id
    assert field("tokenizer.ggml.eos_token_id") == small_tokenizer.eos_id
    tensors = {t.name: t for t in r.tensors}
    G = gguf.GGMLQuantizationType
    assert tensors["blk.0.attn_q.weight"].tensor_type == G.Q4_0
    assert tensors["blk.1.ffn_down.weight"].tensor_type == G.Q4_0
    assert tensors["token_embd.weight"].tensor_type == G.Q8_0  # kept at 8 bits in q4_0 files
    assert tensors["blk.0.attn_norm.weight"].tensor_type == G.F32
    assert tensors["rope_freqs.weight"].tensor_type == G.F32
    # herd's blocks are llama.cpp's reference quantizer's, byte for byte
    w = model.layers[1].feed_forward.w2.weight.detach().numpy()
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data), gguf.quants.quantize(w, G.Q4_0))
    e = model.tok_embeddings.weight.detach().numpy()
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data), gguf.quants.quantize(e, G.Q8_0))


@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_gguf_herd_gguf_round_trip_is_byte_identical(tmp_path, small_tokenizer, qtype):
    model = sharp_model(small_args(tie_embeddings=qtype == "f16"))
    first = write_gguf(model, small_tokenizer, tmp_path / "a.gguf", qtype=qtype, progress=False)
    loaded = load_checkpoint(first)
    assert loaded.args == model.args
    tok = read_tokenizer(first)
    assert tok is not None and tok.n_words == small_tokenizer.n_words
    assert tok.encode(PROMPT_TEXT) == small_tokenizer.encode(PROMPT_TEXT)
    second = write_gguf(loaded, tok, tmp_path / "b.gguf", qtype=qtype, progress=False)
    assert first.read_bytes() == second.read_bytes()
    if qtype == "f32":
        for k, v in model.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k]), k


def test_reads_gguf_written_by_gguf_package_itself(tmp_path):
    """A llama GGUF made directly with gguf-py (no herd metadata, F16 + Q8_0 tensors, no tokenizer)
    loads with hyper-parameters from the llama.* keys and gguf's own dequantization."""
    args = small_args(vocab_size=256)
    model = sharp_model(args)
    G = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(tmp_path / "x.gguf", arch="llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    from herd.checkpoint.gguf import gguf_name

    expected = {}
    for name, t in model.state_dict().items():
        a = t.numpy()
        if a.ndim == 1:
            w.add_tensor(gguf_name(name), a)
            expected[name] = t
        elif "attention" in name:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, G.Q8_0), raw_dtype=G.Q8_0)
            expected[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, G.Q8_0), G.Q8_0))
        else:
            w.add_tensor(gguf_name(name), a.astype(np.float16))
            expected[name] = t.half().float()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    loaded = load_checkpoint(tmp_path / "x.gguf")
    assert loaded.args.hidden_dim == args.hidden_dim and not loaded.args.tie_embeddings
    for k, v in expected.items():
        assert torch.equal(loaded.state_dict()[k], v.reshape(loaded.state_dict()[k].shape)), k


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_gguf_files_give_one_line_errors(tmp_path, small_tokenizer):
    model = sharp_model(small_args())
    good = write_gguf(model, small_tokenizer, tmp_path / "m.gguf", qtype="q8_0", progress=False)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(HerdError, match="truncated"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(HerdError, match="not a readable GGUF"):
        load_checkpoint(garbage)

    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", arch="gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(HerdError, match="'gpt2' model"):
        load_checkpoint(tmp_path / "gpt2.gguf")

    G = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(tmp_path / "q5.gguf", arch="llama")
    for k, v in dict(embedding_length=64, block_count=2, feed_forward_length=model.args.hidden_dim,
                     head_count=4, head_count_kv=2).items():
        getattr(w, f"add_{k}")(v)
    a = model.tok_embeddings.weight.detach().numpy()
    w.add_tensor("token_embd.weight", gguf.quants.quantize(a, G.Q5_0), raw_dtype=G.Q5_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(HerdError, match="Q5_0, which herd cannot read"):
        load_checkpoint(tmp_path / "q5.gguf")

    with pytest.raises(HerdError, match="unknown GGUF type"):
        write_gguf(model, small_tokenizer, tmp_path / "x.gguf", qtype="q3_k")
    assert not (tmp_path / "x.gguf").exists()


def test_foreign_gguf_llama31_rope_freqs_are_recognized(tmp_path):
    """A file from llama.cpp's converter (no herd metadata) with Llama 3.1 scaling stored as
    rope_freqs.weight loads with use_scaled_rope and the factor recovered; other factors are refused."""
    from herd.checkpoint.gguf import gguf_name, rope_factors

    args = small_args(vocab_size=256, use_scaled_rope=True, rope_scale_factor=32.0, max_seq_len=256)
    model = sharp_model(args)

    def write(path, factors):
        w = gguf.GGUFWriter(path, arch="llama")
        w.add_embedding_length(64)
        w.add_block_count(2)
        w.add_feed_forward_length(args.hidden_dim)
        w.add_head_count(4)
        w.add_head_count_kv(2)
        w.add_rope_freq_base(500000.0)
        w.add_context_length(256)
        for name, t in model.state_dict().items():
            w.add_tensor(gguf_name(name), t.numpy())
        w.add_tensor("rope_freqs.weight", factors.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(tmp_path / "ok.gguf", rope_factors(args))
    loaded = load_checkpoint(tmp_path / "ok.gguf")
    assert loaded.args.use_scaled_rope and loaded.args.rope_scale_factor == 32.0
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    write(tmp_path / "odd.gguf", torch.linspace(1, 3, 8))
    with pytest.raises(HerdError, match="rope_freqs"):
        load_checkpoint(tmp_path / "odd.gguf")
