"""herd.data: the pre-training data pipeline (readers, filters, classifiers, dedup, packing, reports).

Every step is a datatrove PipelineStep on datatrove Documents, so a pipeline runs on datatrove's
local, Slurm or Ray executors unchanged. Names are imported lazily: `import herd.data` stays
cheap and an optional dependency matters only to the step that needs it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # readers
    "JsonlReader": "herd.data.readers",
    "ParquetReader": "herd.data.readers",
    "TextFolderReader": "herd.data.readers",
    "make_reader": "herd.data.readers",
    "iter_documents": "herd.data.readers",
    # filters and annotators
    "HerdFilter": "herd.data.filters.base",
    "LanguageConfig": "herd.data.filters.language",
    "LanguageFilter": "herd.data.filters.language",
    "RepetitionConfig": "herd.data.filters.repetition",
    "RepetitionFilter": "herd.data.filters.repetition",
    "repetition_stats": "herd.data.filters.repetition",
    "DirtyWordsConfig": "herd.data.filters.dirty_words",
    "DirtyWordsFilter": "herd.data.filters.dirty_words",
    "KLConfig": "herd.data.filters.kl",
    "KLFilter": "herd.data.filters.kl",
    "TokenDistribution": "herd.data.filters.kl",
    "fit_token_distribution": "herd.data.filters.kl",
    "ClassifierTrainConfig": "herd.data.filters.quality",
    "train_classifier": "herd.data.filters.quality",
    "FastTextClassifier": "herd.data.filters.quality",
    "QualityScorer": "herd.data.filters.quality",
    "QualityFilter": "herd.data.filters.quality",
    "DomainClassifier": "herd.data.filters.quality",
    # reports
    "write_report": "herd.data.report",
    # dedup, mix, pack, shards, pipeline (part B)
    "ShardWriter": "herd.data.shards",
    "ShardDataset": "herd.data.shards",
    "check_tokenizer": "herd.data.shards",
    "read_manifest": "herd.data.shards",
    "tokenizer_info": "herd.data.shards",
    "find_tokenizer": "herd.data.shards",
    "plan_mix": "herd.data.mix",
    "AssignDomain": "herd.data.mix",
    "pack_documents": "herd.data.pack",
    "DataConfig": "herd.data.pipeline",
    "run_pipeline": "herd.data.pipeline",
    "build_local_corpus": "herd.data.corpus",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'herd.data' has no attribute {name!r}")
