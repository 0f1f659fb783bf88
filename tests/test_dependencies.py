"""A fresh `pip install -e .` gives a working herd: every package herd imports is a declared
dependency (datatrove's JSONL writer needed orjson, which only datatrove's `io` extra brings, and
nothing declared it), and every declared runtime dependency is used (no fastapi before a server)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
# declared but reached through another package rather than imported by name
INDIRECT = {"tensorboard": "torch.utils.tensorboard writes the event files with it",
            "orjson": "datatrove's JSONL reader and writer import it when they run"}
# imported only by an optional part of herd, declared in that part's extra (module -> extra)
OPTIONAL = {"lm_eval": "lm-eval",  # herd.eval.lm_eval_adapter / herd-lm-eval: pip install "herd[lm-eval]"
            "codeshield": "safety"}  # herd.safety.codeshield: pip install "herd[safety]"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0)) for req in project["dependencies"]}


def _imports() -> dict[str, list[str]]:
    """Top-level modules imported anywhere in herd/ (absolute imports) -> files importing them."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "herd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("herd", "__future__"):
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def _extra(name: str) -> set[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    return {_norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0)) for req in extras.get(name, [])}


def test_every_imported_package_is_declared():
    declared, dists = _declared(), md.packages_distributions()
    missing = {}
    for module, files in _imports().items():
        names = {_norm(d) for d in dists.get(module, [module])}
        if module in OPTIONAL:
            assert names & _extra(OPTIONAL[module]), f"{module} must be declared in the {OPTIONAL[module]} extra"
            continue
        if not names & declared:
            missing[module] = sorted(set(files))[:3]
    assert not missing, f"imported but not in pyproject's dependencies: {missing}"


def test_datatrove_steps_have_their_optional_dependencies_declared():
    """datatrove names the extra packages a step needs in `_requires_dependencies` and imports them
    only when the step runs; each one a herd pipeline uses must be declared by herd itself."""
    from datatrove.pipeline.writers import JsonlWriter

    from herd.data.readers import JsonlReader, ParquetReader, TextFolderReader

    declared = _declared()
    for cls in (JsonlWriter, JsonlReader, ParquetReader, TextFolderReader):
        for dep in getattr(cls, "_requires_dependencies", None) or []:
            pip_name = dep[1] if isinstance(dep, tuple) else dep
            assert _norm(pip_name) in declared, f"{cls.__name__} needs {pip_name}, which pyproject does not declare"


def test_every_declared_dependency_is_used():
    dists = md.packages_distributions()
    used = {_norm(d) for module in _imports() for d in dists.get(module, [module])}
    unused = sorted(_declared() - used - set(INDIRECT))
    assert not unused, f"declared in pyproject but imported nowhere in herd/ (move to an extra or drop): {unused}"
