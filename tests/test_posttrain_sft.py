"""`herd sft` end to end on a tiny checkpoint with the official Llama 3 tokenizer: the first logged loss
equals transformers' loss on the same batch (labels -100 outside the mask); a run killed mid-way and
resumed reproduces the uninterrupted curve exactly (full and LoRA with dropout); a LoRA run saves only
the adapters, peft loads the exported adapter and the merged export gives the same logits; bad input is
counted in the report or ends in one line, writing nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from herd.checkpoint import load_checkpoint
from herd.cli import main
from herd.errors import HerdError
import herd.posttrain.sft as sft_module
from herd.posttrain.adapter import load_adapter
from herd.posttrain.config import SFTConfig
from herd.posttrain.dataset import build_sft_data
from herd.posttrain.sft import sft
from herd.tokenizer import Tokenizer
from herd.train import state
from herd.train.metrics import read_log
from helpers import CHAT_SHAPE, arithmetic_chats, tiny_chat_checkpoint, write_jsonl

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def base(tmp_path_factory, official_tokenizer_model) -> Path:
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("base") / "tiny-hf", official_tokenizer_model)


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", arithmetic_chats(48))


def config(base: Path, chats: Path, out: Path, **kw) -> SFTConfig:
    values = dict(init_from=str(base), data=[str(chats)], out=str(out), max_seq_len=128, batch_size=4, steps=6,
                  lr=3e-3, warmup_ratio=0.2, val_fraction=0.15, eval_every=3, eval_on_start=False, sample_prompts=1,
                  sample_tokens=6, checkpoint_every=2, log_every=100, tensorboard=False, peak_tflops=1.0, seed=3,
                  threads=min(2, os.cpu_count() or 1))  # fixed: float sums depend on the thread count
    return SFTConfig(**{**values, **kw})


def losses(out: Path, event: str = "train") -> list[float]:
    return [r["loss"] for r in read_log(out / "log.jsonl", event)]


def test_first_logged_loss_equals_transformers(base, chats, tmp_path, official_tokenizer_model):
    tok = Tokenizer.from_file(official_tokenizer_model)
    cfg = config(base, chats, tmp_path / "run", steps=1, eval_every=0, sample_prompts=0, val_fraction=0.0)
    data = build_sft_data(cfg.data_config(), tok, progress=False)
    from herd.posttrain.packing import SFTRows

    rows = SFTRows(data.train, cfg.max_seq_len, packing=True)
    assert 1 < len(rows) < len(data.train)  # several examples share rows
    cfg.batch_size = len(rows)  # the first batch is then every row: the whole training split, in any order
    sft(cfg)
    first = losses(tmp_path / "run")[0]
    # transformers on its own loading of the checkpoint: every example in one right-padded batch, labels
    # -100 outside the loss mask (and on padding); its loss is the mean over all labelled tokens
    examples = [data.train.example(i) for i in range(len(data.train))]
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), tok.pad_id)
    labels = torch.full((len(examples), width), -100)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        ids, mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask)
        input_ids[i, :len(ids)], attention[i, :len(ids)] = ids, 1
        labels[i, :len(ids)] = ids.masked_fill(~mask, -100)
    hf = transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(input_ids=input_ids, attention_mask=attention, labels=labels).loss.item()
    assert first == pytest.approx(want, rel=1e-5, abs=1e-5)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["kept"] == 48 and report["trained_tokens"] == int((labels != -100).sum())


@pytest.fixture(scope="module")
def reference(base, chats, tmp_path_factory):
    """The uninterrupted full fine-tuning run every resume is compared with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, sft(config(base, chats, out))


def test_full_run_learns_logs_replies_and_exports(reference, base):
    out, summary = reference
    curve = losses(out)
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.5
    assert summary["val_loss"] < losses(out, "val")[0] + 1e-9
    replies = read_log(out / "log.jsonl", "replies")
    assert [r["step"] for r in replies] == [3, 6] and {"text", "stop", "ended_with_eot", "question"} <= set(replies[0]["replies"][0])
    assert replies[0]["replies"][0]["question"].startswith(("What is", "Add"))
    final = load_checkpoint(out / "final")
    assert (out / "final" / "tokenizer.model").is_file() and (out / "loss.png").is_file()
    start = load_checkpoint(base)
    assert not torch.equal(final.layers[0].attention.wq.weight, start.layers[0].attention.wq.weight)


def test_stop_and_resume_reproduces_the_curve_exactly(reference, base, chats, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    first = sft(config(base, chats, out, stop_at=4))
    assert first["stopped_at"] == 4
    sft(config(base, chats, out, resume=True))
    assert losses(out) == losses(ref_out)  # bit for bit, every step
    assert losses(out, "val") == losses(ref_out, "val")
    a, b = load_checkpoint(ref_out / "final"), load_checkpoint(out / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def _crash_at(monkeypatch, step: int) -> None:
    """Make the loop die inside its `step`-th training step, as a killed process would."""
    real, calls = sft_module.train_step, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(sft_module, "train_step", dying)


def test_lora_with_dropout_killed_and_resumed_equals_uninterrupted(base, chats, tmp_path, monkeypatch):
    lora = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.1, lora_targets=["all-linear"], lr=1e-2)
    ref = tmp_path / "ref"
    sft(config(base, chats, ref, **lora))
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_at(m, 5)  # after the checkpoint of step 4, before step 5 is logged
        with pytest.raises(KeyboardInterrupt):
            sft(config(base, chats, out, **lora))
    assert len(losses(out)) == 4
    sft(config(base, chats, out, resume=True, **lora))
    assert losses(out) == losses(ref)  # dropout masks too: the RNG state was restored
    assert losses(out, "val") == losses(ref, "val")


def test_lora_saves_only_adapters_and_peft_loads_the_export(base, chats, tmp_path):
    out = tmp_path / "run"
    cfg = config(base, chats, out, lora_rank=4, lora_alpha=8, lora_targets=["wq", "wv", "w2"], lr=2e-2, merge=True,
                 export_format="hf", steps=4, eval_every=0, sample_prompts=0)
    summary = sft(cfg)
    assert summary["adapter"] == str(out / "adapter") and summary["final"] == str(out / "final")
    # the checkpoints hold the adapters and their optimizer state, nothing of the frozen base
    ckpt = state.latest_state(out / "checkpoints")
    import torch.distributed.checkpoint as dcp

    keys = list(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert len(model_keys) == 2 * 3 * CHAT_SHAPE["n_layers"]
    size = sum(p.stat().st_size for p in ckpt.iterdir())
    assert size < 0.05 * sum(p.stat().st_size for p in base.glob("*.safetensors"))
    # herd's base + adapter, peft's base + adapter and the merged export agree
    herd_model = load_checkpoint(base)
    load_adapter(herd_model, out / "adapter")
    assert any(float(m.lora_B.weight.abs().max()) > 0 for n, m in herd_model.named_modules() if hasattr(m, "lora_B"))
    hf_base = transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_base, out / "adapter").eval()
    merged = transformers.LlamaForCausalLM.from_pretrained(out / "final", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 128000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = herd_model.eval()(tokens)
        got_peft = peft_model(input_ids=tokens).logits
        got_merged = merged(input_ids=tokens).logits
        plain = transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()(input_ids=tokens).logits
    assert (got_peft - plain).abs().max() > 1e-3  # the adapter changes the model...
    torch.testing.assert_close(got_peft, want, atol=2e-5, rtol=1e-4)  # ...the same way in peft and herd
    torch.testing.assert_close(got_merged, want, atol=2e-5, rtol=1e-4)
    assert (out / "adapter" / "tokenizer.model").is_file() and (out / "final" / "tokenizer.model").is_file()


def test_bad_records_are_counted_and_reported(base, tmp_path, capsys):
    good = arithmetic_chats(30)
    bad = [{"messages": [{"role": "user", "content": "no reply"}]},
           {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
           {"text": "plain text"}]
    data = write_jsonl(tmp_path / "mixed.jsonl", good + bad, raw_lines=["{not json", "[1, 2]"])
    out = tmp_path / "run"
    rc = main(["sft", "--init-from", str(base), "--data", str(data), "--out", str(out), "--steps", "1",
               "--batch-size", "2", "--max-seq-len", "64", "--eval-every", "0", "--sample-prompts", "0",
               "--tensorboard", "false", "--peak-tflops", "1"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "no_assistant_turn: 1" in err and "unknown_role: 1" in err and "malformed_json: 2" in err
    report = json.loads((out / "data_report.json").read_text())
    assert report["records"] == 35 and report["kept"] == 30
    assert report["dropped"] == {"no_assistant_turn": 1, "unknown_role": 1, "unknown_format": 1, "malformed_json": 2}
    assert any(":31" in s for s in report["samples"]["no_assistant_turn"])  # file:line of the record


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("case", ["nothing_usable", "wrong_format", "other_tokenizer", "no_init_from",
                                  "missing_checkpoint", "too_long", "lora_with_tp"])
def test_bad_input_is_one_line_and_writes_nothing(case, base, chats, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sft", "--init-from", str(base), "--data", str(chats), "--out", str(out), "--steps", "1",
            "--max-seq-len", "64", "--tensorboard", "false"]
    if case == "nothing_usable":
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}], ["oops"])
        argv[argv.index(str(chats))] = str(bad)
        want = "no usable SFT example"
    elif case == "wrong_format":
        csv = tmp_path / "chats.csv"
        csv.write_text("prompt,completion\nhi,hello\n")
        argv[argv.index(str(chats))] = str(csv)
        want = "is not a jsonl"
    elif case == "other_tokenizer":
        from herd.tokenizer import train_bpe

        import os

        other = tmp_path / "other.model"
        train_bpe([Path(os.__file__)], 600, other, show_progress=False)  # a BPE of the stdlib's os.py
        argv += ["--tokenizer", str(other)]
        want = "differs from the checkpoint's own"
    elif case == "no_init_from":
        argv[argv.index("--init-from"):argv.index("--init-from") + 2] = []
        want = "pass --init-from"
    elif case == "missing_checkpoint":
        argv[argv.index(str(base))] = str(tmp_path / "nowhere")
        want = "does not exist"
    elif case == "too_long":
        argv[argv.index("64")] = "4096"
        want = "longer than the model's context"
    else:
        argv += ["--lora-rank", "4", "--tp", "2"]
        want = "LoRA under tensor parallel"
    assert want in _one_line_error(capsys, argv)
    assert not out.exists()


def test_resume_refuses_other_lora_settings(base, chats, tmp_path, capsys):
    out = tmp_path / "run"
    sft(config(base, chats, out, lora_rank=4, steps=4, stop_at=2, eval_every=0, sample_prompts=0))
    capsys.readouterr()
    err = _one_line_error(capsys, ["sft", "--out", str(out), "--resume", "--lora-rank", "8"])
    assert "--lora-rank 4" in err and "drop --lora-rank to resume" in err
    with pytest.raises(HerdError, match="already holds checkpoints"):
        sft(config(base, chats, out, lora_rank=4, steps=4))
    # --resume alone picks the saved settings up again and finishes the run
    assert main(["sft", "--out", str(out), "--resume"]) == 0
    assert [r["step"] for r in read_log(out / "log.jsonl", "train")] == [1, 2, 3, 4]


def test_sft_help_lists_every_group(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = capsys.readouterr().out
    for flag in ("--init-from", "--data", "--train-on", "--packing", "--lora-rank", "--lora-targets", "--merge",
                 "--export-format", "--resume", "--eval-every", "--sample-prompts"):
        assert flag in text


def test_lora_on_an_int8_base_trains_and_merges_into_the_float_weights(base, chats, tmp_path):
    """QLoRA-style: the block linears held as int8 weight-only layers (a quarter of fp32), adapters fp32."""
    from herd.posttrain.lora import LoRAConfig
    from herd.posttrain.policy import load_policy, policy_args
    from herd.quant import Int8Linear

    lora = LoRAConfig(lora_rank=4, lora_alpha=8, lora_targets=["all-linear"], lora_base_dtype="int8")
    args = policy_args(base)
    model = load_policy(base, args, None, "cpu", lora=lora)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 7 * CHAT_SHAPE["n_layers"]
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    tokens = torch.randint(0, 128000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = load_checkpoint(base)(tokens), model.eval()(tokens)
    assert 0 < float((got - want).norm() / want.norm()) < 0.02  # per-channel int8: close, not equal

    out = tmp_path / "run"
    sft(config(base, chats, out, lora_rank=4, lora_alpha=8, lora_targets=["all-linear"], lora_base_dtype="int8",
               lr=2e-2, steps=4, eval_every=0, sample_prompts=0, merge=True))
    curve = losses(out)
    assert curve[-1] < curve[0]
    merged = load_checkpoint(out / "final")  # the adapters folded into the float32 checkpoint weights
    assert merged.layers[0].attention.wq.weight.dtype == torch.float32
    float_base = load_checkpoint(base)
    load_adapter(float_base, out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(tokens), float_base.eval()(tokens), atol=2e-5, rtol=1e-4)
