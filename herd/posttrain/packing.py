"""Packing SFT examples into rows, and the batches a fine-tuning loop trains on.

Each example of n tokens gives n - 1 training positions: inputs ids[:-1], targets ids[1:], loss
mask mask[1:]. A row holds one example (packing off) or several (packing on), back to back, each
with its own document id, so the model's document masking keeps attention inside an example and
restarts positions at its start: a packed row computes exactly what its examples compute one by
one, and no target ever crosses from one example into the next.

Packing is best-fit decreasing: examples from longest to shortest, each into the open row with the
least room that still fits it (found in O(log seq_len) with a tree over the free space), else
a new row. It fills rows to ~95-99% on typical chat length mixes, better than greedy in order.

Rows are padded on the right: padding has loss mask False and the document id of the row's last
example, so a row holding one example stays a single document (the plain causal fast path).

SFTBatchLoader shuffles rows per epoch with (seed, epoch), gives data-parallel rank r the r-th
slice of each global batch, and saves its position as (epoch, cursor), so a resumed run reads the
batches the uninterrupted run would have read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from herd.errors import HerdError
from herd.posttrain.dataset import SFTDataset

IGNORE_INDEX = -100
"""The label of a position the loss skips (transformers' and PyTorch's cross_entropy convention)."""


class _FreeSpace:
    """Counts of open rows by remaining room 0..capacity; finds the smallest room >= need in O(log capacity)."""

    def __init__(self, capacity: int) -> None:
        self.size = 1 << max(capacity, 1).bit_length()  # leaves for rooms 0..capacity
        self.count = [0] * (2 * self.size)

    def add(self, room: int, delta: int) -> None:
        i = room + self.size
        while i:
            self.count[i] += delta
            i //= 2

    def smallest_at_least(self, need: int) -> int | None:
        node, lo, hi = 1, 0, self.size
        if self.count[1] == 0:
            return None
        return self._find(node, lo, hi, need)

    def _find(self, node: int, lo: int, hi: int, need: int) -> int | None:
        if hi <= need or self.count[node] == 0:
            return None
        if hi - lo == 1:
            return lo
        mid = (lo + hi) // 2
        found = self._find(2 * node, lo, mid, need)
        return found if found is not None else self._find(2 * node + 1, mid, hi, need)


def pack_bins(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of item indices whose lengths sum to at most `capacity` each."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > capacity:
        raise HerdError(f"an example needs {int(lengths.max())} positions but a row has {capacity}; "
                        "truncate or drop examples longer than the row.")
    space = _FreeSpace(capacity)
    open_rows: dict[int, list[int]] = {}  # room -> rows with exactly that room left
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        need = int(lengths[i])
        room = space.smallest_at_least(need)
        if room is None:
            b, left = len(bins), capacity - need
            bins.append([int(i)])
        else:
            b = open_rows[room].pop()
            space.add(room, -1)
            bins[b].append(int(i))
            left = room - need
        if left > 0:
            open_rows.setdefault(left, []).append(b)
            space.add(left, 1)
    return bins


class SFTRows:
    """The rows of a dataset: one example each, or packed best-fit into rows of `seq_len` positions."""

    def __init__(self, dataset: SFTDataset, seq_len: int, packing: bool = True) -> None:
        self.dataset, self.seq_len, self.packing = dataset, seq_len, packing
        positions = dataset.lengths - 1  # training positions per example
        if len(dataset) and int(positions.max()) > seq_len:
            raise HerdError(f"an example has {int(positions.max()) + 1} tokens but rows hold {seq_len + 1}; "
                            "build the data with max_seq_len <= the row length.")
        bins = pack_bins(positions, seq_len) if packing else [[i] for i in range(len(dataset))]
        self.items = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(dataset))
        self.offsets = np.zeros(len(bins) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in bins], out=self.offsets[1:])
        self.row_lengths = np.array([int(positions[b].sum()) for b in bins], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def examples(self, r: int) -> np.ndarray:
        """Indices of the examples in row r."""
        return self.items[self.offsets[r]:self.offsets[r + 1]]

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, targets, loss mask, document ids) of row r, unpadded, each [row length]."""
        parts = [self.dataset.example(int(i)) for i in self.examples(r)]
        inputs = np.concatenate([ids[:-1] for ids, _ in parts])
        targets = np.concatenate([ids[1:] for ids, _ in parts])
        mask = np.concatenate([m[1:] for _, m in parts])
        docs = np.concatenate([np.full(len(ids) - 1, d, dtype=np.int64) for d, (ids, _) in enumerate(parts)])
        return inputs, targets, mask, docs

    def fill(self) -> float:
        """Fraction of the row positions that hold tokens (packing efficiency)."""
        return float(self.row_lengths.sum()) / max(len(self) * self.seq_len, 1)


@dataclass
class SFTBatch:
    """This rank's share of one global batch of rows."""

    inputs: Tensor
    """int64 [B, S] token ids the model reads."""
    targets: Tensor
    """int64 [B, S] next tokens (padding: the pad id)."""
    loss_mask: Tensor
    """bool [B, S]: True where the target is learned."""
    document_ids: Tensor
    """int64 [B, S]: example index inside its row (attention and positions stay per example)."""
    rows: list[int]
    """Row indices of the whole global batch (to name a bad batch in an error)."""

    @property
    def n_loss_tokens(self) -> int:
        """Learned targets in this share."""
        return int(self.loss_mask.sum())

    def labels(self) -> Tensor:
        """targets with IGNORE_INDEX where nothing is learned (for cross_entropy's ignore_index)."""
        return self.targets.masked_fill(~self.loss_mask, IGNORE_INDEX)

    def to(self, device: torch.device | str) -> "SFTBatch":
        return SFTBatch(self.inputs.to(device), self.targets.to(device), self.loss_mask.to(device),
                        self.document_ids.to(device), self.rows)

    def micro_batches(self, size: int) -> list["SFTBatch"]:
        """Split into micro-batches of `size` rows (gradient accumulation)."""
        n = self.inputs.shape[0]
        return [SFTBatch(self.inputs[i:i + size], self.targets[i:i + size], self.loss_mask[i:i + size],
                         self.document_ids[i:i + size], self.rows) for i in range(0, n, size)]


def collate(rows: SFTRows, indices: list[int], pad_id: int = 0, length: int | None = None,
            all_rows: list[int] | None = None) -> SFTBatch:
    """Rows `indices` padded on the right to `length` (default: the longest of them) as one batch.

    An index of -1 is an empty row (nothing learned), used to even out the last validation batch.
    """
    parts = [rows.row(i) if i >= 0 else None for i in indices]
    width = length or max((len(p[0]) for p in parts if p is not None), default=1)
    n = len(indices)
    inputs = np.full((n, width), pad_id, dtype=np.int64)
    targets = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=bool)
    docs = np.zeros((n, width), dtype=np.int64)
    for b, p in enumerate(parts):
        if p is None:
            continue
        x, y, m, d = p
        k = len(x)
        inputs[b, :k], targets[b, :k], mask[b, :k], docs[b, :k] = x, y, m, d
        docs[b, k:] = d[-1]  # padding joins the last example (after it, so causal attention ignores it)
    return SFTBatch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask),
                    torch.from_numpy(docs), list(indices if all_rows is None else all_rows))


class SFTBatchLoader:
    """Deterministic shuffled batches of rows; data-parallel rank r gets the r-th slice of each global batch.

    Packed rows are padded to the row length (fixed shapes); single-example rows to the longest
    row of each rank's slice.
    """

    def __init__(self, rows: SFTRows, seed: int = 0, dp_rank: int = 0, dp_size: int = 1, pad_id: int = 0) -> None:
        if len(rows) == 0:
            raise HerdError("no training rows: the training split is empty; add data or lower --val-fraction.")
        self.rows, self.seed, self.dp_rank, self.dp_size, self.pad_id = rows, seed, dp_rank, dp_size, pad_id
        self.epoch, self.cursor = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return self._perm[1]

    def global_rows(self, batch_size: int) -> list[int]:
        """The next global batch's row indices (wrapping into the next epoch); advances the position."""
        out: list[int] = []
        while len(out) < batch_size:
            perm = self._permutation(self.epoch)
            take = min(batch_size - len(out), len(self.rows) - self.cursor)
            out.extend(int(i) for i in perm[self.cursor:self.cursor + take])
            self.cursor += take
            if self.cursor == len(self.rows):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def next_batch(self, batch_size: int) -> SFTBatch:
        """This rank's slice of the next global batch of `batch_size` rows."""
        if batch_size % self.dp_size:
            raise HerdError(f"global batch of {batch_size} rows does not split over {self.dp_size} data-parallel "
                            f"ranks; use a --batch-size divisible by {self.dp_size}.")
        local = batch_size // self.dp_size
        indices = self.global_rows(batch_size)
        mine = indices[self.dp_rank * local:(self.dp_rank + 1) * local]
        length = self.rows.seq_len if self.rows.packing else None
        return collate(self.rows, mine, self.pad_id, length, all_rows=indices)

    def epochs(self) -> float:
        """Passes over the rows made so far (fractional)."""
        return self.epoch + self.cursor / len(self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise HerdError(f"the checkpoint's batch order used seed {state['seed']} but this run uses "
                            f"{self.seed}; resume with --seed {state['seed']}.")
        if int(state["rows"]) != len(self.rows):
            raise HerdError(f"the checkpoint was trained on {state['rows']} rows but the data now gives "
                            f"{len(self.rows)}; resume with the same --data and length settings.")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def eval_batches(rows: SFTRows, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 pad_id: int = 0) -> list[SFTBatch]:
    """Every row once, in order, as this rank's slices of global batches; the last one is evened out
    with empty rows so every rank runs the same number of forwards."""
    if batch_size % dp_size:
        raise HerdError(f"validation batch of {batch_size} rows does not split over {dp_size} ranks; "
                        f"use a batch size divisible by {dp_size}.")
    local = batch_size // dp_size
    length = rows.seq_len if rows.packing else None
    out = []
    for start in range(0, len(rows), batch_size):
        indices = list(range(start, min(start + batch_size, len(rows))))
        indices += [-1] * (batch_size - len(indices))
        mine = indices[dp_rank * local:(dp_rank + 1) * local]
        out.append(collate(rows, mine, pad_id, length, all_rows=indices))
    return out
