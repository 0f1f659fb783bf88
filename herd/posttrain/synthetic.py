"""A synthetic instruction set built from text every Python install has: questions about standard-library
functions, answered with the first sentence of their docstring.

    records = docstring_qa()                 # ~600 TRL conversational records, one per function
    write_records(records, "pydoc_qa.jsonl")
    python -m herd.posttrain.synthetic pydoc_qa.jsonl      # the same, from the shell

Each record asks about one public function of a fixed list of standard-library modules, in one of a
few phrasings, and the reply has one fixed form:

    user:       What does the Python function `json.dumps` do?
    assistant:  `json.dumps`: Serialize ``obj`` to a JSON formatted ``str``.

so whether a model learned the *form* of the replies (name in backticks, a colon, one sentence
ending in a period, then the end of the turn) is a regular expression (`reply_form`), whatever it
learned of the content. A record's "id" is the function's name, so herd's hash split holds out
whole functions: held-out prompts ask about functions the model never saw answered. The exact
set depends on the Python version (docstrings change between releases), not on the machine.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from herd.fileio import atomic_write

MODULES = (
    "os.path", "json", "string", "textwrap", "shutil", "glob", "fnmatch", "random", "statistics", "heapq", "bisect",
    "functools", "itertools", "copy", "csv", "base64", "hashlib", "calendar", "tempfile", "zipfile", "tarfile",
    "gzip", "difflib", "pprint", "re", "math", "operator", "urllib.parse", "html", "email.utils", "uuid", "secrets",
    "subprocess", "logging", "inspect", "ast", "tokenize", "dis", "types", "dataclasses", "contextlib", "io", "time",
    "struct", "codecs", "unicodedata", "locale", "platform", "sysconfig", "pickle", "configparser", "mimetypes",
    "colorsys", "binascii", "zlib", "bz2", "lzma", "filecmp", "stat", "os", "sys", "threading", "socket", "signal",
    "weakref", "cmath", "keyword", "linecache", "traceback", "warnings", "doctest", "webbrowser", "ipaddress",
    "getpass", "shlex",
)
"""Modules whose public functions are asked about (present in every CPython 3.10+ install)."""

QUESTIONS = (
    "What does the Python function `{name}` do?",
    "Explain `{name}` from the Python standard library in one sentence.",
    "In Python, what is `{name}` for?",
    "Describe the function `{name}`.",
)
_SENTENCE = re.compile(r"^(.+?\.)(?:\s|$)")
_FORM = re.compile(r"^`([\w.]+)`: \S.*\.$", re.S)


def first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph, on one line; None if it has no plain one."""
    para = " ".join(doc.split("\n\n")[0].split())
    m = _SENTENCE.match(para)
    if m is None:
        return None
    sentence = m.group(1)
    if not 15 <= len(sentence) <= 100 or re.match(r"^[\w.]+\(.*\)", sentence):  # a signature line, not prose
        return None
    return sentence


def stdlib_functions(modules: Iterable[str] = MODULES) -> dict[str, str]:
    """{qualified name: first docstring sentence} of the public functions defined in `modules`."""
    out: dict[str, str] = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a build without e.g. lzma
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) not in (module_name, module.__name__):
                continue  # imported from elsewhere: asked about where it is defined
            sentence = first_sentence(inspect.getdoc(obj) or "")
            if sentence:
                out.setdefault(f"{module_name}.{name}", sentence)
    return out


def docstring_qa(modules: Iterable[str] = MODULES, seed: int = 0) -> list[dict[str, Any]]:
    """One TRL conversational record per function: a question in a random phrasing and the reply
    "`name`: first sentence."; "id" is the function's name (the validation split holds out functions)."""
    rng = random.Random(seed)
    return [{"id": name, "messages": [{"role": "user", "content": rng.choice(QUESTIONS).format(name=name)},
                                      {"role": "assistant", "content": f"`{name}`: {sentence}"}]}
            for name, sentence in stdlib_functions(modules).items()]


def reply_form(reply: str, asked: str | None = None) -> bool:
    """Whether a reply has the trained form: `name`: one sentence ending in a period (naming `asked`, if given)."""
    m = _FORM.match(reply.strip())
    return m is not None and (asked is None or m.group(1) == asked)


def asked_name(question: str) -> str | None:
    """The function a question asks about (the first `...` in it)."""
    m = re.search(r"`([\w.]+)`", question)
    return m.group(1) if m else None


def write_records(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as jsonl, atomically."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m herd.posttrain.synthetic OUT.jsonl   (questions about standard-library "
              "functions, answered by their docstrings' first sentence)", file=sys.stderr)
        return 2
    records = docstring_qa()
    write_records(records, argv[0])
    print(f"wrote {len(records)} records to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
