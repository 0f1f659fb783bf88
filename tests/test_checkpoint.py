"""Checkpoints against references no one here wrote: transformers' LlamaForCausalLM reads what herd
writes (and herd reads what save_pretrained writes) with the same logits; Meta shards built by hand
from Meta's model-parallel split rules load; round trips are bit-exact; bad input gives one clear HerdError.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from herd import HerdError, ModelArgs, Transformer, load_checkpoint, save_checkpoint
from herd.checkpoint import find_tokenizer, load_args
from herd.checkpoint.common import read_safetensors, write_safetensors
from herd.checkpoint.cli import model_info
from herd.configs import get_preset

transformers = pytest.importorskip("transformers")

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=16384)
CASES = {
    "gqa": dict(),
    "single-kv-head": dict(n_kv_heads=1),
    "rope-3.1-factor-8": dict(use_scaled_rope=True, rope_scale_factor=8.0),
    "rope-3.2-factor-32-tied": dict(n_kv_heads=4, use_scaled_rope=True, rope_scale_factor=32.0, tie_embeddings=True),
}


def _model(**overrides) -> Transformer:
    model = Transformer(ModelArgs(**{**TINY, **overrides}))
    model.init_weights(std=0.1)  # larger than training's 0.02 so differences show in the logits
    return model.eval()


def _tokens(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24))


def _assert_same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers as the reference


@pytest.mark.parametrize("case", list(CASES))
def test_hf_save_loads_in_transformers_with_same_logits(tmp_path, case):
    model = _model(**CASES[case])
    save_checkpoint(model, tmp_path / "hf", format="hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    if model.args.use_scaled_rope:
        rope = hf.config.rope_parameters
        assert rope["rope_type"] == "llama3" and rope["factor"] == model.args.rope_scale_factor
    assert hf.config.tie_word_embeddings == model.args.tie_embeddings
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied,scaling", [(False, None), (True, 32.0), (False, 8.0)])
def test_transformers_save_pretrained_sharded_loads_in_herd(tmp_path, tied, scaling):
    rope = None if scaling is None else {"rope_type": "llama3", "factor": scaling, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   rope_theta=500000.0, max_position_embeddings=16384, tie_word_embeddings=tied,
                                   rope_scaling=rope, initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = load_checkpoint(tmp_path / "hf")
    assert not model.training and model.args.hidden_dim == 96 and model.args.tie_embeddings == tied
    assert model.args.use_scaled_rope == (scaling is not None)
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)


def test_hf_config_reads_rope_parameters_and_legacy_rope_scaling(tmp_path):
    model = _model(use_scaled_rope=True, rope_scale_factor=32.0)
    save_checkpoint(model, tmp_path / "a", format="hf")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    # Newer transformers: everything under rope_parameters, rope_theta included.
    cfg["rope_parameters"] = {**cfg.pop("rope_scaling"), "rope_theta": cfg.pop("rope_theta")}
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    assert load_args(tmp_path / "a") == model.args


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("chain", [[("hf", 1)], [("meta", 2)], [("hf", 3)], [("herd", 2)],
                                   [("meta", 2), ("hf", 2), ("herd", 1)]])
def test_round_trips_are_bit_exact(tmp_path, chain):
    model = _model(use_scaled_rope=True, rope_scale_factor=32.0, tie_embeddings=True, n_kv_heads=2)
    current = model
    for i, (fmt, shards) in enumerate(chain):
        save_checkpoint(current, tmp_path / str(i), format=fmt, shards=shards)
        current = load_checkpoint(tmp_path / str(i))
    assert current.args == model.args
    _assert_same_weights(model, current)
    tokens = _tokens()
    assert torch.equal(current(tokens), model(tokens))


def test_meta_shards_built_by_hand_load_and_match(tmp_path):
    """Meta's layout (ColumnParallelLinear / RowParallelLinear splits), written here without herd's writer: 2 shards, output.weight
    present for a tied model, params.json with Meta's fields only (so tie and factor 32 are inferred)."""
    model = _model(use_scaled_rope=True, rope_scale_factor=32.0, tie_embeddings=True)
    sd = dict(model.state_dict())
    sd["output.weight"] = sd["tok_embeddings.weight"]
    dim0 = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight", "tok_embeddings.weight")
    for rank in range(2):
        part = {}
        for k, v in sd.items():
            if k.endswith(dim0):
                part[k] = v.chunk(2, 0)[rank].clone()
            elif k.endswith(("wo.weight", "w2.weight")):
                part[k] = v.chunk(2, 1)[rank].clone()
            else:
                part[k] = v.clone()
        torch.save(part, tmp_path / f"consolidated.{rank:02d}.pth")
    a = model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                  multiple_of=a.multiple_of, ffn_dim_multiplier=None, norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                  use_scaled_rope=True)
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded = load_checkpoint(tmp_path)
    assert loaded.args.tie_embeddings and loaded.output is None and loaded.args.rope_scale_factor == 32.0
    _assert_same_weights(model, loaded)
    tokens = _tokens()
    assert torch.equal(loaded(tokens), model(tokens))


def test_meta_tied_flag_must_match_weights(tmp_path):
    model = _model(tie_embeddings=True)
    save_checkpoint(model, tmp_path / "m", format="meta")
    state = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True)
    state["output.weight"] = state["output.weight"].clone() + 1  # no longer the embedding
    torch.save(state, tmp_path / "m" / "consolidated.00.pth")
    with pytest.raises(HerdError, match="tied but output.weight differs"):
        load_checkpoint(tmp_path / "m")


def test_meta_save_writes_spec_layout(tmp_path):
    model = _model(tie_embeddings=True)
    save_checkpoint(model, tmp_path / "m", format="meta", shards=2)
    s0 = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True)
    w = model.state_dict()
    assert torch.equal(s0["output.weight"], w["tok_embeddings.weight"][:64])  # tied: written, split on dim 0
    assert torch.equal(s0["layers.0.attention.wo.weight"], w["layers.0.attention.wo.weight"][:, :32])
    assert torch.equal(s0["layers.1.ffn_norm.weight"], w["layers.1.ffn_norm.weight"])
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and params["use_scaled_rope"] is False


def test_dtype_conversion_and_tokenizer_copy(tmp_path, official_tokenizer_model):
    model = _model()
    save_checkpoint(model, tmp_path / "c", format="hf", tokenizer_path=official_tokenizer_model)
    assert find_tokenizer(tmp_path / "c").read_bytes() == official_tokenizer_model.read_bytes()
    bf16 = load_checkpoint(tmp_path / "c", dtype="bf16")
    for k, v in model.state_dict().items():
        assert torch.equal(bf16.state_dict()[k], v.to(torch.bfloat16)), k
    # Hugging Face hub layout: Meta files under original/.
    save_checkpoint(model, tmp_path / "hub" / "original", format="meta", tokenizer_path=official_tokenizer_model)
    assert find_tokenizer(tmp_path / "hub") == tmp_path / "hub" / "original" / "tokenizer.model"
    _assert_same_weights(model, load_checkpoint(tmp_path / "hub"))


def test_save_is_atomic_and_refuses_to_clobber(tmp_path):
    model = _model()
    save_checkpoint(model, tmp_path / "x")
    with pytest.raises(HerdError, match="already exists"):
        save_checkpoint(model, tmp_path / "x", format="hf")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(HerdError, match="not a checkpoint folder"):
        save_checkpoint(model, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "a.txt").exists()
    save_checkpoint(model, tmp_path / "x", format="hf", overwrite=True)
    assert (tmp_path / "x" / "config.json").exists() and not (tmp_path / "x" / "herd.json").exists()
    with pytest.raises(HerdError, match="shards"):
        save_checkpoint(model, tmp_path / "y", format="meta", shards=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "x"]  # no temp folders left behind


# ---------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("preset,published", [("llama3-8b", 8.03), ("llama3.2-1b", 1.24),
                                              ("llama3-70b", 70.6), ("llama3.1-405b", 405.9)])
def test_official_parameter_counts(preset, published):
    decimals = 2 if published < 10 else 1
    assert round(model_info(get_preset(preset))["params"] / 1e9, decimals) == published


def test_info_memory_and_kv_cache_by_hand():
    info = model_info(get_preset("llama3-8b"), seq_len=8192)
    n = info["params"]
    assert info["weights_bytes"] == {"fp32": 4 * n, "bf16": 2 * n, "int8": n}
    per_token = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads, head_dim 128, 2 bytes = 128 KiB
    assert info["kv_cache_bytes_per_token"]["bf16"] == per_token == 128 * 1024
    assert info["kv_cache_bytes"]["fp32"] == 2 * per_token * 8192  # 1 GiB * 2
    assert model_info(get_preset("llama3.2-1b"))["params_without_embeddings"] == 1_235_814_400 - 128256 * 2048


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_and_unrecognized_paths(tmp_path):
    with pytest.raises(HerdError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(HerdError, match="no checkpoint found"):
        load_checkpoint(tmp_path)
    with pytest.raises(HerdError, match="unknown preset 'llama4'"):
        get_preset("llama4")


def test_corrupt_and_truncated_files(tmp_path):
    model = _model()
    save_checkpoint(model, tmp_path / "h")
    st = tmp_path / "h" / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) - 100])
    with pytest.raises(HerdError, match="truncated"):
        load_checkpoint(tmp_path / "h")
    st.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(HerdError, match="not a valid safetensors"):
        load_checkpoint(tmp_path / "h")
    save_checkpoint(model, tmp_path / "m", format="meta")
    pth = tmp_path / "m" / "consolidated.00.pth"
    pth.write_bytes(pth.read_bytes()[:5000])
    with pytest.raises(HerdError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "m")


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    save_checkpoint(_model(), tmp_path / "h", format="hf")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HerdError, match=r"'layers\.0\.feed_forward\.w1\.weight' .* shape \[192, 64\] .* expects \[256, 64\]"):
        load_checkpoint(tmp_path / "h")


def test_missing_and_unexpected_tensors(tmp_path):
    save_checkpoint(_model(), tmp_path / "h")
    st = tmp_path / "h" / "model.safetensors"
    tensors = {k: v.clone() for k, v in read_safetensors(st).items()}
    write_safetensors(st, {k: v for k, v in tensors.items() if k != "norm.weight"})
    with pytest.raises(HerdError, match=r"missing 1 tensor\(s\) \(norm\.weight\)"):
        load_checkpoint(tmp_path / "h")
    write_safetensors(st, {**tensors, "layers.9.extra.weight": torch.zeros(2)})
    with pytest.raises(HerdError, match=r"unexpected tensor\(s\) \(layers\.9\.extra\.weight\)"):
        load_checkpoint(tmp_path / "h")


# ---------------------------------------------------------------------------------------------
# The command line


def _herd(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("herd")  # the installed console script, as a user runs it
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from herd.cli import main; sys.exit(main())"]
    return subprocess.run([*cmd, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_init_convert_info_and_errors(tmp_path, official_tokenizer_model, capsys):
    from herd.cli import main

    assert main(["init", "herd-1m", str(tmp_path / "a"), "--vocab-size", "512", "--seed", "3",
                 "--tokenizer", str(official_tokenizer_model)]) == 0
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--format", "meta", "--shards", "2"]) == 0
    assert main(["convert", str(tmp_path / "b"), str(tmp_path / "c"), "--format", "hf", "--dtype", "bf16"]) == 0
    a, c = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "c")
    assert a.args == c.args == get_preset("herd-1m", vocab_size=512)
    for k, v in a.state_dict().items():
        assert torch.equal(c.state_dict()[k], v.to(torch.bfloat16)), k
    assert find_tokenizer(tmp_path / "c").read_bytes() == official_tokenizer_model.read_bytes()  # carried along

    (tmp_path / "b" / "consolidated.01.pth").write_bytes(b"not a zip file")
    result = _herd("convert", "b", "d", "--format", "hf", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("herd: error: ") and "consolidated.01.pth is corrupt" in result.stderr
    assert not (tmp_path / "d").exists()
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(tmp_path / "c"), "--seq-len", "100"]) == 0
    out = capsys.readouterr().out
    assert "853.12K" in out and "100 tokens: bf16 100.00 KiB" in out  # 2 * 4 layers * 2 heads * 32 * 2 B
    assert main(["init", "no-such-preset", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.startswith("herd: error: unknown preset 'no-such-preset'")


def test_loading_does_not_copy_weights(tmp_path):
    """Anonymous memory added by loading a ~60 MB checkpoint in a fresh process stays far below 1x the
    weights (the parameters are the file's pages), and a dtype conversion needs ~1x of the result."""
    model = Transformer(ModelArgs(dim=512, n_layers=2, n_heads=8, vocab_size=8192, multiple_of=256))
    save_checkpoint(model, tmp_path / "h", format="hf")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    code = (
        "import gc, sys, json, torch\n"
        "from herd import ModelArgs, Transformer\n"
        "from herd.checkpoint.common import meta_model, peak_memory\n"
        "import herd.checkpoint as c\n"
        "tiny = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32)\n"
        "meta_model(tiny), Transformer(tiny)(torch.zeros(1, 4, dtype=torch.long))  # one-time torch set-up\n"
        "out = {}\n"
        "for dtype in ('fp32', 'bf16'):\n"
        "    base = peak_memory()['rss_anon']\n"
        "    m = c.load_checkpoint(sys.argv[1], dtype=dtype)\n"
        "    m(torch.zeros(1, 4, dtype=torch.long))\n"
        "    out[dtype] = peak_memory()['rss_anon'] - base\n"
        "    del m; gc.collect()\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "h")], capture_output=True, text=True,
                            timeout=120, check=True)
    anon = json.loads(result.stdout.strip().splitlines()[-1])
    assert anon["fp32"] < 0.35 * weights, anon["fp32"] / weights  # only HF's permuted wq/wk are copies
    assert anon["bf16"] < (0.5 + 0.35) * weights, anon["bf16"] / weights  # the bf16 result is 0.5x


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,shards", [("herd", 1), ("hf", 2), ("meta", 2)])
def test_load_to_gpu_in_bf16(tmp_path, fmt, shards):
    model = _model(tie_embeddings=True, use_scaled_rope=True, rope_scale_factor=32.0)
    save_checkpoint(model, tmp_path / fmt, format=fmt, shards=shards)
    gpu = load_checkpoint(tmp_path / fmt, device="cuda", dtype="bf16")
    assert gpu.rope_inv_freq.device.type == "cuda"
    for k, v in model.state_dict().items():
        got = gpu.state_dict()[k]
        assert got.device.type == "cuda" and torch.equal(got.cpu(), v.to(torch.bfloat16)), k
    tokens = _tokens()
    with torch.no_grad():  # bf16 vs fp32: ~0.04 max error on logits of size ~3 on CPU
        torch.testing.assert_close(gpu(tokens.cuda()).cpu(), model(tokens), atol=0.15, rtol=0.05)


def test_killed_convert_leaves_a_temp_folder_that_the_next_run_removes(tmp_path):
    """SIGKILL a real `herd convert` while it writes: the destination never appears half-written, and
    the hidden temp folder the dead process left is removed by the next convert to that destination."""
    import signal
    import time

    from herd.cli import main

    # ~10M parameters (40 MB in fp32): writing takes long enough to be caught mid-way
    assert main(["init", "herd-1m", str(tmp_path / "src"), "--dim", "256", "--n-layers", "2", "--vocab-size",
                 "32000", "--max-seq-len", "64"]) == 0
    exe = shutil.which("herd")
    cmd = [exe] if exe else [sys.executable, "-m", "herd"]
    proc = subprocess.Popen([*cmd, "convert", "src", "dst", "--format", "hf"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".dst.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = list(tmp_path.glob(".dst.tmp-*"))
    assert stale, "convert finished before it could be killed; make the test model larger"
    assert not (tmp_path / "dst").exists()
    result = _herd("convert", "src", "dst", "--format", "hf", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in stale) and not list(tmp_path.glob(".dst.*"))
    assert (tmp_path / "dst" / "config.json").is_file()
