"""herd.posttrain: post-training on chat data (SFT now; reward models, rejection sampling and DPO next).

- records.py  reading chat records: jsonl (.gz / .zst), JSON arrays, parquet, files or folders
- render.py   one record (TRL's conversational or prompt/completion format) -> ids + loss mask
- dataset.py  SFTDataConfig, build_sft_data: render, length handling, validation split -> SFTDataset
- report.py   DataReport: what was read, kept, truncated, dropped and why
- packing.py  best-fit packing into rows with document ids, SFTBatch, SFTBatchLoader, eval_batches
- lora.py     LoRAConfig, LoRALinear (peft's update rule), apply / merge / unmerge, frozen bf16 base
- adapter.py  adapters on disk in peft's layout (adapter_config.json + adapter_model.safetensors)
- cli.py      `herd merge-lora`

Names are imported lazily, so `import herd.posttrain` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataReport": "herd.posttrain.report",
    "data_files": "herd.posttrain.records",
    "iter_records": "herd.posttrain.records",
    "Conversation": "herd.posttrain.render",
    "RecordError": "herd.posttrain.render",
    "to_conversation": "herd.posttrain.render",
    "render": "herd.posttrain.render",
    "SFTDataConfig": "herd.posttrain.dataset",
    "SFTDataset": "herd.posttrain.dataset",
    "SFTData": "herd.posttrain.dataset",
    "build_sft_data": "herd.posttrain.dataset",
    "load_tokenizer_for": "herd.posttrain.dataset",
    "pack_bins": "herd.posttrain.packing",
    "SFTRows": "herd.posttrain.packing",
    "SFTBatch": "herd.posttrain.packing",
    "SFTBatchLoader": "herd.posttrain.packing",
    "collate": "herd.posttrain.packing",
    "eval_batches": "herd.posttrain.packing",
    "IGNORE_INDEX": "herd.posttrain.packing",
    "LoRAConfig": "herd.posttrain.lora",
    "LoRALinear": "herd.posttrain.lora",
    "apply_lora": "herd.posttrain.lora",
    "merge_lora": "herd.posttrain.lora",
    "unmerge_lora": "herd.posttrain.lora",
    "lora_modules": "herd.posttrain.lora",
    "lora_state_dict": "herd.posttrain.lora",
    "load_lora_state_dict": "herd.posttrain.lora",
    "mark_only_lora_trainable": "herd.posttrain.lora",
    "parameter_bytes": "herd.posttrain.lora",
    "save_adapter": "herd.posttrain.adapter",
    "read_adapter": "herd.posttrain.adapter",
    "load_adapter": "herd.posttrain.adapter",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'herd.posttrain' has no attribute {name!r}")
