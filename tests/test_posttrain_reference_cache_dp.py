"""DPO's reference pass under data parallelism: two gloo ranks share out the missing cache chunks (each
computes about half, in lockstep: the same number of forwards on both ranks, as FSDP needs), exchange them,
and both end with exactly the sums one process computes; rank 0 writes every chunk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from herd.posttrain.preference_data import PreferenceDataConfig, build_preference_data
from herd.posttrain.reference_cache import ReferenceCache
from herd.tokenizer import Tokenizer
from helpers import write_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

CHUNK, BATCH = 4, 3


def _data(records: Path, tokenizer: str):
    return build_preference_data(PreferenceDataConfig(data=[str(records)], max_seq_len=128, val_fraction=0.0),
                                 Tokenizer.from_file(tokenizer), progress=False).train


def _fake_forward(calls: list[int]):
    def forward(batch) -> torch.Tensor:  # per-token "log-probs" that depend on the tokens: a deterministic stand-in
        calls.append(1)
        return -(batch.targets.float() % 97) / 97.0 - 0.01  # [N], like the targets
    return forward


def _rank(rank: int, world: int, init_file: str, folder: str, records: str, tokenizer: str, result: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = _data(Path(records), tokenizer)
        cache = ReferenceCache(folder, "key", chunk=CHUNK, write=rank == 0)
        cache.open()
        dist.barrier()
        calls: list[int] = []
        out = cache.compute("train", data, _fake_forward(calls), batch_size=BATCH, progress=False,
                            dp_rank=rank, dp_size=world, dp_group=dist.group.WORLD)
        torch.save({"out": out, "calls": len(calls)}, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_the_reference_pass(tmp_path, official_tokenizer_model):
    from herd.posttrain.arithmetic import preference_records

    records = write_jsonl(tmp_path / "prefs.jsonl", preference_records(22, seed=1))
    data = _data(records, str(official_tokenizer_model))
    calls: list[int] = []
    one = ReferenceCache(tmp_path / "one", "key", chunk=CHUNK)
    one.open()
    want = one.compute("train", data, _fake_forward(calls), batch_size=BATCH, progress=False)
    chunks = [min(CHUNK, len(data) - s) for s in range(0, len(data), CHUNK)]
    assert len(calls) == sum(-(-n // BATCH) for n in chunks) and len(chunks) >= 5

    folder, result = tmp_path / "two", str(tmp_path / "result")
    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), str(folder), str(records), str(official_tokenizer_model),
                                    result), nprocs=2, start_method="spawn", join=True)
    rounds = [chunks[i:i + 2] for i in range(0, len(chunks), 2)]
    lockstep = sum(max(-(-n // BATCH) for n in r) for r in rounds)  # every rank: the longest chunk of each round
    for rank in range(2):
        got = torch.load(f"{result}.{rank}", weights_only=False)
        np.testing.assert_array_equal(got["out"], want)
        assert got["calls"] == lockstep < len(calls)
    one_files = sorted(p.name for p in (tmp_path / "one").glob("*.npy"))
    assert sorted(p.name for p in folder.glob("train_*.npy")) == one_files
    for p in (tmp_path / "one").glob("train_*.npy"):
        np.testing.assert_array_equal(np.load(folder / p.name), np.load(p))
    assert os.path.exists(folder / "key.json")
