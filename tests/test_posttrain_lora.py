"""LoRA against peft on transformers' LlamaForCausalLM: the same A/B give the same logits, herd's saved
adapters load in peft and peft's in herd, merged weights equal peft's merge_and_unload and give the
adapted logits; the init, the frozen base (fp32 and bf16), `herd merge-lora`, `herd generate
--adapter`, and one-line errors for adapters that do not fit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from herd.checkpoint import hf_config, load_checkpoint, save_checkpoint, to_hf_state_dict
from herd.cli import main
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer
from herd.posttrain import (LoRAConfig, LoRALinear, apply_lora, load_adapter, lora_modules, lora_state_dict,
                            merge_lora, parameter_bytes, read_adapter, save_adapter, unmerge_lora)
from herd.posttrain.lora import base_dtype, resolve_targets

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]
HF_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
HF_OF = dict(zip(ALL, HF_ALL))
HF_PATH = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
           "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's converter permutation of q/k rows (written here independently of herd.checkpoint)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=128)


@pytest.fixture(scope="module")
def base() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS).eval()
    model.init_weights(std=0.1)  # sharp attention so a q/k row-order mistake changes the logits
    return model


def _hf(model: Transformer):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(model.args))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(dict(model.state_dict()), model.args), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return hf


def _randomize(model: Transformer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.2)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)


def _adapted(base: Transformer, rslora: bool = False, targets=ALL, rank: int = 4) -> Transformer:
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(lora_rank=rank, lora_alpha=8, lora_targets=list(targets), lora_rslora=rslora))
    _randomize(model)
    return model.eval()


TOKENS = torch.randint(0, ARGS.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("rslora", [False, True])
def test_same_a_b_give_peft_logits(base, rslora):
    ours = _adapted(base, rslora)
    ref = peft.get_peft_model(_hf(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_ALL, lora_dropout=0.0,
                                                         use_rslora=rslora)).eval()
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            if name == "output":
                target = ref.base_model.model.lm_head
            else:
                _, i, _, leaf = name.split(".")
                target = ref.base_model.model.model.layers[int(i)].get_submodule(HF_PATH[leaf])
            b = m.lora_B.weight
            if name.endswith("wq"):
                b = _permute(b, ARGS.n_heads)
            elif name.endswith("wk"):
                b = _permute(b, ARGS.n_kv_heads)
            target.lora_A["default"].weight.copy_(m.lora_A.weight)
            target.lora_B["default"].weight.copy_(b)
            assert target.scaling["default"] == pytest.approx(m.scaling)
        torch.testing.assert_close(ours(TOKENS), ref(TOKENS).logits, atol=1e-5, rtol=1e-4)
        assert (ours(TOKENS) - base(TOKENS)).abs().max() > 1e-2  # the adapters do change the output


def test_herd_adapter_loads_in_peft(base, tmp_path):
    ours = _adapted(base, rslora=True)
    save_adapter(ours, tmp_path / "adapter", base_model="tiny-llama")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] is True
    assert sorted(cfg["target_modules"]) == sorted(HF_ALL)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys and len(keys) == 2 * (7 * ARGS.n_layers + 1)
    ref = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), ref(TOKENS).logits, atol=1e-5, rtol=1e-4)
    # and back: the same folder loads into a fresh herd model with the same result
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS), ours(TOKENS), atol=1e-6, rtol=1e-6)


def test_peft_adapter_loads_in_herd(base, tmp_path):
    torch.manual_seed(3)
    ref = peft.get_peft_model(_hf(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=HF_ALL,
                                                         init_lora_weights=False)).eval()
    ref.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    modules = load_adapter(ours, tmp_path / "peft")
    assert len(modules) == 7 * ARGS.n_layers + 1 and all(m.rank == 8 and m.scaling == 2.0 for m in modules.values())
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), ref(TOKENS).logits, atol=1e-5, rtol=1e-4)
    # merged weights equal peft's merge_and_unload, tensor for tensor in Hugging Face layout
    merge_lora(ours)
    merged_ref = ref.merge_and_unload()
    theirs = merged_ref.state_dict()
    for k, v in to_hf_state_dict(dict(ours.state_dict()), ARGS).items():
        torch.testing.assert_close(v, theirs[k], atol=1e-6, rtol=1e-6)


def test_merge_unmerge_and_merged_logits(base):
    model = _adapted(base)
    with torch.no_grad():
        adapted = model(TOKENS)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        unmerge_lora(model)  # nothing merged yet: no change
        for m in lora_modules(model).values():
            m.merge()
        torch.testing.assert_close(model(TOKENS), adapted, atol=1e-5, rtol=1e-4)
        assert not torch.equal(model.layers[0].attention.wq.base.weight, before["layers.0.attention.wq.base.weight"])
        unmerge_lora(model)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
        n = merge_lora(model)
    assert n == 7 * ARGS.n_layers + 1 and not lora_modules(model)
    assert set(model.state_dict()) == set(base.state_dict())  # plain names again: saves in any format
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), adapted, atol=1e-5, rtol=1e-4)


def test_init_freezing_and_a_training_step(base):
    torch.manual_seed(0)
    model = copy.deepcopy(base)
    cfg = LoRAConfig(lora_rank=4, lora_alpha=8, lora_dropout=0.1)
    modules = apply_lora(model, cfg)
    assert sorted({n.rsplit(".", 1)[-1] for n in modules}) == ["wk", "wo", "wq", "wv"]  # attention by default
    with torch.no_grad():
        assert torch.equal(model.eval()(TOKENS), base(TOKENS))  # B = 0: the adapted model starts as the base
    for m in modules.values():
        bound = 1 / m.in_features ** 0.5  # kaiming_uniform with a = sqrt(5): gain sqrt(1/3) * sqrt(3 / fan_in)
        assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.abs().max() > 0.9 * bound
        assert not m.lora_B.weight.any() and m.scaling == 2.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    want = sum(4 * (m.in_features + m.out_features) for m in modules.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == want
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in trainable}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(TOKENS[:, :-1]).flatten(0, 1), TOKENS[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    opt.step()
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert any(m.lora_B.weight.any() for m in modules.values())
    # dropout acts in training only
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(TOKENS), model(TOKENS))
        model.eval()
        assert torch.equal(model(TOKENS), model(TOKENS))


def test_bf16_base_with_fp32_adapters(base):
    ref = _adapted(base)
    model = copy.deepcopy(base).to(torch.bfloat16)
    apply_lora(model, LoRAConfig(lora_rank=4, lora_alpha=8, lora_targets=ALL))
    model.load_state_dict(lora_state_dict(ref), strict=False)
    frozen_dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
    adapter_dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen_dtypes == {torch.bfloat16} and adapter_dtypes == {torch.float32}
    fp32_bytes, bf16_bytes = parameter_bytes(ref), parameter_bytes(model)
    assert bf16_bytes["frozen"] * 2 == fp32_bytes["frozen"] and bf16_bytes["trainable"] == fp32_bytes["trainable"]
    with torch.no_grad():
        got = model(TOKENS)
        assert got.dtype == torch.float32
        want = ref(TOKENS)
        assert (got - want).norm() / want.norm() < 0.03  # bf16 weights and activations: ~3 significant digits
    loss = torch.nn.functional.cross_entropy(model(TOKENS[:, :-1]).flatten(0, 1), TOKENS[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert base_dtype("auto", "cpu") == torch.float32 and base_dtype("auto", "cuda") == torch.bfloat16
    assert base_dtype("bf16", "cpu") == torch.bfloat16


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory, official_tokenizer_model):
    """A base checkpoint with the official tokenizer, an adapter for it, and the merged model."""
    torch.manual_seed(11)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=128)
    model = Transformer(args).eval()
    model.init_weights(std=0.1)
    root = tmp_path_factory.mktemp("lora")
    save_checkpoint(model, root / "base", format="hf", tokenizer_path=official_tokenizer_model)
    adapted = copy.deepcopy(model)
    apply_lora(adapted, LoRAConfig(lora_rank=4, lora_alpha=8, lora_targets=["all-linear", "lm_head"]))
    _randomize(adapted, seed=5)
    save_adapter(adapted, root / "adapter")
    return root, model, adapted.eval()


def test_merge_lora_cli_writes_any_format(on_disk, capsys):
    root, model, adapted = on_disk
    tokens = torch.randint(0, 128256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = adapted(tokens)
    assert main(["merge-lora", str(root / "base"), str(root / "adapter"), str(root / "merged-hf"), "--format", "hf"]) == 0
    assert "merged 15 LoRA adapters" in capsys.readouterr().out
    hf = transformers.LlamaForCausalLM.from_pretrained(root / "merged-hf").eval()
    ref = peft.PeftModel.from_pretrained(_hf(model), root / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ref(tokens).logits, want, atol=1e-5, rtol=1e-4)
    assert (root / "merged-hf" / "tokenizer.model").is_file()
    assert main(["merge-lora", str(root / "base"), str(root / "adapter"), str(root / "merged-meta"),
                 "--format", "meta", "--dtype", "bf16"]) == 0
    meta = load_checkpoint(root / "merged-meta")
    assert meta.tok_embeddings.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert (meta.float()(tokens) - want).abs().max() < 0.05
    # refusing to clobber, and errors on one line
    assert main(["merge-lora", str(root / "base"), str(root / "adapter"), str(root / "merged-hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge-lora", str(root / "base"), str(root / "nope"), str(root / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("herd: error:") and err.count("\n") == 1


def test_generate_with_adapter_equals_merged(on_disk, capsys):
    root, _, _ = on_disk
    if not (root / "merged-herd").exists():
        assert main(["merge-lora", str(root / "base"), str(root / "adapter"), str(root / "merged-herd")]) == 0
        capsys.readouterr()
    common = ["--prompt", "The capital of France is", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(["generate", "--checkpoint", str(root / "base"), "--adapter", str(root / "adapter"), *common]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(root / "merged-herd"), *common]) == 0
    merged = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(root / "base"), *common]) == 0
    plain = capsys.readouterr().out
    assert with_adapter == merged and with_adapter != plain


def test_bad_adapters_and_settings(base, tmp_path):
    tied = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=32, tie_embeddings=True))
    with pytest.raises(HerdError, match="ties its output layer"):
        apply_lora(tied, LoRAConfig(lora_rank=2, lora_targets=["output"]))
    with pytest.raises(HerdError, match="unknown LoRA target 'qkv'"):
        resolve_targets(["qkv"])
    assert resolve_targets(["q_proj", "wq", "mlp"]) == ["wq", "w1", "w2", "w3"]
    with pytest.raises(HerdError, match="lora_rank >= 1"):
        apply_lora(copy.deepcopy(base), LoRAConfig(lora_rank=0))
    with pytest.raises(HerdError, match="lora-base-dtype"):
        LoRAConfig(lora_rank=2, lora_base_dtype="int4").validate()
    from herd.quant import quantize_model

    int8 = _adapted(quantize_model(copy.deepcopy(base), "int8"), targets=["wq"])  # an int8 base takes adapters...
    with pytest.raises(HerdError, match="merge it into the float checkpoint"):
        merge_lora(int8)  # ...but cannot hold their update
    with pytest.raises(HerdError, match="no LoRA adapters"):
        save_adapter(copy.deepcopy(base), tmp_path / "none")
    twice = _adapted(base, targets=["wq"])
    with pytest.raises(HerdError, match="already has a LoRA adapter"):
        apply_lora(twice, LoRAConfig(lora_rank=2, lora_targets=["wq"]))
    with pytest.raises(HerdError, match="not a LoRA adapter folder"):
        load_adapter(copy.deepcopy(base), tmp_path)
    # an adapter for a wider model: the shape error names the tensor
    wide = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32))
    apply_lora(wide, LoRAConfig(lora_rank=4))
    save_adapter(wide, tmp_path / "wide")
    with pytest.raises(HerdError, match=r"adapter tensor 'layers\.0\.attention\.wq\.lora_A\.weight' has shape"):
        load_adapter(copy.deepcopy(base), tmp_path / "wide")
    # an adapter for a deeper model
    deep = Transformer(ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32))
    apply_lora(deep, LoRAConfig(lora_rank=4))
    save_adapter(deep, tmp_path / "deep")
    with pytest.raises(HerdError, match="layers.2.attention.wq, which this model does not have"):
        load_adapter(copy.deepcopy(base), tmp_path / "deep")
    # peft features herd does not implement are refused by name
    save_adapter(_adapted(base, targets=["wq"]), tmp_path / "dora")
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(HerdError, match="use_dora"):
        read_adapter(tmp_path / "dora", ARGS)
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(HerdError, match="IA3"):
        read_adapter(tmp_path / "dora", ARGS)
    # an adapter on the output layer cannot go onto a tied model
    save_adapter(_adapted(base, targets=["output"]), tmp_path / "out")
    with pytest.raises(HerdError, match="ties it to the"):
        load_adapter(Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                                           multiple_of=32, tie_embeddings=True)), tmp_path / "out")
    assert isinstance(lora_modules(twice)["layers.0.attention.wq"], LoRALinear)


def test_chunked_loss_head_sees_the_adapters(base):
    """The training loss runs inside forward on the output matrix (Transformer.output_weight); with an
    adapted output layer that matrix is W + BA*s, so loss and adapter gradients equal the logits path."""
    from herd.train.loss import chunked_cross_entropy, cross_entropy_sum, lm_head

    model = _adapted(base, targets=ALL)
    inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    mask = torch.rand(targets.shape, generator=torch.Generator().manual_seed(4)) < 0.6
    grads = []
    for via_head in (True, False):
        model.zero_grad(set_to_none=True)
        if via_head:
            loss = model(inputs, head=lm_head(chunked_cross_entropy, targets, mask, chunk=7))
        else:
            loss = cross_entropy_sum(model(inputs), targets, mask)
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = grads
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert "output.lora_B.weight" in g1
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4)
