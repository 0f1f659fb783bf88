"""DPO's reference log-probs, computed once per response before training and kept on disk beside the run.

    cache = ReferenceCache(out / "reference_logps", key=reference_key(...))
    logps = cache.compute("train", dataset, forward, layout="concat", pad_id=tok.pad_id)  # float64 [n_responses, 2]

DPO compares the policy's log-probs with a frozen reference's (Rafailov et al. 2023, eq. 7). The
reference's never change, so computing them in a pass before training (TRL's
`precompute_ref_log_probs`) means the reference model need not sit in memory, nor run a forward,
during training. Per response two sums are kept: over every response token (the completion mask,
TRL's) and over the tokens the Llama 3 mask keeps (no header / end-of-turn tokens), so either
--mask reads the same cache.

On disk: FOLDER/key.json (what the numbers were computed from) and one FOLDER/<split>_<start>.npy per
chunk of examples, each written atomically; a killed pass finds the chunks already written and
computes only the rest. The key hashes the rendered data (every array of the train and validation
sets), the reference checkpoint (reference_fingerprint) and how it was run (adapters off, precision):
a cache with another key is stale, and is discarded and recomputed, never silently reused.
Under torchrun the data-parallel ranks share out the missing chunks (one each per round, results
exchanged with all_gather_object), so N ranks take about 1/N of one process's time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from herd.errors import HerdError
from herd.fileio import atomic_open, atomic_write
from herd.parallel import barrier
from herd.posttrain.pairs import PreferenceBatch, collate_preferences, sequence_sums
from herd.posttrain.preference_data import PreferenceDataset

COLUMNS = ("completion", "llama3")
"""Columns of a cache: the sum over every response token, and over the tokens the Llama 3 mask keeps."""
_EDGE = 1 << 20  # bytes hashed at each end of a weight file


def reference_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint folder's files: each name and size, small files whole, and the first and
    last MiB of large ones (a changed weight file changes its header or its tail; reading all of an 8B
    model's 16 GB to key a cache would cost more than the cache saves)."""
    h = hashlib.sha256()
    folder = Path(path)
    files = sorted(p for p in (folder.iterdir() if folder.is_dir() else [folder]) if p.is_file())
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= 2 * _EDGE:
                h.update(f.read())
            else:
                h.update(f.read(_EDGE))
                f.seek(size - _EDGE)
                h.update(f.read(_EDGE))
    return h.hexdigest()


def reference_key(datasets: dict[str, PreferenceDataset], reference: str, **how: Any) -> str:
    """The cache key: the data's fingerprints, the reference checkpoint's, and `how` it ran (JSON values)."""
    parts = {"data": {k: d.fingerprint() for k, d in sorted(datasets.items())},
             "reference": reference_fingerprint(reference), "how": how}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def batch_sums(token_logprobs: Tensor, batch: PreferenceBatch) -> Tensor:
    """[n_responses, 2] float64: each response's log-prob summed over COLUMNS' tokens."""
    return torch.stack([sequence_sums(token_logprobs, batch, batch.keep(m)) for m in COLUMNS], 1).double()


def response_ids(dataset: PreferenceDataset, indices: list[int]) -> np.ndarray:
    """Dataset response indices of examples `indices`, in the order a batch of them holds its responses."""
    return np.concatenate([np.arange(dataset.first_response[i], dataset.first_response[i + 1]) for i in indices])


class ReferenceCache:
    """Per-response reference log-prob sums of named splits, on disk under `folder` (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, key: str, chunk: int = 64, write: bool = True) -> None:
        self.folder, self.key, self.chunk, self.write = Path(folder), key, chunk, write
        self.discarded = False

    def open(self) -> None:
        """Make the folder this key's: a cache of another key (other data or reference) is removed."""
        meta = self.folder / "key.json"
        if meta.exists():
            try:
                old = json.loads(meta.read_text()).get("key")
            except (OSError, ValueError):
                old = None
            if old == self.key:
                return
            if self.write:
                shutil.rmtree(self.folder)
            self.discarded = True
        if self.write:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(meta, json.dumps({"key": self.key, "columns": list(COLUMNS), "chunk": self.chunk}) + "\n")

    def _part(self, split: str, start: int) -> Path:
        return self.folder / f"{split}_{start:09d}.npy"

    def missing(self, split: str, dataset: PreferenceDataset) -> int:
        """Chunks of `split` not on disk yet."""
        return sum(not self._part(split, s).exists() for s in range(0, len(dataset), self.chunk))

    def compute(self, split: str, dataset: PreferenceDataset, forward: Callable[[PreferenceBatch], Tensor] | None,
                layout: str = "concat", pad_id: int = 0, batch_size: int = 8, progress: bool = True,
                dp_rank: int = 0, dp_size: int = 1, dp_group: Any = None) -> np.ndarray:
        """[n_responses, 2] float64 sums of `split`: chunks on disk are read, the others computed with
        `forward` (a batch -> token log-probs [N], called under no_grad) and written one chunk at a time.

        Under data parallelism (dp_size > 1, every rank calling with its dp_rank and the dp process
        group) the missing chunks are shared out: in each round every data-parallel rank computes a
        different chunk, the results are exchanged (all_gather_object), and every rank ends with all of
        them. Every rank runs the same number of forwards (FSDP gathers weights in each): a rank with a
        shorter chunk, or none in the last round, repeats a batch and drops the result."""
        out = np.zeros((dataset.n_responses, len(COLUMNS)), dtype=np.float64)
        starts = range(0, len(dataset), self.chunk)
        # decided once, before any rank writes: every rank then runs the same forwards (FSDP's collectives)
        todo = [s for s in starts if not self._part(split, s).exists()]
        barrier()
        bar = tqdm(total=len(todo), desc=f"reference log-probs ({split})", unit=" chunks",
                   disable=not progress or not todo, mininterval=1.0)

        def chunk(start: int) -> list[int]:
            return list(range(start, min(start + self.chunk, len(dataset))))

        computed: dict[int, np.ndarray] = {}
        for first in range(0, len(todo), dp_size):
            group = todo[first:first + dp_size]  # this round's chunks, one per data-parallel rank
            mine = chunk(group[dp_rank]) if dp_rank < len(group) else []
            n_batches = max(-(-len(chunk(s)) // batch_size) for s in group)
            rows = []
            with torch.no_grad():
                for b in range(n_batches):
                    indices = mine[b * batch_size:(b + 1) * batch_size]
                    batch = collate_preferences(dataset, indices or chunk(group[0])[:batch_size], layout, pad_id)
                    sums = batch_sums(forward(batch), batch).cpu()
                    if indices:  # else a repeat that keeps the ranks in step
                        rows.append(sums)
            part = torch.cat(rows).numpy() if rows else None
            parts = [part]
            if dp_size > 1:
                parts = [None] * dp_size
                torch.distributed.all_gather_object(parts, part, group=dp_group)
            for start, got in zip(group, parts):
                computed[start] = got
                if self.write:
                    with atomic_open(self._part(split, start), "wb") as f:
                        np.save(f, got)
            bar.update(len(group))
        bar.close()
        for start in starts:
            ids = response_ids(dataset, chunk(start))
            path = self._part(split, start)
            part = computed[start] if start in computed else np.load(path)
            if part.shape != (len(ids), len(COLUMNS)):
                raise HerdError(f"{path} holds {part.shape} values, expected {(len(ids), len(COLUMNS))}; delete "
                                f"{self.folder} to compute the reference log-probs again.")
            out[ids] = part
        return out
