"""The commands of issue 15 end to end: `herd export` (GGUF + Ollama Modelfile), `herd convert` from
GGUF and with --quantize, and `herd generate --quantize / --draft`, including their one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from herd.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from herd.cli import main  # noqa: E402
from herd.model import ModelArgs, Transformer  # noqa: E402
from herd.tokenizer import Tokenizer, train_bpe  # noqa: E402

STDLIB = Path(os.__file__).parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A target and a draft model (same 768-word herd-trained tokenizer) and one with another tokenizer."""
    root = tmp_path_factory.mktemp("export")
    files = sorted(p for p in STDLIB.glob("*.py") if 20_000 < p.stat().st_size < 200_000)
    tok, _ = train_bpe(files[:6], 768, root / "tok.model", show_progress=False)
    other, _ = train_bpe(files[6:12], 768, root / "other.model", show_progress=False)
    out = {}
    for name, seed, dim, tok_path in (("target", 0, 128, root / "tok.model"), ("draft", 1, 64, root / "tok.model"),
                                      ("alien", 2, 64, root / "other.model")):
        torch.manual_seed(seed)
        model = Transformer(ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=768, multiple_of=64,
                                      max_seq_len=128, tie_embeddings=True))
        model.init_weights()
        out[name] = save_checkpoint(model.eval(), root / name, tokenizer_path=tok_path)
    return root, out, tok


def test_export_writes_gguf_and_modelfile_and_convert_reads_it_back(ckpts, capsys):
    root, paths, tok = ckpts
    dst = root / "out" / "tiny.gguf"
    assert main(["export", str(paths["target"]), str(dst), "--type", "q8_0", "--ollama",
                 "--system", "You are terse."]) == 0
    out = capsys.readouterr().out
    assert dst.is_file() and "wrote" in out and "ollama create tiny" in out
    modelfile = (dst.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf\n")
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and 'SYSTEM """You are terse."""' in modelfile
    assert "<|start_header_id|>user<|end_header_id|>" in modelfile and "{{ .Prompt }}" in modelfile

    # GGUF -> herd folder, with the vocabulary from inside the GGUF as tokenizer.model
    back = root / "back"
    assert main(["convert", str(dst), str(back), "--format", "herd"]) == 0
    model = load_checkpoint(back)
    assert model.args == load_checkpoint(paths["target"]).args
    text = "def main():\n    print('hi')\n"
    assert Tokenizer.from_file(back / "tokenizer.model").encode(text) == tok.encode(text)
    # and a second export refuses to overwrite without --overwrite
    assert main(["export", str(paths["target"]), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_generate_with_quantize_and_draft_matches_plain_greedy(ckpts, capsys):
    root, paths, tok = ckpts
    base = ["generate", "--checkpoint", str(paths["target"]), "--prompt", "import os\n", "--temperature", "0",
            "--max-new-tokens", "16"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--draft", str(paths["draft"]), "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "draft acceptance" in out.err
    assert main(base + ["--quantize", "int8"]) == 0
    quant = capsys.readouterr().out
    assert len(quant) > 0
    # a GGUF file runs directly, with its own tokenizer
    gguf_path = root / "direct.gguf"
    assert main(["export", str(paths["target"]), str(gguf_path), "--type", "f32"]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(gguf_path), "--prompt", "import os\n", "--temperature", "0",
                 "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == plain


def test_convert_quantize_saves_a_quantized_checkpoint(ckpts, capsys):
    root, paths, _ = ckpts
    dst = root / "int4"
    assert main(["convert", str(paths["target"]), str(dst), "--format", "herd", "--quantize", "int4",
                 "--group-size", "64"]) == 0
    model = load_checkpoint(dst)
    assert model.quantization.method == "int4" and model.quantization.group_size == 64
    assert main(["generate", "--checkpoint", str(dst), "--prompt", "x", "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["generate", "--draft", "{alien}"], "another tokenizer"),
    (["generate", "--draft", "{root}/missing"], "does not exist"),
    (["generate", "--quantize", "int4", "--group-size", "48"], "group size"),
    (["export", "{target}", "{root}/x.bin"], "should end in .gguf"),
    (["export", "{target}", "{root}/y.gguf", "--system", "hi"], "add --ollama"),
    (["convert", "{target}", "{root}/z", "--format", "hf", "--quantize", "int8"], "--format herd"),
])
def test_bad_input_is_one_line(ckpts, capsys, argv, message):
    root, paths, _ = ckpts
    argv = [a.format(root=root, **{k: str(v) for k, v in paths.items()}) for a in argv]
    if argv[0] == "generate":
        argv += ["--checkpoint", str(paths["target"]), "--prompt", "x", "--max-new-tokens", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("herd: error: ") and message in err and err.count("\n") == 1
