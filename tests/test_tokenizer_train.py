"""Training vocabularies: a BPE trained on Python stdlib sources loads like the official tokenizer,
has exactly --vocab-size ids, round-trips held-out text, trains in seconds; the CLI reads .txt, .jsonl
and folders; `stats` measures characters per token against the official tokenizer."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from herd.errors import HerdError
from herd.tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer, train_bpe

STDLIB = Path(os.__file__).parent


def _sources() -> list[Path]:
    files = sorted(p for p in STDLIB.glob("*.py") if 20_000 < p.stat().st_size < 200_000)
    assert len(files) > 40
    return files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    files = _sources()
    train, held_out = files[::2][:30], files[1::2][:10]
    out = tmp_path_factory.mktemp("bpe") / "stdlib4k.model"
    t0 = time.perf_counter()
    tok, stats = train_bpe(train, 4096, out, show_progress=False)
    return tok, stats, held_out, out, time.perf_counter() - t0


def test_trained_vocab_shape_and_specials(trained):
    tok, stats, _, out, seconds = trained
    assert tok.n_words == 4096 and tok.n_bpe == 3840  # --vocab-size counts the 256 specials
    assert stats.documents == 30 and stats.bytes > 1_000_000
    assert seconds < 60  # a few seconds on 2 cores; generous for a loaded machine
    assert list(tok.special_tokens) == SPECIAL_TOKEN_NAMES
    assert tok.special_tokens["<|begin_of_text|>"] == 3840 and tok.special_tokens["<|eot_id|>"] == 3849
    assert set(tok.stop_tokens) == {3841, 3848, 3849}
    lines = out.read_text().splitlines()
    assert len(lines) == 3840
    ranks = {base64.b64decode(tok_b64): int(r) for tok_b64, r in (ln.split() for ln in lines)}
    assert [ranks[bytes([b])] for b in range(256)] == list(range(256))  # every single byte, in byte order
    # every merged token is reachable: tiktoken turns its bytes into exactly that one token
    for token, rank in list(ranks.items())[::7]:
        assert tok.model._encode_single_piece(token) == [rank]
    # loading the written file again gives the same ids and the file's sha256
    again = Tokenizer.from_file(out)
    assert again.sha256 == tok.sha256 and len(again.sha256) == 64


def test_trained_vocab_round_trips_held_out_text(trained, official_tokenizer_model):
    tok, _, held_out, _, _ = trained
    texts = [p.read_text(encoding="utf-8") for p in held_out]
    texts += ["naïve café 日本語 👋🏽 \x00\x01 binary-ish\r\n", " " * 30_001 + "x", "<|eot_id|> stays text"]
    for text in texts:
        ids = tok.encode(text)
        assert max(ids) < tok.n_bpe
        assert tok.decode(ids) == text
    # a code vocabulary compresses held-out code far better than raw bytes
    code = "".join(texts[:len(held_out)])
    assert len(code) / len(tok.encode(code)) > 2.5
    assert tok.encode("x", bos=True, eos=True) == [3840, tok.encode("x")[0], 3841]


def test_cli_train_reads_txt_jsonl_and_folders_and_stats_compares(tmp_path, capsys, official_tokenizer_model):
    from herd.cli import main

    sources = _sources()
    folder = tmp_path / "docs"
    folder.mkdir()
    for p in sources[:6]:
        (folder / p.name).write_text(p.read_text(encoding="utf-8"))
    (folder / "skip.bin").write_bytes(b"\xff\xfe\x00binary")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p.read_text(encoding="utf-8"), "id": i})
                               for i, p in enumerate(sources[6:10])) + "\n")
    txt = tmp_path / "notes.txt"
    txt.write_text("Plain English notes about tokenizers.\n" * 200)
    out = tmp_path / "out" / "tok.model"
    assert main(["tokenizer", "train", "--input", str(folder), str(jsonl), str(txt), "--vocab-size", "1024",
                 "--output", str(out)]) == 0
    report = capsys.readouterr().out
    assert "n_words 1024" in report and "skipped 1 files" in report
    assert Tokenizer.from_file(out).n_words == 1024
    held = tmp_path / "held.txt"
    held.write_text(sources[12].read_text(encoding="utf-8"))
    assert main(["tokenizer", "stats", "--tokenizer", str(out), str(official_tokenizer_model),
                 "--input", str(held), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    text = held.read_text()
    assert rows[1]["tokens"] == len(Tokenizer.from_file(official_tokenizer_model).encode(text))
    assert rows[1]["chars_per_token"] == pytest.approx(len(text) / rows[1]["tokens"])
    assert rows[0]["roundtrip_share"] == rows[1]["roundtrip_share"] == 1.0
    assert rows[0]["n_words"] == 1024 and rows[0]["chars_per_token"] < rows[1]["chars_per_token"]


def test_train_errors(tmp_path, capsys):
    from herd.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(HerdError, match="line 2"):
        train_bpe([bad], 1024, tmp_path / "x.model", show_progress=False)
    with pytest.raises(HerdError, match="at least 513"):
        train_bpe(["some text"], 512, tmp_path / "x.model")
    with pytest.raises(HerdError, match="fewer than --vocab-size"):
        train_bpe(["tiny corpus, tiny corpus"], 4096, tmp_path / "x.model", show_progress=False)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    assert main(["tokenizer", "train", "--input", str(latin), "--vocab-size", "1024",
                 "--output", str(tmp_path / "y.model")]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "z")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.model").exists() and not (tmp_path / "y.model").exists()
