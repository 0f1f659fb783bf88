"""`herd generate` and `herd chat` end to end: a real checkpoint on disk with the official tokenizer,
output compared with greedy decoding by full forwards and the official tokenizer's decode."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from herd.checkpoint import save_checkpoint
from herd.cli import main
from herd.model import ModelArgs, Transformer
from herd.tokenizer import ChatFormat, Tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only adds barrier waits on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, official_tokenizer_model):
    """A tiny model with the official 128256-token vocabulary, saved with its tokenizer."""
    torch.manual_seed(5)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                     max_seq_len=256, tie_embeddings=True)
    model = Transformer(args).eval()
    model.init_weights(std=0.1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, path, tokenizer_path=official_tokenizer_model)
    return path, model, Tokenizer.from_file(official_tokenizer_model)


def greedy_text(model, tokenizer, prompt: list[int], n: int) -> tuple[list[int], str]:
    """Greedy reply by full forwards (no cache), stopping at the tokenizer's stop tokens."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([seq]))[0, -1].argmax())
            if tok in tokenizer.stop_tokens:
                break
            seq.append(tok)
    ids = seq[len(prompt):]
    return ids, tokenizer.decode(ids)


def test_generate_prints_the_greedy_continuation(setup, capsys):
    path, model, tok = setup
    code = main(["generate", "--checkpoint", str(path), "--prompt", "The capital of France is",
                 "--max-new-tokens", "12", "--temperature", "0"])
    out = capsys.readouterr()
    assert code == 0
    _, want = greedy_text(model, tok, tok.encode("The capital of France is", bos=True), 12)
    assert out.out == want + "\n"
    assert "tokens/s" in out.err


def test_chat_keeps_history(setup, capsys, monkeypatch):
    path, model, tok = setup
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd then?\n"))
    code = main(["chat", "--checkpoint", str(path), "--system", "Be brief.", "--max-new-tokens", "6",
                 "--temperature", "0"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0
    chat = ChatFormat(tok)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first_ids, first = greedy_text(model, tok, chat.encode_dialog_prompt(dialog), 6)
    dialog += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second_prompt = chat.encode_dialog_prompt(dialog)
    _, second = greedy_text(model, tok, second_prompt, 6)
    assert out == first + "\n" + second + "\n"
    # The second turn reused the first turn's KV cache: every full 16-token block that the first turn
    # computed (its prompt and reply, less the last sampled token) and the second prompt starts with.
    first_prompt = chat.encode_dialog_prompt(dialog[:2])
    computed = first_prompt + first_ids[:-1]
    shared = next(i for i, (a, b) in enumerate(zip(computed + [-1], second_prompt)) if a != b)
    reports = [line for line in captured.err.splitlines() if "prefix cache" in line]
    assert reports[0].endswith(f"0 of {len(first_prompt)} prompt tokens from the prefix cache]")
    assert f"{shared // 16 * 16} of {len(second_prompt)} prompt tokens" in reports[1] and shared >= 32


def test_chat_reads_piped_stdin_and_resets(setup):
    """The real command with input piped in: /reset forgets the first exchange, /exit ends it."""
    path, model, tok = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", "import sys; from herd.cli import main; sys.exit(main())", "chat", "--checkpoint", str(path), "--max-new-tokens",
                           "5", "--temperature", "0", "--chat-style", "meta"],
                          input="Hi\n/reset\nHow are you?\n/exit\nnever read\n", capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    chat = ChatFormat(tok, style="meta")
    _, first = greedy_text(model, tok, chat.encode_dialog_prompt([{"role": "user", "content": "Hi"}]), 5)
    _, second = greedy_text(model, tok, chat.encode_dialog_prompt([{"role": "user", "content": "How are you?"}]), 5)
    assert proc.stdout == first + "\n" + second + "\n"
    assert "history cleared" in proc.stderr


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "x", "--max-new-tokens", "300"], "more than the context of 256"),
    (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "x", "--top-p", "1.5"], "top_p must be in"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--prompt", "x", "--stop-tokens", "eot"], "--stop-tokens takes comma-separated int values"),
    (["--prompt", "x", "--stop-tokens", "128009,999999"], "--stop-tokens 999999 are not token ids"),
    (["--prompt", "x", "--stop-tokens", "-1"], "--stop-tokens -1 are not token ids"),
])
def test_bad_generate_input_exits_2_with_one_line(setup, capsys, extra, message):
    path, _, _ = setup
    code = main(["generate", "--checkpoint", str(path), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("herd: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_missing_checkpoint_and_wrong_tokenizer(tmp_path, setup, capsys, official_tokenizer_model):
    code = main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    small = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=300, multiple_of=32)
    save_checkpoint(Transformer(small), tmp_path / "small", tokenizer_path=official_tokenizer_model)
    code = main(["generate", "--checkpoint", str(tmp_path / "small"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("herd: error: the tokenizer has 128256 tokens but the model only 300")


def test_max_seq_len_is_clamped_to_the_model_context(setup, capsys, monkeypatch):
    """--max-seq-len 100000 on a 256-context model allocated a 100000-slot KV cache (20 GB for a
    512-context model); now the cache is the model's context and the user is told."""
    from herd.inference import cli as inference_cli

    sizes = []
    real = inference_cli.Engine

    def spy(model, **kw):
        sizes.append(kw["max_seq_len"])
        return real(model, **kw)

    monkeypatch.setattr(inference_cli, "Engine", spy)
    path, model, tok = setup
    code = main(["generate", "--checkpoint", str(path), "--prompt", "Hello", "--max-new-tokens", "4",
                 "--temperature", "0", "--max-seq-len", "100000"])
    out = capsys.readouterr()
    assert code == 0 and sizes == [256]
    assert "--max-seq-len 100000 is longer than the model's context of 256" in out.err
    _, want = greedy_text(model, tok, tok.encode("Hello", bos=True), 4)
    assert out.out == want + "\n"
