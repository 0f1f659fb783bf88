"""Throughput of herd's document filters vs datatrove's built-in Gopher / FineWeb filters.

Documents per second on one core (one process, `filter()` called on every document, best of
--repeats runs after a warm-up), all filters on the same documents in the same run. The
documents are built offline from this machine: Python standard-library modules (code), their
docstrings joined per module (prose), installed packages' descriptions (PyPI METADATA, mostly
markdown), license texts and .rst/.md documentation files.

Ratios printed:
  repetition:  herd RepetitionFilter vs datatrove GopherRepetitionFilter (the same Gopher
               statistics; datatrove splits words with spacy, herd with str.split)
  heuristics:  herd's heuristic chain (repetition + dirty words + token KL) vs datatrove's
               GopherRepetition + GopherQuality + FineWebQuality, each chain's docs/s
               (1 / sum of per-filter seconds per document)
It also prints how often the two repetition filters agree, and the held-out accuracy of a
fastText domain classifier (code vs prose) and quality classifier (prose vs shuffled words).

    python bench/data.py [--docs 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import random
import sysconfig
import tempfile
import time
from pathlib import Path

from datatrove.data import Document


def build_documents(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, text) documents from files on this machine; kinds: code, prose, metadata, license, docs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    docs: list[tuple[str, str]] = []
    for path in sorted(stdlib.glob("*.py")):
        src = path.read_text(encoding="utf-8", errors="replace")
        docs.append(("code", src[:20000]))
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        strings = [ast.get_docstring(node) for node in ast.walk(tree)
                   if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))]
        prose = "\n\n".join(s for s in strings if s and len(s) > 80)
        if len(prose) > 300:
            docs.append(("prose", prose[:20000]))
    for path in sorted(glob.glob(str(purelib / "*.dist-info" / "METADATA"))):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        body = text.split("\n\n", 1)[-1]
        if len(body) > 300:
            docs.append(("metadata", body[:20000]))
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path):
            docs.append(("license", Path(path).read_text(encoding="utf-8", errors="replace")[:20000]))
    for pattern in ("/usr/share/doc/**/*.md", str(purelib / "**" / "*.rst"), str(purelib / "**" / "*.md")):
        for path in sorted(glob.glob(pattern, recursive=True))[:400]:
            try:
                text = Path(path).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if len(text) > 300:
                docs.append(("docs", text[:20000]))
    random.Random(seed).shuffle(docs)
    return docs[:n]


def docs_per_second(flt, docs: list[Document], repeats: int) -> tuple[float, list]:
    """Best-of-`repeats` documents per second of flt.filter over docs, and its results."""
    for d in docs[:20]:  # warm-up: lazy model loads (spacy, fastText)
        flt.filter(d)
    best, results = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = [flt.filter(d) for d in docs]
        best = min(best, time.perf_counter() - t0)
    return len(docs) / best, results


def classifier_accuracy(texts: list[tuple[str, str]]) -> dict[str, float]:
    from herd.data.filters.quality import ClassifierTrainConfig, train_classifier

    code = []
    for k, t in texts:
        if k == "code":  # 40-line chunks of module source
            lines = t.splitlines()
            code += ["\n".join(lines[i:i + 40]) for i in range(0, len(lines), 40)]
    code = [c for c in code if len(c) > 200]
    prose = [p for k, t in texts if k in ("prose", "docs", "metadata") for p in t.split("\n\n") if len(p) > 200]
    rng = random.Random(0)
    n = min(len(code), len(prose), 1000)
    code, prose = rng.sample(code, n), rng.sample(prose, n)
    words = [w for t in prose for w in t.split()]
    salad = [" ".join(rng.choice(words) for _ in range(len(t.split()))) for t in prose]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ClassifierTrainConfig(valid_fraction=0.2, epoch=25, lr=1.0)
        m = train_classifier([(t, "code") for t in code] + [(t, "prose") for t in prose], f"{tmp}/d.bin", cfg)
        out[f"domain code-vs-prose ({m['n_train']} train / {m['n_valid']} held out)"] = m["accuracy"]
        m = train_classifier([(t, "hq") for t in prose] + [(t, "lq") for t in salad], f"{tmp}/q.bin", cfg)
        out[f"quality prose-vs-shuffled ({m['n_train']} train / {m['n_valid']} held out)"] = m["accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=400, help="documents to filter")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per filter (best is kept)")
    parser.add_argument("--no-classifier", action="store_true", help="skip the classifier accuracy runs")
    args = parser.parse_args()

    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    from herd.data.filters.dirty_words import DirtyWordsFilter
    from herd.data.filters.kl import KLConfig, KLFilter, fit_token_distribution
    from herd.data.filters.language import LanguageFilter
    from herd.data.filters.repetition import RepetitionFilter

    texts = build_documents(args.docs)
    docs = [Document(text=t, id=str(i)) for i, (_, t) in enumerate(texts)]
    chars = sum(len(d.text) for d in docs)
    kinds = {k: sum(1 for kk, _ in texts if kk == k) for k in sorted({k for k, _ in texts})}
    print(f"{len(docs)} documents, {chars / len(docs):.0f} chars on average; kinds: {kinds}")
    with tempfile.TemporaryDirectory() as tmp:
        fit_token_distribution([d.text for d in docs]).save(f"{tmp}/kl.json")
        kl = KLFilter(KLConfig(distribution=f"{tmp}/kl.json"))

    herd_filters = {"herd RepetitionFilter": RepetitionFilter(), "herd DirtyWordsFilter": DirtyWordsFilter(),
                    "herd KLFilter": kl}
    dt_filters = {"datatrove GopherRepetitionFilter": GopherRepetitionFilter(),
                  "datatrove GopherQualityFilter": GopherQualityFilter(),
                  "datatrove FineWebQualityFilter": FineWebQualityFilter()}
    extra = {"herd LanguageFilter (fastText lid.176)": LanguageFilter()}
    rates, results = {}, {}
    for name, flt in {**herd_filters, **dt_filters, **extra}.items():
        rates[name], results[name] = docs_per_second(flt, docs, args.repeats)
        kept = sum(r is True for r in results[name])
        print(f"  {name:<42} {rates[name]:>10,.0f} docs/s/core   kept {kept}/{len(docs)}")

    def chain(names: list[str]) -> float:
        return 1.0 / sum(1.0 / rates[n] for n in names)

    rep = rates["herd RepetitionFilter"] / rates["datatrove GopherRepetitionFilter"]
    agree = sum((a is True) == (b is True) for a, b in
                zip(results["herd RepetitionFilter"], results["datatrove GopherRepetitionFilter"])) / len(docs)
    herd_chain, dt_chain = chain(list(herd_filters)), chain(list(dt_filters))
    print(f"repetition ratio (herd / datatrove Gopher repetition): {rep:.2f}x; same keep/drop decision on {agree:.1%}")
    print(f"heuristic chain: herd {herd_chain:,.0f} docs/s/core vs datatrove {dt_chain:,.0f} docs/s/core "
          f"-> ratio {herd_chain / dt_chain:.2f}x")
    if not args.no_classifier:
        for name, acc in classifier_accuracy(texts).items():
            print(f"held-out accuracy, {name}: {acc:.3f}")


if __name__ == "__main__":
    main()
