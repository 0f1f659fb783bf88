"""herd.safety: Llama Guard moderation and Meta's Code Shield, for the CLI, the server and evaluation.

- categories.py   Category, the Llama Guard 2 / 3 taxonomies, exclusions, custom category files
- prompt.py       GuardFormat: the Llama Guard 2 and 3 prompts byte for byte, the trained answer, SFT records
- verdict.py      parse_guard_output (safe / unsafe + codes / unparseable), GuardResult and its threshold
- classifier.py   GuardClassifier: any checkpoint as a guard through the Engine, with the unsafe score
- metrics.py      precision / recall / F1 unsafe-vs-safe and per category, average precision
- records.py      guard data records (conversations, roles, labels)
- synthetic.py    a synthetic labelled set for training and testing a toy guard offline
- guard_cli.py    `herd guard`
- codeshield.py   Code Shield (Meta's `codeshield` package, the `herd[safety]` extra): scan code and the
                  code blocks of replies; codeshield_cli.py `herd codeshield`
- moderation.py   `herd serve --guard / --code-shield`: prompt and reply checks, refusals, metrics

Names are imported lazily, so `import herd.safety` stays cheap (no torch, no semgrep).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Category": "herd.safety.categories",
    "LLAMA_GUARD_2_CATEGORIES": "herd.safety.categories",
    "LLAMA_GUARD_3_CATEGORIES": "herd.safety.categories",
    "default_categories": "herd.safety.categories",
    "exclude_categories": "herd.safety.categories",
    "custom_categories": "herd.safety.categories",
    "load_categories": "herd.safety.categories",
    "GuardFormat": "herd.safety.prompt",
    "guard_turns": "herd.safety.prompt",
    "parse_guard_output": "herd.safety.verdict",
    "ParsedReply": "herd.safety.verdict",
    "GuardResult": "herd.safety.verdict",
    "GuardClassifier": "herd.safety.classifier",
    "unsafe_token_ids": "herd.safety.classifier",
    "guard_metrics": "herd.safety.metrics",
    "GuardMetrics": "herd.safety.metrics",
    "average_precision": "herd.safety.metrics",
    "GuardRecord": "herd.safety.records",
    "to_guard_record": "herd.safety.records",
    "synthetic_guard_records": "herd.safety.synthetic",
    "CodeShieldScanner": "herd.safety.codeshield",
    "CodeFinding": "herd.safety.codeshield",
    "ScanResult": "herd.safety.codeshield",
    "code_blocks": "herd.safety.codeshield",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'herd.safety' has no attribute {name!r}")
