"""`herd export`: a checkpoint -> one GGUF file for llama.cpp (and an Ollama Modelfile beside it).

    herd export ckpt/ model.gguf --type q8_0
    herd export ckpt/ out/model.gguf --type q4_0 --ollama --system "You are terse."
    ollama create mymodel -f out/Modelfile

Reading GGUF goes the other way through `herd convert model.gguf ckpt/ --format herd` (and
load_checkpoint("model.gguf")).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from herd.checkpoint.gguf import QTYPES, write_gguf
from herd.checkpoint.gguf_vocab import LLAMA3_CHAT_TEMPLATE, OLLAMA_TEMPLATE
from herd.errors import HerdError
from herd.flags import add_bool_flag
from herd import fileio

OLLAMA_STOPS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
"""Stop strings of Ollama's own llama3 Modelfile."""


def modelfile_text(gguf_name: str, system: str | None = None) -> str:
    """An Ollama Modelfile for a GGUF file in the same folder, with the Llama 3 chat template."""
    if system is not None and '"""' in system:
        raise HerdError('the system prompt contains """, which a Modelfile cannot quote; remove it.')
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{OLLAMA_TEMPLATE}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in OLLAMA_STOPS]
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n"


def add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="checkpoint to export (herd, Hugging Face, Meta or GGUF; detected)")
    parser.add_argument("dst", type=Path, help="the .gguf file to write")
    parser.add_argument("--type", choices=QTYPES, default="f16",
                        help="weight type: f32, f16, bf16, or llama.cpp's 8-bit / 4-bit blocks q8_0, q4_0 "
                             "(q4_0 keeps the embedding and output at q8_0; norms stay f32)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.model (default: the one stored with the checkpoint)")
    parser.add_argument("--name", default=None, help="model name recorded in the file (default: DST's stem)")
    parser.add_argument("--chat-template", type=Path, default=None,
                        help="file with a Jinja chat template to embed (default: Meta's Llama 3 dialog format)")
    add_bool_flag(parser, "--ollama", default=False,
                  help="also write an Ollama Modelfile next to DST (then: ollama create NAME -f Modelfile)")
    parser.add_argument("--system", default=None, help="system prompt for the Modelfile (with --ollama)")
    add_bool_flag(parser, "--overwrite", default=False, help="replace an existing DST")


def _tokenizer_for(src: Path, explicit: Path | None):
    from herd.checkpoint import detect_format, find_tokenizer
    from herd.checkpoint.gguf import read_tokenizer
    from herd.tokenizer import Tokenizer

    if explicit is not None:
        return Tokenizer.from_file(explicit)
    fmt, _ = detect_format(src)
    if fmt == "gguf":
        tok = read_tokenizer(src)
        if tok is not None:
            return tok
    path = find_tokenizer(src)
    if path is None:
        raise HerdError(f"no tokenizer.model found with {src}; pass --tokenizer PATH (GGUF files carry their "
                        "tokenizer, so llama.cpp needs it).")
    return Tokenizer.from_file(path)


def run_export(ns: argparse.Namespace) -> int:
    from herd.checkpoint import load_checkpoint

    if ns.dst.suffix.lower() != ".gguf":
        raise HerdError(f"DST {ns.dst} should end in .gguf (llama.cpp and Ollama look for that name).")
    if ns.dst.exists() and not ns.overwrite:
        raise HerdError(f"{ns.dst} already exists; choose a new path or pass --overwrite.")
    if ns.dst.is_dir():
        raise HerdError(f"{ns.dst} is a folder; give the path of the .gguf file to write.")
    if ns.system is not None and not ns.ollama:
        raise HerdError("--system only goes into the Ollama Modelfile; add --ollama.")
    template = LLAMA3_CHAT_TEMPLATE
    if ns.chat_template is not None:
        if not ns.chat_template.is_file():
            raise HerdError(f"chat template file {ns.chat_template} does not exist; pass a file with a Jinja template.")
        template = ns.chat_template.read_text()
    tokenizer = _tokenizer_for(ns.src, ns.tokenizer)
    print(f"loading {ns.src} ...", file=sys.stderr, flush=True)
    model = load_checkpoint(ns.src)
    write_gguf(model, tokenizer, ns.dst, qtype=ns.type, name=ns.name or ns.dst.stem, chat_template=template)
    size = ns.dst.stat().st_size
    print(f"wrote {ns.dst} ({ns.type}, {size / 2**20:.1f} MiB, {model.num_params() / 1e6:.1f}M parameters, "
          f"vocabulary {tokenizer.n_words})")
    if ns.ollama:
        modelfile = ns.dst.parent / "Modelfile"
        fileio.atomic_write(modelfile, modelfile_text(ns.dst.name, ns.system))
        print(f"wrote {modelfile}; run: ollama create {ns.dst.stem} -f {modelfile}")
    return 0
