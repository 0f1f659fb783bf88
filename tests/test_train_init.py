"""`herd pretrain --init-from`: continued pre-training of an existing checkpoint starts at exactly the
loss transformers computes for the first batch; model overrides; bad checkpoints are one line and
write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from herd.checkpoint import save_checkpoint
from herd.data.shards import ShardDataset
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer
from herd.train.data import BatchLoader
from herd.train.loop import pretrain
from helpers import config, losses, make_shards

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=128)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards") / "d")


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A LlamaForCausalLM written by transformers' own save_pretrained (random weights, seeded)."""
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                                   rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper attention than the default init, so a layout mistake would show
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8)
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_first_loss_equals_transformers_loss(data, hf_checkpoint, tmp_path):
    cfg = config(data, tmp_path / "run", preset="", init_from=str(hf_checkpoint), steps=2, document_mask=False,
                 eval_every=0, seed=5)
    pretrain(cfg)
    first = losses(tmp_path / "run")[0]
    # The same first batch, drawn as the loop draws it, scored by transformers on its own checkpoint.
    batch = BatchLoader(ShardDataset(data, "train"), seed=5).next_batch(cfg.batch_size, cfg.seq_len)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_checkpoint, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(batch.inputs).logits
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.targets.reshape(-1)).item()
    assert first == pytest.approx(want, abs=1e-5)
    assert losses(tmp_path / "run")[1] < first  # and it trains from there
    final = json.loads((tmp_path / "run" / "final" / "herd.json").read_text())["model_args"]
    assert final["dim"] == 64 and final["vocab_size"] == 256


def test_model_overrides_extend_the_context(data, tmp_path):
    base = Transformer(ModelArgs(**SHAPE))
    base.init_weights()
    save_checkpoint(base, tmp_path / "base")
    cfg = config(data, tmp_path / "run", preset="", init_from=str(tmp_path / "base"), steps=1, eval_every=0,
                 max_seq_len=512, use_scaled_rope=True, rope_scale_factor=4.0, rope_original_max_seq_len=128)
    pretrain(cfg)
    args = json.loads((tmp_path / "run" / "final" / "herd.json").read_text())["model_args"]
    assert args["max_seq_len"] == 512 and args["use_scaled_rope"] and args["rope_scale_factor"] == 4.0
    with pytest.raises(HerdError, match="--rope-scale-factor -1.0 must be positive"):
        pretrain(config(data, tmp_path / "bad", preset="", init_from=str(tmp_path / "base"), rope_scale_factor=-1.0))
    with pytest.raises(HerdError, match="both choose the model"):
        pretrain(config(data, tmp_path / "bad", preset="herd-1m", init_from=str(tmp_path / "base")))
    with pytest.raises(HerdError, match="--seq-len 256 is longer than"):
        pretrain(config(data, tmp_path / "bad", preset="", init_from=str(tmp_path / "base"), seq_len=256))
    assert not (tmp_path / "bad").exists()


def test_bad_init_checkpoints_are_one_line_and_write_nothing(data, tmp_path, official_tokenizer_model, capsys):
    from herd.cli import main

    small = Transformer(ModelArgs(**{**SHAPE, "vocab_size": 128}))
    small.init_weights()
    save_checkpoint(small, tmp_path / "small-vocab")
    meta = Transformer(ModelArgs(**SHAPE))
    meta.init_weights()
    save_checkpoint(meta, tmp_path / "meta", format="meta", shards=2)
    (tmp_path / "meta" / "consolidated.01.pth").unlink()
    save_checkpoint(meta, tmp_path / "meta-gap", format="meta", shards=2)
    (tmp_path / "meta-gap" / "consolidated.00.pth").unlink()
    save_checkpoint(meta, tmp_path / "other-tokenizer", tokenizer_path=official_tokenizer_model)
    mistral = tmp_path / "mistral"
    save_checkpoint(meta, mistral, format="hf")
    cfg = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral",
                                                     "architectures": ["MistralForCausalLM"]}))
    cases = {
        "small-vocab": "the shards use a 256-token vocabulary but",
        "meta": "holds 1 model-parallel shard(s) but its weights are split 2 ways",
        "meta-gap": "lacks consolidated.00.pth (1 shard file(s) found)",
        "other-tokenizer": "tokenized with another tokenizer than",
        "mistral": "describes a 'mistral' model (MistralForCausalLM), not Llama",
        "missing": "does not exist",
    }
    for name, expect in cases.items():
        out = tmp_path / f"out-{name}"
        code = main(["pretrain", "--data", str(data), "--out", str(out), "--init-from", str(tmp_path / name),
                     "--steps", "1", "--batch-size", "4", "--seq-len", "32", "--threads", "1"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("herd: error: "), (name, lines)
        assert expect in lines[0], (name, lines[0])
        assert not out.exists(), name
