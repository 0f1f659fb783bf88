"""`herd codeshield FILE|-`: scan source files (or stdin) with Meta's Code Shield.

    herd codeshield app.py util.c                   language from each file's extension
    cat snippet | herd codeshield - --language js   stdin needs --language (or --language all)
    herd codeshield reply.md --markdown             scan the fenced code blocks of a model's reply

Prints each finding (file:line, CWE, severity, rule, analyzer, description) and a summary line,
or one JSON object per file with --json. Exit status: 0 when nothing is found, 1 when Code Shield
recommends a warning, 3 when it recommends blocking (an error-severity finding); 2 is herd's usual
bad-input status. A file whose language Code Shield does not know is refused with one line
(pass --language NAME, or --language all for every language's rules).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from herd.errors import HerdError

EXIT = {"ignore": 0, "warn": 1, "block": 3}


def add_codeshield_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help="source files to scan; '-' reads stdin")
    parser.add_argument("--language", default=None,
                        help="language of every input (python, c, cpp, csharp, java, javascript, php, rust, ...; "
                             "'all' = every language's rules); default: from each file's extension")
    # plain switches (not `--flag BOOL`): a BOOL value would swallow the FILE that follows
    parser.add_argument("--markdown", action="store_true",
                        help="the inputs are markdown (model replies): scan their fenced code blocks, each in its "
                             "fence's language")
    parser.add_argument("--json", action="store_true", help="one JSON object per input instead of text")


def _language(path: Path, given: str | None, markdown: bool) -> str | None:
    from herd.safety.codeshield import LANGUAGE_ALIASES, language_of, language_of_path

    if markdown:
        return None
    if given is not None:
        if given.lower() == "all":
            return None
        lang = language_of(given)
        if lang is None:
            raise HerdError(f"Code Shield has no rules for language '{given}'; use one of "
                            f"{', '.join(sorted(set(LANGUAGE_ALIASES.values())))}, or --language all.")
        return lang
    if str(path) == "-":
        raise HerdError("stdin has no file extension to tell its language; pass --language NAME (or "
                        "--language all).")
    lang = language_of_path(path)
    if lang is None:
        raise HerdError(f"{path}: Code Shield has no rules for '{path.suffix or 'files without an extension'}'; "
                        "pass --language NAME, or --language all to scan with every language's rules.")
    return lang


def run_codeshield(ns: argparse.Namespace) -> int:
    from herd.safety.codeshield import CodeShieldScanner, ScanResult

    inputs: list[tuple[Path, str | None, str]] = []
    for path in ns.files:
        lang = _language(path, ns.language, ns.markdown)  # every input checked before any scan
        if str(path) == "-":
            text = sys.stdin.read()
        else:
            if not path.is_file():
                raise HerdError(f"{path} does not exist or is not a file; pass source files or '-' for stdin.")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise HerdError(f"{path} is not UTF-8 text; Code Shield scans source code.") from None
        inputs.append((path, lang, text))
    scanner = CodeShieldScanner()

    async def scan_all() -> list[ScanResult]:
        return list(await asyncio.gather(*(scanner.scan_reply(text) if ns.markdown else scanner.scan(text, lang)
                                           for _, lang, text in inputs)))

    results = asyncio.run(scan_all())
    worst = "ignore"
    for (path, _, _), res in zip(inputs, results):
        if res.treatment == "block" or (res.treatment == "warn" and worst == "ignore"):
            worst = res.treatment
        name = "<stdin>" if str(path) == "-" else str(path)
        if ns.json:
            print(json.dumps({"file": name, **res.to_dict()}, ensure_ascii=False))
            continue
        for f in res.findings:
            print(f"{name}:{f.line or '?'}: {f.cwe or 'CWE-?'} {f.severity} {f.rule} ({f.analyzer}, {f.language}): "
                  f"{f.description}")
        for note in res.notes:
            print(f"{name}: note: {note}", file=sys.stderr)
        what = f"{res.blocks} code block(s), " if ns.markdown else ""
        print(f"{name}: {what}{len(res.findings)} finding(s), recommended treatment: {res.treatment} "
              f"({res.seconds * 1000:.0f} ms, rules: {', '.join(res.languages) or 'none'})", file=sys.stderr)
    return EXIT[worst]
