"""Batches of preference examples, and the per-response quantities the losses compare.

Two layouts of the same examples; both give each response's token log-probs and last-token index:

  concat  one row per response, prompt + response, right-padded (TRL's DPOTrainer: chosen and
          rejected rows in one forward). Plain causal attention, the fast path of every kernel.
  shared  one row per example: the prompt once, then every response after it (Llama 3 §4.1.2 for
          the reward model: "we concatenate the prompt and multiple responses into a single row").
          Each response attends to the prompt and to itself only, and its positions continue
          from the prompt's, so it computes exactly what its concat row computes while the prompt
          runs once per example instead of once per response: the better layout when prompts are
          long next to the responses (multi-turn chats, ranked triples).

A batch names, for every response token, the hidden state that predicts it (`src`, a flat index
into the [rows * seq] hidden states), its id, its response and whether the Llama 3 mask keeps it;
so only response tokens ever meet the output matrix, and a response's first token is predicted
from the prompt's last position (shared by all responses in the shared layout).

    batch = collate_preferences(dataset, [0, 1, 2], layout="shared", pad_id=tok.pad_id)
    token_lp = response_logprobs(model, batch)               # float32 [N], differentiable
    chosen_mask_sums = sequence_sums(token_lp, batch, batch.keep("llama3"))   # [responses]
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from herd.errors import HerdError
from herd.posttrain.preference_data import PreferenceDataset
from herd.train.loss import lm_head, token_logprobs

LAYOUTS = ("concat", "shared")
MASKS = ("llama3", "completion")
"""Which response tokens a log-prob sum counts: llama3 (formatting tokens removed, Llama 3 §4.1.4) or
completion (every response token, TRL's completion mask)."""


@dataclass
class PreferenceBatch:
    """Preference examples as model inputs plus the index maps from hidden states to responses and pairs."""

    tokens: Tensor
    """int64 [R, S] rows (right-padded with the pad id)."""
    positions: Tensor | None
    """int64 [R, S] RoPE positions (shared layout), or None for 0..S-1."""
    mask: Tensor | None
    """bool [R, 1, S, S] attention mask (shared layout), or None for plain causal attention."""
    src: Tensor
    """int64 [N] flat index (row * S + position) of the hidden state that predicts each response token."""
    targets: Tensor
    """int64 [N] each response token's id."""
    owner: Tensor
    """int64 [N] the response each token belongs to (0 .. n_responses - 1)."""
    content: Tensor
    """bool [N] True for tokens the Llama 3 mask keeps (not a header or end-of-turn token)."""
    last: Tensor
    """int64 [n_responses] flat index of each response's last token (where a reward model reads)."""
    chosen: Tensor
    """int64 [P] the preferred response of each pair."""
    rejected: Tensor
    """int64 [P] the other response of each pair."""
    margin: Tensor
    """float32 [P] the record's margin for its chosen/rejected pair (0 where none, and for pairs with edited)."""
    example: Tensor
    """int64 [n_responses] dataset index of each response's example."""
    rank: Tensor
    """int64 [n_responses] 0 edited, 1 chosen, 2 rejected."""

    @property
    def n_responses(self) -> int:
        return int(self.last.shape[0])

    @property
    def n_pairs(self) -> int:
        return int(self.chosen.shape[0])

    def keep(self, mask: str) -> Tensor | None:
        """The token mask of `mask` ("llama3" or "completion"), None meaning every response token."""
        if mask not in MASKS:
            raise HerdError(f"unknown mask '{mask}'; use one of: {', '.join(MASKS)}.")
        return self.content if mask == "llama3" else None

    def token_counts(self, mask: str) -> Tensor:
        """float32 [n_responses] tokens each response's sum under `mask` counts."""
        keep = self.keep(mask)
        ones = torch.ones_like(self.owner, dtype=torch.float32) if keep is None else keep.float()
        return torch.zeros(self.n_responses, device=ones.device).index_add_(0, self.owner, ones)

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        return PreferenceBatch(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
                                  for f in fields(self)})


def ranked_pairs(n: int) -> list[tuple[int, int]]:
    """Every (better, worse) pair of n responses ranked best first: (0, 1) for two, three for a triple."""
    return [(a, b) for a in range(n) for b in range(a + 1, n)]


def collate_preferences(dataset: PreferenceDataset, indices: list[int], layout: str = "concat",
                        pad_id: int = 0) -> PreferenceBatch:
    """Examples `indices` of `dataset` as one batch in `layout` ("concat" or "shared")."""
    if layout not in LAYOUTS:
        raise HerdError(f"unknown preference layout '{layout}'; use one of: {', '.join(LAYOUTS)}.")
    if not indices:
        raise HerdError("a preference batch needs at least one example.")
    prompts = [dataset.prompt(i) for i in indices]
    responses = [[dataset.response(j) for j in dataset.responses(i)] for i in indices]
    if layout == "concat":
        rows = [(p, [r]) for p, rs in zip(prompts, responses) for r in rs]
    else:
        rows = [(p, rs) for p, rs in zip(prompts, responses)]
    width = max(len(p) + sum(len(ids) for ids, _ in rs) for p, rs in rows)
    n_rows = len(rows)
    tokens = np.full((n_rows, width), pad_id, dtype=np.int64)
    positions = np.zeros((n_rows, width), dtype=np.int64)
    segment = np.full((n_rows, width), -1, dtype=np.int64)  # 0 prompt, k + 1 response k, -1 padding
    src, targets, owner, content, last = [], [], [], [], []
    resp = 0
    for r, (p, rs) in enumerate(rows):
        base, plen = r * width, len(p)
        tokens[r, :plen], positions[r, :plen], segment[r, :plen] = p, np.arange(plen), 0
        at = plen
        for k, (ids, fmt) in enumerate(rs):
            n = len(ids)
            tokens[r, at:at + n] = ids
            positions[r, at:at + n] = plen + np.arange(n)
            segment[r, at:at + n] = k + 1
            # token j is predicted from the one before it: the prompt's last token for j = 0
            src.append(base + np.concatenate([[plen - 1], at + np.arange(n - 1)]))
            targets.append(ids)
            owner.append(np.full(n, resp))
            content.append(~fmt)
            last.append(base + at + n - 1)
            at += n
            resp += 1
    chosen, rejected, margin, example, rank = [], [], [], [], []
    first = 0
    for i in indices:
        rs = dataset.responses(i)
        ranks = dataset.response_rank[rs.start:rs.stop].astype(np.int64)
        for a, b in ranked_pairs(len(rs)):
            chosen.append(first + a)
            rejected.append(first + b)
            m = float(dataset.margin[i])
            is_pair = ranks[a] == 1 and ranks[b] == 2  # the record's margin is about chosen vs rejected
            margin.append(m if is_pair and not np.isnan(m) else 0.0)
        example.extend([i] * len(rs))
        rank.extend(ranks.tolist())
        first += len(rs)

    def t(a: Any, dtype=torch.int64) -> Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype)

    mask = None
    pos = None
    if layout == "shared":
        seg = torch.from_numpy(segment)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = seg.unsqueeze(2) == seg.unsqueeze(1)  # [R, S(query), S(key)]
        mask = ((seg.unsqueeze(1) == 0) | same) & causal
        mask = mask.unsqueeze(1)  # [R, 1, S, S]
        pos = torch.from_numpy(positions)
    return PreferenceBatch(
        tokens=torch.from_numpy(tokens), positions=pos, mask=mask,
        src=t(np.concatenate(src)), targets=t(np.concatenate(targets)), owner=t(np.concatenate(owner)),
        content=t(np.concatenate(content), torch.bool), last=t(last), chosen=t(chosen), rejected=t(rejected),
        margin=t(margin, torch.float32), example=t(example), rank=t(rank))


def gathered_logprobs(h: Tensor, weight: Tensor, src: Tensor, targets: Tensor, chunk: int = 4096) -> Tensor:
    """log p(targets) from the hidden states at flat positions `src` of h [R, S, D]: float32 [N], differentiable."""
    rows = h.reshape(-1, h.shape[-1]).index_select(0, src)  # [N, D]
    return token_logprobs(rows, weight, targets, chunk)


def response_logprobs(model: torch.nn.Module, batch: PreferenceBatch, chunk: int = 4096) -> Tensor:
    """Each response token's log-prob under `model` (inside its forward, so FSDP / TP see the output matrix): [N]."""
    return model(batch.tokens, positions=batch.positions, mask=batch.mask,
                 head=lm_head(gathered_logprobs, batch.src, batch.targets, chunk=chunk))


def sequence_sums(token_values: Tensor, batch: PreferenceBatch, keep: Tensor | None = None) -> Tensor:
    """Per-response sums of token values [N] over the tokens `keep` marks (None: all): float32 [n_responses]."""
    v = token_values if keep is None else token_values * keep.to(token_values.dtype)
    return torch.zeros(batch.n_responses, dtype=v.dtype, device=v.device).index_add(0, batch.owner, v)


class PreferenceBatchLoader:
    """Deterministic shuffled batches of examples; data-parallel rank r gets the r-th slice of each global batch.

    The position (epoch, cursor) is saved with a run, so a resumed run reads the batches the
    uninterrupted run would have read.
    """

    def __init__(self, dataset: PreferenceDataset, seed: int = 0, layout: str = "concat", pad_id: int = 0,
                 dp_rank: int = 0, dp_size: int = 1) -> None:
        if len(dataset) == 0:
            raise HerdError("no training pairs: the training split is empty; add data or lower --val-fraction.")
        self.dataset, self.seed, self.layout, self.pad_id = dataset, seed, layout, pad_id
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.cursor = 0, 0

    def global_indices(self, batch_size: int) -> list[int]:
        """The next global batch's example indices (wrapping into the next epoch); advances the position."""
        out: list[int] = []
        while len(out) < batch_size:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))
            take = min(batch_size - len(out), len(self.dataset) - self.cursor)
            out.extend(int(i) for i in perm[self.cursor:self.cursor + take])
            self.cursor += take
            if self.cursor == len(self.dataset):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def next_batch(self, batch_size: int) -> PreferenceBatch:
        """This rank's slice of the next global batch of `batch_size` examples."""
        if batch_size % self.dp_size:
            raise HerdError(f"global batch of {batch_size} examples does not split over {self.dp_size} data-parallel "
                            f"ranks; use a --batch-size divisible by {self.dp_size}.")
        local = batch_size // self.dp_size
        mine = self.global_indices(batch_size)[self.dp_rank * local:(self.dp_rank + 1) * local]
        return collate_preferences(self.dataset, mine, self.layout, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor, "examples": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed or int(state["examples"]) != len(self.dataset):
            raise HerdError(f"the checkpoint's batch order used seed {state['seed']} over {state['examples']} examples, "
                            f"this run seed {self.seed} over {len(self.dataset)}; resume with the same --seed and --data.")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def eval_batches(dataset: PreferenceDataset, batch_size: int, layout: str = "concat", pad_id: int = 0) -> list[PreferenceBatch]:
    """Every example once, in order, in batches of `batch_size` examples (held-out accuracy and margins)."""
    return [collate_preferences(dataset, list(range(s, min(s + batch_size, len(dataset)))), layout, pad_id)
            for s in range(0, len(dataset), batch_size)]
