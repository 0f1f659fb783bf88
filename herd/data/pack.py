"""Tokenize documents, hold out a validation split, mix domains and pack into token shards.

Two steps, so tokenizing (the expensive part) runs on every worker and packing (one cheap pass
that must see every document to mix and order them) runs once:

    TokenizeDocuments (N tasks)  FOLDER/tokens/RANK.npy (uint32 ids, documents back to back, no
                                 bos/eos) + RANK.meta.npz (lengths, domains, validation flags)
    PackShards (1 task)          pack_token_files(): validation documents in order, training
                                 documents mixed by plan_mix(), through ShardWriter

The validation split is chosen by hashing each document id with the seed, so it is stable across
runs and worker counts. Validation documents are never upsampled or mixed: they measure the
held-out loss of the corpus as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm

from herd.data.mix import plan_mix
from herd.data.shards import MANIFEST, ShardWriter, copy_tokenizer, read_manifest, tokenizer_info
from herd.errors import HerdError
from herd.fileio import atomic_open, atomic_write


def load_tokenizer(path: str | os.PathLike) -> Any:
    """herd's Tokenizer from a tiktoken-format file (or a folder holding tokenizer.model)."""
    from herd.tokenizer import Tokenizer

    if not Path(path).exists():
        raise HerdError(f"tokenizer {path} does not exist; pass --tokenizer with a tokenizer.model file.")
    return Tokenizer.from_file(path)


def is_validation(doc_id: str, fraction: float, seed: int = 0) -> bool:
    """Stable held-out choice: hash(seed, id) mapped to [0, 1) is below `fraction`."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64 < fraction


class TokenizeDocuments(PipelineStep):
    """Tokenizes each task's documents into FOLDER/tokens/RANK.npy + RANK.meta.npz (written atomically)."""

    name = "🔢 tokenize"
    type = "🔢 - TOKENIZER"

    def __init__(self, folder: str, tokenizer_path: str, val_fraction: float = 0.01, seed: int = 0,
                 batch_size: int = 256) -> None:
        super().__init__()
        self.folder, self.tokenizer_path = Path(folder), str(tokenizer_path)
        self.val_fraction, self.seed, self.batch_size = val_fraction, seed, batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tok = load_tokenizer(self.tokenizer_path)
        out = self.folder / "tokens"
        out.mkdir(parents=True, exist_ok=True)
        lengths, domains, val, batch = [], [], [], []
        # tokens then metadata, each atomically; the metadata file marks the task's output complete
        with atomic_open(out / f"{rank:05d}.tokens", "wb") as f:
            def flush():
                for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch], num_threads=1)):
                    arr = np.asarray(ids, dtype=np.uint32)
                    f.write(arr.tobytes())
                    lengths.append(arr.size)
                    domains.append(doc.metadata.get("domain", "general"))
                    held = is_validation(doc.id, self.val_fraction, self.seed)
                    val.append(held)
                    self.stat_update("tokens", value=arr.size)
                    self.stat_update(f"tokens_{domains[-1]}", value=arr.size)
                    self.stat_update("documents_val" if held else "documents_train")
                batch.clear()

            for doc in data or ():
                batch.append(doc)
                if len(batch) >= self.batch_size:
                    with self.track_time("batch"):
                        flush()
                yield doc
            with self.track_time("batch"):
                flush()
        with atomic_open(out / f"{rank:05d}.meta.npz", "wb") as f:
            np.savez(f, lengths=np.array(lengths, dtype=np.int64), domains=np.array(domains, dtype=str),
                     val=np.array(val, dtype=bool))


def pack_token_files(folder: str | os.PathLike, n_ranks: int, out_dir: str | os.PathLike, info: dict[str, Any],
                     weights: dict[str, float] | None, seed: int = 0, max_repeat: float = 4.0,
                     shard_tokens: int = 1 << 26, progress: bool = True) -> Path:
    """Write OUT's shards and manifest from every task's token files; returns the manifest path.

    `weights` None keeps every training document once, in order (no mixing).
    """
    folder, out_dir = Path(folder), Path(out_dir)
    tokens, starts, lengths, domains, val = [], [], [], [], []
    for r in range(n_ranks):
        tpath, mpath = folder / "tokens" / f"{r:05d}.tokens", folder / "tokens" / f"{r:05d}.meta.npz"
        if not mpath.is_file():
            raise HerdError(f"{mpath} is missing: the tokenize stage did not finish; re-run the pipeline to complete it.")
        with np.load(mpath) as z:
            ln, dm, vl = z["lengths"], z["domains"], z["val"]
        size = tpath.stat().st_size // 4
        tokens.append(np.memmap(tpath, dtype="<u4", mode="r") if size else np.zeros(0, np.uint32))
        starts.append(np.concatenate([[0], np.cumsum(ln)[:-1]]).astype(np.int64) if ln.size else np.zeros(0, np.int64))
        lengths.append(ln), domains.append(dm), val.append(vl)
    rank_of = np.concatenate([np.full(x.size, r) for r, x in enumerate(lengths)]).astype(np.int64)
    start = np.concatenate(starts)
    length = np.concatenate(lengths)
    domain = np.concatenate(domains) if domains else np.zeros(0, str)
    held = np.concatenate(val)
    if length.size == 0:
        raise HerdError("no documents survived the pipeline, so there is nothing to pack; check the report and loosen the filters.")
    # a stale manifest from an earlier run must not describe the new shards
    (out_dir / MANIFEST).unlink(missing_ok=True)
    train_idx, val_idx = np.flatnonzero(~held), np.flatnonzero(held)
    if weights:
        order, mix_report = plan_mix(length[train_idx], domain[train_idx], weights, seed, max_repeat)
        order = train_idx[order]
    else:
        order, mix_report = train_idx, {"weights": None}
    for split, idx in (("val", val_idx), ("train", order)):
        with ShardWriter(out_dir, split, info, shard_tokens=shard_tokens, seed=seed) as w:
            for k in tqdm(idx, desc=f"pack {split}", unit="doc", disable=not progress or idx.size < 1000):
                r, s = int(rank_of[k]), int(start[k])
                w.add(tokens[r][s:s + int(length[k])], domain=str(domain[k]))
    # the mix report rides along in the manifest (one more read-modify-write, still atomic)
    manifest = read_manifest(out_dir)
    manifest["mix"] = mix_report
    manifest["tokenizer"] = copy_tokenizer(out_dir, manifest["tokenizer"])
    atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return out_dir / MANIFEST


class PackShards(PipelineStep):
    """Single-task step (rank 0) around pack_token_files."""

    name = "📦 mix + pack shards"
    type = "💽 - WRITER"

    def __init__(self, folder: str, n_ranks: int, out_dir: str, tokenizer_path: str, weights: dict[str, float] | None,
                 seed: int = 0, max_repeat: float = 4.0, shard_tokens: int = 1 << 26) -> None:
        super().__init__()
        self.folder, self.n_ranks, self.out_dir, self.tokenizer_path = folder, n_ranks, out_dir, tokenizer_path
        self.weights, self.seed, self.max_repeat, self.shard_tokens = weights, seed, max_repeat, shard_tokens

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if rank == 0:
            info = tokenizer_info(load_tokenizer(self.tokenizer_path))
            path = pack_token_files(self.folder, self.n_ranks, self.out_dir, info, self.weights, self.seed,
                                    self.max_repeat, self.shard_tokens)
            manifest = read_manifest(path.parent)
            for split, rec in manifest["splits"].items():
                self.stat_update(f"{split}_tokens", value=rec["tokens"])
                self.stat_update(f"{split}_documents", value=rec["documents"])
        return
        yield


def pack_documents(docs: Iterable[Document], out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike,
                   val_fraction: float = 0.01, weights: dict[str, float] | None = None, seed: int = 0,
                   max_repeat: float = 4.0, shard_tokens: int = 1 << 26) -> Path:
    """Pack already-clean documents in this process (no executor): tokenize, split, mix, write shards."""
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer_path)  # a missing tokenizer fails before anything is written
    work = out_dir / f".pack-work-{os.getpid()}"
    try:
        step = TokenizeDocuments(str(work), str(tokenizer_path), val_fraction, seed)
        for _ in tqdm(step.run(iter(docs), 0, 1), desc="tokenize", unit="doc"):
            pass
        return pack_token_files(work, 1, out_dir, tokenizer_info(tok), weights, seed, max_repeat, shard_tokens)
    finally:  # the intermediate token files go whether packing finished or failed
        shutil.rmtree(work, ignore_errors=True)
