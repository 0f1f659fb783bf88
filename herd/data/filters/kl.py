"""Token-distribution KL divergence of each document against the corpus, and the filter on it.

Llama 3 drops documents whose token distribution is an outlier against the corpus ("The Llama 3
Herd of Models", section 3.1.1: "token-distribution Kullback-Leibler divergence"). herd computes, in nats,

    KL(doc || corpus) = sum over tokens t in the doc of p(t) * ln(p(t) / q(t))

where p(t) = count of t in the doc / tokens in the doc, and q is the corpus distribution fitted
on a sample: the `vocab_size` most frequent tokens keep their own probability, every other
token shares one out-of-vocabulary bucket, and add-`alpha` smoothing keeps q > 0:

    q(t) = (C(t) + alpha) / (C_total + alpha * (vocab_size + 1)),   C(oov) = mass of rare tokens

Tokenization: "word" (default) = lowercase Unicode word runs (`\\w+`), which needs no trained
tokenizer and is what herd's tests and benches use; or the ids of herd's BPE tokenizer when
`tokenizer_path` is set (`herd.tokenizer.Tokenizer.from_file(path).encode(text)`).

Fitting (`fit_token_distribution`) is a first pass over a sample of the corpus; it also scores
the sample itself and stores 1001 quantiles of its KL values, so a percentile threshold
("drop the top 1%") becomes a fixed KL value that every worker applies identically (a
streaming percentile would depend on document order and break resumability). The file is small
JSON, written atomically.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from datatrove.data import Document
from datatrove.pipeline.writers.disk_base import DiskWriter

from herd.data.filters.base import HerdFilter
from herd.errors import HerdError
from herd.fileio import atomic_open

_WORD = re.compile(r"\w+")
FORMAT = "herd-token-distribution-v1"


@dataclass
class KLConfig:
    """Token-distribution KL filter."""

    distribution: str = ""
    """Path of the corpus distribution JSON written by fit_token_distribution (`herd data fit-kl`, registered from herd.data.classifier_cli)."""
    max_kl: float | None = None
    """Drop documents with KL above this many nats; overrides max_percentile when set."""
    max_percentile: float = 99.0
    """Drop documents whose KL is above this percentile of the fitted sample's KL values."""
    min_tokens: int = 20
    """Documents with fewer tokens are kept without judging: their KL is dominated by sampling noise."""


class Tokenize:
    """Text -> list of hashable tokens: lowercase words, or herd tokenizer ids when a path is given."""

    def __init__(self, tokenizer_path: str = ""):
        self.tokenizer_path = tokenizer_path
        self._tok = None

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path, "_tok": None}

    def __call__(self, text: str) -> list:
        if not self.tokenizer_path:
            return _WORD.findall(text.lower())
        if self._tok is None:
            from herd.tokenizer import Tokenizer

            self._tok = Tokenizer.from_file(self.tokenizer_path)
        return [str(i) for i in self._tok.encode(text)]


class TokenDistribution:
    """A fitted corpus distribution q: log-probabilities of frequent tokens plus an OOV bucket."""

    def __init__(self, counts: dict[str, int], oov_count: int, alpha: float = 1.0, tokenizer_path: str = "",
                 kl_quantiles: list[float] | None = None):
        self.counts, self.oov_count, self.alpha = counts, oov_count, alpha
        self.tokenizer_path = tokenizer_path
        self.kl_quantiles = kl_quantiles or []
        denom = sum(counts.values()) + oov_count + alpha * (len(counts) + 1)
        self.log_q = {t: math.log((c + alpha) / denom) for t, c in counts.items()}
        self.log_q_oov = math.log((oov_count + alpha) / denom)
        self.tokenize = Tokenize(tokenizer_path)

    def kl_of_tokens(self, tokens: list) -> float:
        """KL(p || q) in nats for the empirical distribution p of `tokens` (0.0 for no tokens)."""
        n = len(tokens)
        if n == 0:
            return 0.0
        log_q, oov = self.log_q, self.log_q_oov
        log_n = math.log(n)
        # sum_t p ln p - sum_t p ln q, with p = c/n: (1/n) * sum_t c * (ln c - ln n - ln q(t))
        total = 0.0
        for t, c in Counter(tokens).items():
            total += c * (math.log(c) - log_n - log_q.get(t, oov))
        return max(0.0, total / n)

    def kl(self, text: str) -> float:
        """KL(doc || corpus) of a text, in nats."""
        return self.kl_of_tokens(self.tokenize(text))

    def percentile_threshold(self, percentile: float) -> float:
        """The KL value at `percentile` (0..100) of the fitted sample."""
        if not self.kl_quantiles:
            raise HerdError("this token distribution has no fitted KL quantiles; refit it or pass max_kl.")
        pos = percentile / 100 * (len(self.kl_quantiles) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(self.kl_quantiles) - 1)
        return self.kl_quantiles[lo] + (pos - lo) * (self.kl_quantiles[hi] - self.kl_quantiles[lo])

    def save(self, path: str | Path) -> None:
        """Write JSON atomically."""
        data = dict(format=FORMAT, tokenizer_path=self.tokenizer_path, alpha=self.alpha, oov_count=self.oov_count,
                    kl_quantiles=self.kl_quantiles, counts=self.counts)
        with atomic_open(path, "w") as f:
            json.dump(data, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | Path) -> "TokenDistribution":
        try:
            with open(path, encoding="utf-8") as f:
                data: dict[str, Any] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise HerdError(f"cannot read the token distribution {path} ({e}); fit one with "
                            "fit_token_distribution or `herd data fit-kl`.") from e
        if data.get("format") != FORMAT:
            raise HerdError(f"{path} is not a herd token distribution (format {data.get('format')!r}); refit it.")
        return cls(data["counts"], data["oov_count"], data["alpha"], data["tokenizer_path"], data["kl_quantiles"])


def fit_token_distribution(texts: Iterable[str], vocab_size: int = 50000, alpha: float = 1.0,
                           tokenizer_path: str = "") -> TokenDistribution:
    """Count tokens over a sample of texts, keep the `vocab_size` most frequent, store KL quantiles of the sample."""
    tokenize = Tokenize(tokenizer_path)
    docs = [tokenize(t) for t in texts]
    docs = [d for d in docs if d]
    if not docs:
        raise HerdError("no tokens in the sample given to fit the token distribution; pass non-empty documents.")
    total: Counter = Counter()
    for d in docs:
        total.update(d)
    kept = dict(total.most_common(vocab_size))
    oov = sum(total.values()) - sum(kept.values())
    dist = TokenDistribution({str(k): v for k, v in kept.items()}, oov, alpha, tokenizer_path)
    kls = sorted(dist.kl_of_tokens(d) for d in docs)
    dist.kl_quantiles = [kls[round(i / 1000 * (len(kls) - 1))] for i in range(1001)]
    return dist


class KLFilter(HerdFilter):
    """Annotates metadata["kl_divergence"] (nats); drops (reason "kl_divergence") past max_kl or max_percentile."""

    name = "📐 herd token KL"

    def __init__(self, config: KLConfig, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        if not config.distribution:
            raise HerdError("the KL filter needs a fitted token distribution; pass its path as `distribution`.")
        self.config = config
        self.dist = TokenDistribution.load(config.distribution)
        self.threshold = (config.max_kl if config.max_kl is not None
                          else self.dist.percentile_threshold(config.max_percentile))

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        tokens = self.dist.tokenize(doc.text)
        kl = self.dist.kl_of_tokens(tokens)
        doc.metadata["kl_divergence"] = round(kl, 4)
        if len(tokens) >= self.config.min_tokens and kl > self.threshold:
            return False, "kl_divergence"
        return True
