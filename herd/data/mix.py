"""Domains and the data mix: label each document with a domain, then sample domains to target
token shares (Llama 3: ~50% general knowledge, 25% math and reasoning, 17% code, 8% multilingual).

Domain of a document, first rule that applies:
1. metadata["domain"] when it is already one of the known domains (e.g. set by a domain
   classifier or by the corpus builder);
2. a source rule "substring=domain" matching metadata["source"] (e.g. "github=code");
3. a source-code file extension in the document id (.py, .c, .rs, ...) -> code;
4. a language other than English (metadata["language"] from language id) -> multilingual;
5. general.

Sampling (`plan_mix`) is by tokens and deterministic given the seed: each domain's documents are
shuffled and repeated whole (upsampling); the last partial pass (or the only one, downsampling)
fills the remaining target greedily, skipping documents that would overshoot it, so a few big
documents (whole source files) do not blow a small domain's share. The chosen documents are
shuffled together. The total is the largest one no domain needs more than
`max_repeat` passes for, so achieved shares match the targets up to document granularity.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from herd.errors import HerdError

DOMAINS = ("general", "math", "code", "multilingual")
DEFAULT_WEIGHTS = "general=0.50,math=0.25,code=0.17,multilingual=0.08"
CODE_EXTENSIONS = (".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".sh",
                   ".rb", ".pl", ".lua", ".sql", ".cs", ".kt", ".swift", ".scala", ".m", ".r", ".jl")


def parse_weights(text: str) -> dict[str, float]:
    """"general=0.5,code=0.17,..." -> {domain: weight} normalized to sum 1."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or weights.get(name.strip(), -1) < 0:
            raise HerdError(f"bad mix weight {part!r}; write domain=weight pairs like {DEFAULT_WEIGHTS!r}.")
    total = sum(weights.values())
    if total <= 0:
        raise HerdError(f"mix weights {text!r} sum to zero; give at least one domain a positive weight.")
    return {k: v / total for k, v in weights.items()}


def parse_rules(text: str) -> list[tuple[str, str]]:
    """"github=code,arxiv=math" -> [(substring, domain)], checked in order."""
    rules = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        sub, sep, dom = part.partition("=")
        if not sep or not sub.strip() or not dom.strip():
            raise HerdError(f"bad domain rule {part!r}; write source-substring=domain pairs like 'github=code,arxiv=math'.")
        rules.append((sub.strip().lower(), dom.strip()))
    return rules


def assign_domain(doc_id: str, metadata: dict[str, Any], rules: list[tuple[str, str]],
                  english: tuple[str, ...] = ("en",)) -> str:
    """The domain of one document by the rules in the module docstring."""
    domain = metadata.get("domain")
    if domain in DOMAINS:
        return domain
    source = str(metadata.get("source", "")).lower()
    for sub, dom in rules:
        if sub in source:
            return dom
    if str(doc_id).lower().endswith(CODE_EXTENSIONS):
        return "code"
    lang = metadata.get("language")
    if lang and lang not in english:
        return "multilingual"
    return "general"


class AssignDomain(PipelineStep):
    """Writes metadata["domain"]; run it after the reader and again after language id (rule 4)."""

    name = "🏷 assign domain"
    type = "🔢 - ANNOTATOR"

    def __init__(self, rules: str = "", english: tuple[str, ...] = ("en",)) -> None:
        super().__init__()
        self.rules, self.english = parse_rules(rules), tuple(english)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data or ():
            domain = doc.metadata.get("domain")
            if domain == "general" and doc.metadata.get("language") not in (None, *self.english):
                domain = "multilingual"
            elif domain not in DOMAINS:
                domain = assign_domain(doc.id, doc.metadata, self.rules, self.english)
            doc.metadata["domain"] = domain
            self.stat_update(f"domain_{domain}")
            yield doc


class Bypass(PipelineStep):
    """Runs `step` on every document except those of `domains`, which pass through untouched, in order.

    Source code fails prose heuristics (language id, Gopher repetition) by design; Llama 3 ran code
    through its own pipeline, so herd lets code documents skip those filters.
    """

    type = "🔀 - ROUTER"

    def __init__(self, step: PipelineStep, domains: tuple[str, ...] = ("code",)) -> None:
        super().__init__()
        self.step, self.domains = step, tuple(domains)
        self.name = f"{getattr(step, 'name', step)} (except {', '.join(self.domains)})"
        self.stats = step.stats  # the inner step's counts are what the report needs

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        stash: list = []

        def routed():
            for doc in data or ():
                if doc.metadata.get("domain") in self.domains:
                    stash.append(doc)
                else:
                    yield doc

        # every stashed document arrived before the next one the inner step yields: flush it first
        for doc in self.step.run(routed(), rank, world_size):
            yield from stash
            stash.clear()
            yield doc
        yield from stash


def plan_mix(lengths: np.ndarray, domains: list[str] | np.ndarray, weights: dict[str, float], seed: int = 0,
             max_repeat: float = 4.0) -> tuple[np.ndarray, dict[str, Any]]:
    """Choose documents (with repeats) so token shares per domain match `weights`.

    Returns (order: int64 [k] indices into `lengths`, in training order; report per domain with
    available/target/achieved tokens, achieved share and repeat factor).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    domains = np.asarray(domains, dtype=str)
    available = {d: int(lengths[domains == d].sum()) for d in np.unique(domains)} if lengths.size else {}
    present = {d: w for d, w in weights.items() if w > 0 and available.get(d, 0) > 0}
    report: dict[str, Any] = {"weights": dict(weights), "max_repeat": max_repeat, "seed": seed, "domains": {}}
    if not present:
        return np.zeros(0, dtype=np.int64), report
    norm = sum(present.values())
    present = {d: w / norm for d, w in present.items()}  # missing domains: renormalize the rest
    total = min(sum(available[d] for d in present), min(available[d] * max_repeat / w for d, w in present.items()))
    chosen = []
    for d in sorted(available):
        idx = np.flatnonzero(domains == d)
        w = present.get(d, 0.0)
        target = w * total
        rng = np.random.default_rng([seed, zlib.crc32(d.encode())])
        picks, got = [], 0
        total_d = int(lengths[idx].sum())
        while target - got >= total_d:  # whole passes over the shuffled domain
            picks.append(idx[rng.permutation(idx.size)])
            got += total_d
        if target - got > 0:  # the last, partial pass: fill greedily, skipping documents that overshoot
            perm = idx[rng.permutation(idx.size)]
            taken = np.zeros(perm.size, dtype=bool)
            for j, k in enumerate(perm):
                if got + lengths[k] <= target:
                    taken[j] = True
                    got += int(lengths[k])
            rest = np.flatnonzero(~taken)
            if rest.size:  # one more document if it lands closer to the target than stopping short
                j = rest[np.argmin(lengths[perm[rest]])]
                if got + lengths[perm[j]] - target < target - got:
                    taken[j] = True
                    got += int(lengths[perm[j]])
            picks.append(perm[taken])
        chosen.extend(picks)
        report["domains"][d] = {"available_tokens": available[d], "target_share": round(w, 4),
                                "target_tokens": int(target), "tokens": got, "repeat": round(got / available[d], 3)}
    order = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    order = order[np.random.default_rng(seed).permutation(order.size)]
    all_tokens = sum(v["tokens"] for v in report["domains"].values())
    for v in report["domains"].values():
        v["share"] = round(v["tokens"] / all_tokens, 4) if all_tokens else 0.0
    report["tokens"] = all_tokens
    return order.astype(np.int64), report
