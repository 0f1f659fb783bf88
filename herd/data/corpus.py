"""An offline corpus from text already on this machine, for demos, tests and `herd speedrun`.

Four domains, one jsonl document per source file (metadata: source, domain, path):

- code          Python standard library modules (.py)
- general       docstrings of stdlib modules, package descriptions (site-packages METADATA),
                /usr/share/doc READMEs, copyright files and changelogs, /usr/share/common-licenses
- math          docstrings and tests of numeric code: statistics, fractions, decimal, random,
                numpy.linalg / polynomial / random, scipy.stats / special / optimize / integrate,
                sympy, mpmath (whichever are installed)
- multilingual  spaCy's example sentences and stop-word lists in ~70 languages, gettext
                translations (.po msgstr) and the stdlib's CJK encoding test texts

Everything is read in sorted order and capped per domain, so the same machine gives the same
corpus. /usr/share/doc holds many copies of the same licence texts: real duplicates for the
dedup stages to find.
"""

from __future__ import annotations

import ast
import gettext
import gzip
import inspect
import json
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from herd.errors import HerdError
from herd.fileio import atomic_open

# share of max_mb each domain may take (close to Llama 3's mix; the pipeline re-balances by tokens)
DOMAIN_BUDGET = {"general": 0.40, "math": 0.25, "code": 0.25, "multilingual": 0.10}
MAX_DOC_CHARS = 200_000


def _read(path: Path) -> str | None:
    try:
        raw = gzip.open(path).read(4 * MAX_DOC_CHARS) if path.suffix == ".gz" else path.read_bytes()[:4 * MAX_DOC_CHARS]
        return raw.decode("utf-8")[:MAX_DOC_CHARS]
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


_TRIPLE = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)


def _docstrings(source: str) -> str:
    """Triple-quoted strings of Python source (docstrings, mostly), dedented, joined by blank lines.

    A regex, not ast: parsing is ~10x slower and the corpus only needs the prose.
    """
    parts = []
    for m in _TRIPLE.finditer(source):
        doc = inspect.cleandoc(m.group(1) or m.group(2) or "")
        if len(doc) > 40:
            parts.append(doc)
    return "\n\n".join(parts)


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _stdlib_modules() -> list[Path]:
    skip = {"test", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "__pycache__"}
    root = _stdlib()
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _code() -> Iterator[dict]:
    root = _stdlib()
    for p in _stdlib_modules():
        if (text := _read(p)) and text.strip():
            yield {"id": f"stdlib/{p.relative_to(root)}", "text": text, "source": "python-stdlib", "domain": "code"}


def _general() -> Iterator[dict]:
    root = _stdlib()
    for p in _stdlib_modules():
        if (text := _read(p)) and (doc := _docstrings(text)):
            name = ".".join(p.relative_to(root).with_suffix("").parts)
            yield {"id": f"pydoc/{name}", "text": doc, "source": "python-docstrings", "domain": "general",
                   "url": f"https://docs.python.org/3/library/{name}.html"}
    for meta in sorted(_site_packages().glob("*.dist-info/METADATA")):
        text = _read(meta) or ""
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        if len(body) > 500:
            yield {"id": f"pypi/{meta.parent.name}", "text": body, "source": "package-descriptions", "domain": "general"}
    for base in (Path("/usr/share/common-licenses"), Path("/usr/share/doc")):
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            name = p.name.lower()
            if p.is_file() and not p.is_symlink() and (name.startswith(("readme", "copyright", "changelog", "news"))
                                                       or base.name == "common-licenses" or name.endswith(".txt")):
                if (text := _read(p)) and len(text.strip()) > 200:
                    yield {"id": f"doc/{p.relative_to(base.parent)}", "text": text, "source": "system-docs", "domain": "general"}


def _math() -> Iterator[dict]:
    stdlib, site = _stdlib(), _site_packages()
    files = [stdlib / f for f in ("statistics.py", "fractions.py", "_pydecimal.py", "random.py", "numbers.py")]
    files += [stdlib / "test" / f for f in ("test_statistics.py", "test_fractions.py", "test_math.py")]
    for pkg in ("numpy/linalg", "numpy/polynomial", "numpy/random", "scipy/stats", "scipy/special", "scipy/optimize",
                "scipy/integrate", "scipy/linalg", "sympy", "mpmath"):
        if (site / pkg).is_dir():
            files += sorted(p for p in (site / pkg).rglob("*.py") if "tests" not in p.parts)
    for p in files:
        if not p.is_file() or not (text := _read(p)):
            continue
        doc = _docstrings(text)
        if len(doc) > 300:
            rel = p.relative_to(site) if site in p.parents else p.relative_to(stdlib)
            yield {"id": f"mathdoc/{rel}", "text": doc, "source": "math-docstrings", "domain": "math"}


def _multilingual() -> Iterator[dict]:
    site, stdlib = _site_packages(), _stdlib()
    lang_root = site / "spacy" / "lang"
    for lang in sorted(lang_root.iterdir()) if lang_root.is_dir() else []:
        for fname in ("examples.py", "stop_words.py"):
            p = lang / fname
            if not p.is_file() or not (text := _read(p)):
                continue
            try:
                strings = [n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant)
                           and isinstance(n.value, str) and not n.value.lstrip().startswith(("Example", ">>>"))]
            except SyntaxError:
                continue
            body = "\n".join(s.strip() for s in strings if s.strip())
            if len(body) > 100:
                yield {"id": f"spacy/{lang.name}/{fname}", "text": body, "source": "spacy-lang", "domain": "multilingual",
                       "lang_hint": lang.name}
    # gettext catalogs: translated messages of system programs (coreutils, gcc, ...), one document
    # per catalog; English catalogs (en, en_GB, ...) are left out
    for p in sorted(Path("/usr/share/locale").glob("*/LC_MESSAGES/*.mo")) + sorted(site.glob("*/locale/*/LC_MESSAGES/*.mo")):
        lang = p.parent.parent.name
        if lang.startswith("en"):
            continue
        try:
            with open(p, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
        except (OSError, UnicodeError, ValueError, LookupError):  # a corrupt or odd catalog is skipped
            continue
        msgs = [v for k, v in catalog.items() if k and isinstance(v, str) and len(v) > 20]
        if len(msgs) > 5:
            yield {"id": f"locale/{lang}/{p.name}", "text": "\n".join(msgs)[:MAX_DOC_CHARS], "source": "gettext",
                   "domain": "multilingual", "lang_hint": lang}
    cjk = stdlib / "test" / "cjkencodings"
    for p in sorted(cjk.glob("*-utf8.txt")) if cjk.is_dir() else []:
        if text := _read(p):
            yield {"id": f"cjk/{p.name}", "text": text, "source": "cjk-samples", "domain": "multilingual"}


def build_local_corpus(out_dir: str | os.PathLike, max_mb: float = 20.0, file_mb: float | None = None) -> list[Path]:
    """Write the corpus as jsonl files out_dir/<domain>-NNN.jsonl of ~file_mb MB each (default
    max_mb / 16, at least 0.25, so pipeline tasks get balanced slices) and at most ~max_mb MB of
    text in total; returns the files written. Rewrites existing files."""
    if max_mb <= 0:
        raise HerdError(f"max_mb must be positive, got {max_mb}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    file_bytes = 1e6 * (file_mb if file_mb else max(0.25, max_mb / 16))
    written: list[Path] = []
    sources = {"general": _general, "math": _math, "code": _code, "multilingual": _multilingual}
    for domain, gen in sources.items():
        budget = DOMAIN_BUDGET[domain] * max_mb * 1e6
        used, k, batch, batch_bytes = 0, 0, [], 0

        def flush() -> None:
            nonlocal k, batch_bytes
            path = out / f"{domain}-{k:03d}.jsonl"
            with atomic_open(path, "w") as f:
                f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in batch)
            written.append(path)
            batch.clear()
            batch_bytes = 0
            k += 1

        for doc in gen():
            size = len(doc["text"].encode())
            if used + size > budget:
                continue  # skip big ones, keep filling with smaller documents
            batch.append(doc)
            used += size
            batch_bytes += size
            if batch_bytes >= file_bytes:
                flush()
            if used > 0.99 * budget:
                break
        if batch:
            flush()
    if not written:
        raise HerdError("found no text on this machine to build a corpus from; pass your own --input files instead.")
    return written


if __name__ == "__main__":  # python -m herd.data.corpus OUT [MB]
    files = build_local_corpus(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 20.0)
    print(f"{len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB")
