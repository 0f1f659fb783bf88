"""Batches for pre-training: a deterministic, resumable, data-parallel view of a ShardDataset.

Order: the windows of one pass (epoch) are shuffled by a permutation seeded with
(seed, seq_len, epoch), so the same seed and data give the same batches on any number of ranks.
Each optimizer step takes the next `batch_size` windows of that stream (the global batch); data
parallel rank r reads the r-th contiguous slice of it, and tensor-parallel ranks (same dp
coordinate) read the same slice. The position is two integers per sequence length
(epoch, cursor), saved in every checkpoint, so a resumed run reads exactly the batches the
uninterrupted run would have read. A new sequence-length stage reads its own permutation of the
windows cut at that length; returning to an earlier length continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from herd.errors import HerdError


@dataclass
class Batch:
    """This rank's share of one global batch."""

    inputs: Tensor
    """int64 [local_batch, seq_len]."""
    targets: Tensor
    """int64 [local_batch, seq_len]: inputs shifted by one."""
    document_ids: Tensor
    """int64 [local_batch, seq_len]: packed document index of each input token, per row."""
    indices: list[int]
    """Window indices of the whole global batch (to name a bad batch in an error)."""

    def micro_batches(self, size: int) -> list["Batch"]:
        """Split into micro-batches of `size` rows (gradient accumulation)."""
        n = self.inputs.shape[0]
        return [Batch(self.inputs[i:i + size], self.targets[i:i + size], self.document_ids[i:i + size],
                      self.indices) for i in range(0, n, size)]


def local_batch_size(batch_size: int, dp_size: int) -> int:
    """Sequences per data-parallel rank; the global batch must split evenly."""
    if batch_size % dp_size:
        raise HerdError(f"global batch of {batch_size} sequences does not split over {dp_size} data-parallel "
                        f"ranks; use a --batch-size (and --batch-ramp values) divisible by {dp_size}.")
    return batch_size // dp_size


def _stack(dataset: Any, indices: list[int], seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    rows = [dataset.get(int(i), seq_len) for i in indices]
    inputs = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))  # [B, S]
    targets = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64))  # [B, S]
    doc_ids = torch.from_numpy(np.stack([r[2] for r in rows]).astype(np.int64))  # [B, S]
    return inputs, targets, doc_ids


class BatchLoader:
    """Deterministic shuffled batches from `dataset` (anything with get(i, seq_len) and num_windows(seq_len))."""

    def __init__(self, dataset: Any, seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        self.dataset, self.seed, self.dp_rank, self.dp_size = dataset, seed, dp_rank, dp_size
        self.position: dict[int, list[int]] = {}  # seq_len -> [epoch, cursor]
        self._perm_key: tuple[int, int] | None = None
        self._perm: np.ndarray | None = None

    def _permutation(self, seq_len: int, epoch: int) -> np.ndarray:
        if self._perm_key != (seq_len, epoch):
            n = self.dataset.num_windows(seq_len)
            self._perm = np.random.default_rng([self.seed, seq_len, epoch]).permutation(n)
            self._perm_key = (seq_len, epoch)
        return self._perm

    def global_indices(self, batch_size: int, seq_len: int) -> list[int]:
        """The next global batch's window indices; advances the position."""
        n = self.dataset.num_windows(seq_len)
        if n == 0:
            raise HerdError(f"the {getattr(self.dataset, 'split', 'train')} split has no window of {seq_len + 1} "
                            f"tokens; use a shorter --seq-len or more data.")
        epoch, cursor = self.position.setdefault(seq_len, [0, 0])
        out: list[int] = []
        while len(out) < batch_size:
            perm = self._permutation(seq_len, epoch)
            take = min(batch_size - len(out), n - cursor)
            out.extend(int(i) for i in perm[cursor:cursor + take])
            cursor += take
            if cursor == n:
                epoch, cursor = epoch + 1, 0
        self.position[seq_len] = [epoch, cursor]
        return out

    def next_batch(self, batch_size: int, seq_len: int) -> Batch:
        """This rank's slice of the next global batch of `batch_size` windows of `seq_len` tokens."""
        local = local_batch_size(batch_size, self.dp_size)
        indices = self.global_indices(batch_size, seq_len)
        mine = indices[self.dp_rank * local:(self.dp_rank + 1) * local]
        return Batch(*_stack(self.dataset, mine, seq_len), indices)

    def epochs(self, seq_len: int) -> float:
        """Passes over the data made so far at this sequence length (fractional)."""
        epoch, cursor = self.position.get(seq_len, [0, 0])
        return epoch + cursor / max(self.dataset.num_windows(seq_len), 1)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "position": {str(k): list(v) for k, v in self.position.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise HerdError(f"the checkpoint's data order used seed {state['seed']} but this run uses "
                            f"{self.seed}; resume with --seed {state['seed']}.")
        self.position = {int(k): list(v) for k, v in state["position"].items()}


def validation_batches(dataset: Any, n_batches: int, batch_size: int, seq_len: int,
                       dp_rank: int = 0, dp_size: int = 1) -> list[Batch]:
    """The same fixed windows every time (the first n_batches * batch_size, wrapping), sliced per rank."""
    n = dataset.num_windows(seq_len)
    if n == 0:
        raise HerdError(f"the validation split has no window of {seq_len + 1} tokens; use a shorter "
                        "--seq-len or give the val split more data.")
    local = local_batch_size(batch_size, dp_size)
    out = []
    for b in range(n_batches):
        indices = [(b * batch_size + j) % n for j in range(batch_size)]
        mine = indices[dp_rank * local:(dp_rank + 1) * local]
        out.append(Batch(*_stack(dataset, mine, seq_len), indices))
    return out
