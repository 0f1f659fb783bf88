"""Model averaging: checkpoints in herd, Hugging Face and Meta formats (mixed) average to the float32 mean
computed here from the models in memory; weights; bf16 inputs summed in float32; every output format;
reward models with their head; LoRA adapters averaged exactly (the average of the merged models, also as
peft applies the averaged adapter); the tokenizer carried; one-line errors and nothing half-written."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from herd.checkpoint import hf_config, load_checkpoint, save_checkpoint, to_hf_state_dict
from herd.cli import main
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer
from herd.posttrain import (LoRAConfig, RewardModel, apply_lora, average_checkpoints, load_adapter,
                            load_reward_model, lora_modules, merge_lora, save_adapter, save_reward_model)

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=64)


def _model(seed: int, args: ModelArgs = ARGS, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(args)
    m.init_weights(std=0.1)
    return m.to(dtype).eval()


def _mean(models, weights=None):
    weights = weights or [1.0 / len(models)] * len(models)
    states = [m.state_dict() for m in models]
    return {k: sum(w * s[k].double() for w, s in zip(weights, states)) for k in states[0]}


@pytest.fixture(scope="module")
def three(tmp_path_factory, official_tokenizer_model):
    """The same architecture in three formats (Meta in two shards), each with the tokenizer."""
    root = tmp_path_factory.mktemp("avg")
    models = [_model(s) for s in (1, 2, 3)]
    paths = []
    for m, (fmt, shards) in zip(models, [("herd", 1), ("hf", 2), ("meta", 2)]):
        paths.append(save_checkpoint(m, root / fmt, format=fmt, shards=shards, tokenizer_path=official_tokenizer_model))
    return models, paths


@pytest.mark.parametrize("out_format", ["herd", "hf", "meta"])
def test_mixed_formats_average_to_the_mean(tmp_path, three, out_format):
    models, paths = three
    desc = average_checkpoints(paths, tmp_path / "avg", format=out_format, progress=False)
    assert desc.startswith(f"{out_format} checkpoint (float32, tokenizer")
    got = load_checkpoint(tmp_path / "avg").state_dict()
    want = _mean(models)
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-7)
    assert (tmp_path / "avg" / "tokenizer.model").read_bytes() == (paths[0] / "tokenizer.model").read_bytes()
    # the mean differs from each input (the permuted HF q/k rows were undone before averaging)
    assert not torch.allclose(got["layers.0.attention.wq.weight"], models[1].state_dict()["layers.0.attention.wq.weight"])


def test_weights_and_bf16_inputs_sum_in_float32(tmp_path):
    a, b = _model(1, dtype=torch.bfloat16), _model(2, dtype=torch.bfloat16)
    for name, m in (("a", a), ("b", b)):
        save_checkpoint(m, tmp_path / name)
    average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "w", weights=[1, 3], progress=False)
    got = load_checkpoint(tmp_path / "w").state_dict()
    want = _mean([a, b], [0.25, 0.75])
    for k, v in want.items():
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], v.float().to(torch.bfloat16))  # one rounding, of the float32 sum
    average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "f32", dtype="fp32", progress=False)
    assert load_checkpoint(tmp_path / "f32").tok_embeddings.weight.dtype == torch.float32


def test_reward_models_average_with_their_head(tmp_path):
    rms = [RewardModel.from_transformer(_model(s), seed=s) for s in (1, 2)]
    for i, rm in enumerate(rms):
        save_reward_model(rm, tmp_path / f"rm{i}", pad_id=3)
    desc = average_checkpoints([tmp_path / "rm0", tmp_path / "rm1"], tmp_path / "avg", progress=False)
    assert desc.startswith("reward model")
    got = load_reward_model(tmp_path / "avg")
    assert got.reward_config.pad_id == 3
    want = _mean(rms)
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v.double(), want[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(HerdError, match="drop --format"):
        average_checkpoints([tmp_path / "rm0", tmp_path / "rm1"], tmp_path / "x", format="meta")
    with pytest.raises(HerdError, match="reward model but"):
        save_checkpoint(_model(1), tmp_path / "lm")
        average_checkpoints([tmp_path / "rm0", tmp_path / "lm"], tmp_path / "x")


def _adapter(base: Transformer, seed: int, rank: int, alpha: float, rslora: bool) -> Transformer:
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(lora_rank=rank, lora_alpha=alpha, lora_rslora=rslora,
                                 lora_targets=["wq", "wk", "wv", "w2", "output"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return model


def test_adapters_average_exactly(tmp_path):
    base = _model(0)
    save_checkpoint(base, tmp_path / "base")
    adapted = [_adapter(base, 1, 4, 8, False), _adapter(base, 2, 2, 3, True), _adapter(base, 3, 8, 16, False)]
    for i, m in enumerate(adapted):
        save_adapter(m, tmp_path / f"ad{i}", base_model="base")
    weights = [0.5, 0.3, 0.2]
    desc = average_checkpoints([tmp_path / f"ad{i}" for i in range(3)], tmp_path / "avg", weights=weights,
                               progress=False)
    assert desc.startswith("LoRA adapter of rank 14")
    merged = []
    for m in adapted:
        m = copy.deepcopy(m)
        merge_lora(m)
        merged.append(m)
    want = _mean(merged, weights)
    got = copy.deepcopy(base)
    load_adapter(got, tmp_path / "avg")
    merge_lora(got)
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v.double(), want[k], rtol=1e-5, atol=1e-6)
    # the averaged adapter is a plain peft adapter: peft applies it to the transformers model
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(ARGS))).eval()
    hf.load_state_dict(to_hf_state_dict(dict(base.state_dict()), ARGS), strict=False)
    with_peft = peft.PeftModel.from_pretrained(hf, tmp_path / "avg").eval()
    x = torch.randint(0, ARGS.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(with_peft(x).logits, got(x), rtol=1e-4, atol=1e-4)
    # adapters of different bases are refused
    save_adapter(adapted[0], tmp_path / "other", base_model="someone-else")
    with pytest.raises(HerdError, match="different bases"):
        average_checkpoints([tmp_path / "ad0", tmp_path / "other"], tmp_path / "bad")


def test_errors_are_one_line_and_nothing_is_half_written(tmp_path, three, capsys, official_tokenizer_model):
    models, paths = three
    other = _model(1, ModelArgs(**{**ARGS.to_dict(), "n_layers": 3}))
    save_checkpoint(other, tmp_path / "deeper")
    assert main(["average", str(paths[0]), str(tmp_path / "deeper"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the "averaging ..." progress line
    assert err.startswith("herd: error:") and "n_layers=3" in err
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    # different tokenizers
    shutil.copytree(paths[0], tmp_path / "retok")
    lines = (tmp_path / "retok" / "tokenizer.model").read_text().splitlines()
    (tmp_path / "retok" / "tokenizer.model").write_text("\n".join(lines[:1000]) + "\n")
    assert main(["average", str(paths[0]), str(tmp_path / "retok"), str(tmp_path / "out")]) == 2
    assert "different tokenizers" in capsys.readouterr().err
    # one checkpoint, OUT among the inputs, weights that do not match, an existing checkpoint as OUT
    for argv, what in ((["average", str(paths[0]), str(tmp_path / "out")], "at least two"),
                       (["average", str(paths[0]), str(paths[1]), str(paths[0])], "is one of the inputs"),
                       (["average", str(paths[0]), str(paths[1]), str(tmp_path / "o"), "--weights", "1"], "2 checkpoints"),
                       (["average", str(paths[0]), str(paths[1]), str(paths[2])], "already exists")):
        assert main(argv) == 2
        assert what in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["average", str(paths[0]), str(paths[1]), str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    # the CLI on the happy path
    assert main(["average", *map(str, paths), str(tmp_path / "soup"), "--format", "hf", "--weights", "1,1,2"]) == 0
    out = capsys.readouterr().out
    assert "x 0.25" in out and "x 0.5" in out and "wrote hf checkpoint" in out
    got = load_checkpoint(tmp_path / "soup").state_dict()
    for k, v in _mean(models, [0.25, 0.25, 0.5]).items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-7)
