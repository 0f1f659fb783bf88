"""Evaluation: benchmark scores that agree with lm-evaluation-harness, pairwise comparison, scaling laws.

- data.py            local benchmark files (jsonl / parquet / arrow / save_to_disk / oe-eval requests), splits
- tasks/             the task registry and the built-in tasks (multiple choice, generation, likelihood)
- scorer.py          batched log-likelihoods, each shared prefix and context computed once (KV cache reuse)
- generate.py        greedy generation until stop strings, on the inference Engine
- metrics.py         acc / acc_norm, stderr, Wilson intervals, answer extraction, DROP F1
- runner.py          evaluate(): tasks -> items -> scores -> results (resumable per task)
- report.py          group averages, results.json, the summary table
- loading.py         checkpoint + tokenizer for evaluation, fingerprints
- cli.py             `herd eval`, `herd compare`
- lm_eval_adapter.py HerdLM, herd as an lm-eval model (`herd-lm-eval`, lm_eval_cli.py)
- judge.py, compare.py  judges (LLM, reward model) and the pairwise comparison
- scaling/           shapes, the IsoFLOP sweep, fits and plots (`herd scaling`)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvalConfig": "herd.eval.runner",
    "evaluate": "herd.eval.runner",
    "loglikelihoods": "herd.eval.scorer",
    "register_task": "herd.eval.tasks",
    "build_tasks": "herd.eval.tasks",
    "load_model_and_tokenizer": "herd.eval.loading",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'herd.eval' has no attribute {name!r}")
