"""Token shards on disk: the format, its writer and its memory-mapped reader.

Layout of a shard directory (format "herd-shards-v1"):

    OUT/manifest.json        format, dtype, tokenizer {path (absolute), sha256, n_words, bos_id,
                             eos_id, copy}, seed, created, splits {name: {shards: [{name, tokens, documents}],
                             tokens, documents, domains: {domain: tokens}}}
    OUT/train/00000.tokens   raw little-endian uint32 token ids; documents back to back, each one
                             stored as [bos] + tokens + [eos]
    OUT/train/00000.offsets  raw little-endian uint64: start of every document in the .tokens
                             file, then one final entry = the file's token count
    OUT/val/...              the held-out split, same layout
    OUT/tokenizer.model      a copy of the tokenizer the shards were made with (find_tokenizer
                             looks here first, then at the recorded path; both checked by sha256)

Every file is written to a temp name and renamed into place; the manifest is written last, so a
directory with a manifest is complete. The reader memory-maps shards (a training loader touches
only the pages of the windows it reads). Training windows never cross a shard boundary: shard s
holds floor((tokens_s - 1) / seq_len) windows of seq_len + 1 tokens, cut back to back.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from herd.errors import HerdError
from herd.fileio import atomic_open, atomic_write

FORMAT = "herd-shards-v1"
TOKEN_DTYPE = np.dtype("<u4")
OFFSET_DTYPE = np.dtype("<u8")
MANIFEST = "manifest.json"
TOKENIZER_COPY = "tokenizer.model"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (identifies the tokenizer a shard set was made with)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """The manifest's tokenizer record from a herd Tokenizer (or anything with the same attributes).

    The path is absolute, so the shards can be used from any working directory; the sha256
    identifies the file wherever it moves.
    """
    path = str(getattr(tokenizer, "path", "") or "")
    path = os.path.abspath(path) if path else ""
    sha = getattr(tokenizer, "sha256", None) or (file_sha256(path) if path and os.path.exists(path) else "")
    return {"path": path, "sha256": sha, "n_words": int(tokenizer.n_words),
            "bos_id": int(tokenizer.bos_id), "eos_id": int(tokenizer.eos_id)}


def copy_tokenizer(out_dir: str | os.PathLike, info: dict[str, Any]) -> dict[str, Any]:
    """Copy the tokenizer file named in `info` to OUT/tokenizer.model (atomically) and return the record
    with "copy" set, so the shards carry their tokenizer when they move (or the original is deleted)."""
    src, dst = info.get("path", ""), Path(out_dir) / TOKENIZER_COPY
    if not src or not os.path.isfile(src):
        return dict(info)
    if not (dst.is_file() and file_sha256(dst) == info.get("sha256")):
        atomic_write(dst, Path(src).read_bytes())
    return {**info, "copy": TOKENIZER_COPY}


def find_tokenizer(out_dir: str | os.PathLike, manifest: dict[str, Any] | None = None,
                   override: str | os.PathLike | None = None) -> Path | None:
    """The tokenizer file the shards in out_dir were made with, checked by sha256.

    Looks at `override` (a --tokenizer flag; it must match), then the copy beside the shards, then
    the recorded path (absolute; older manifests stored it relative to the folder the data was
    made in, tried against the current folder and the shard folder). HerdError when none matches;
    None only for shards written without any tokenizer file (ids made by code, e.g. in tests).
    """
    out_dir = Path(out_dir)
    manifest = manifest if manifest is not None else read_manifest(out_dir)
    want = manifest.get("tokenizer", {})
    sha = want.get("sha256", "")
    if override:
        path = Path(override)
        if not path.is_file():
            raise HerdError(f"--tokenizer {path} does not exist; pass the tokenizer.model the shards in {out_dir} "
                            "were made with.")
        if sha and file_sha256(path) != sha:
            raise HerdError(f"--tokenizer {path} is not the tokenizer the shards in {out_dir} were made with "
                            f"(sha256 {sha[:12]}...); pass that one or re-pack the data with this tokenizer.")
        return path
    recorded = want.get("path", "")
    if not recorded and not want.get("copy"):
        return None
    candidates = [out_dir / want.get("copy", TOKENIZER_COPY)]
    if recorded:
        candidates += [Path(recorded)] if os.path.isabs(recorded) else [Path.cwd() / recorded, out_dir / recorded]
    for path in candidates:
        if path.is_file() and (not sha or file_sha256(path) == sha):
            return path
    raise HerdError(f"the tokenizer the shards in {out_dir} were made with (sha256 {sha[:12] or '?'}..., recorded as "
                    f"{recorded or '?'}) is neither beside the shards nor at that path (or it changed); pass "
                    "--tokenizer with that tokenizer.model, or re-pack the data.")


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check OUT/manifest.json."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise HerdError(f"no shard manifest at {path}; point at a directory written by `herd data run` or `herd data pack`.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HerdError(f"{path} is not valid JSON ({e}); re-run the packing step to rewrite it.") from None
    if manifest.get("format") != FORMAT:
        raise HerdError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; re-pack the data with this herd version.")
    return manifest


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any) -> None:
    """Raise HerdError when `tokenizer` is not the one the shards were made with (sha256 or n_words differ)."""
    want = manifest.get("tokenizer", {})
    have = tokenizer if isinstance(tokenizer, dict) else tokenizer_info(tokenizer)
    if int(want.get("n_words", -1)) != int(have["n_words"]):
        raise HerdError(f"the shards were tokenized with a {want.get('n_words')}-token vocabulary but this tokenizer "
                        f"has {have['n_words']}; use the tokenizer at {want.get('path')!r} or re-pack the data.")
    if want.get("sha256") and have.get("sha256") and want["sha256"] != have["sha256"]:
        raise HerdError(f"the shards were tokenized with another tokenizer (sha256 {want['sha256'][:12]}..., "
                        f"this one {have['sha256'][:12]}...); use {want.get('path')!r} or re-pack the data.")


class ShardWriter:
    """Append documents of one split; rolls to a new shard past `shard_tokens` tokens.

    Documents are never split across shards. `close()` renames the last shard into place and
    records the split in OUT/manifest.json (read-modify-write, so write splits one after another,
    not from concurrent processes).
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, tokenizer_info: dict[str, Any],
                 shard_tokens: int = 1 << 26, seed: int = 0) -> None:
        if shard_tokens < 1:
            raise HerdError(f"shard_tokens must be positive, got {shard_tokens}; pass e.g. 67108864.")
        self.out_dir, self.split, self.info = Path(out_dir), split, dict(tokenizer_info)
        self.shard_tokens, self.seed = int(shard_tokens), int(seed)
        self.bos = np.array([self.info["bos_id"]], dtype=TOKEN_DTYPE)
        self.eos = np.array([self.info["eos_id"]], dtype=TOKEN_DTYPE)
        (self.out_dir / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self.domains: dict[str, int] = {}
        self._file = None
        self._closed = False

    def _open(self) -> None:
        self._name = f"{self.split}/{len(self.shards):05d}"
        self._writing = atomic_open(self.out_dir / f"{self._name}.tokens", "wb")
        self._file = self._writing.__enter__()
        self._offsets: list[int] = []
        self._n = 0

    def _roll(self) -> None:
        """Finish the open shard: rename its tokens into place, write its offsets."""
        self._writing.__exit__(None, None, None)  # closes and renames the tokens into place
        offsets = np.array(self._offsets + [self._n], dtype=OFFSET_DTYPE)
        atomic_write(self.out_dir / f"{self._name}.offsets", offsets.tobytes())
        self.shards.append({"name": self._name, "tokens": self._n, "documents": len(self._offsets)})
        self._file = None

    def add(self, tokens: np.ndarray | list[int], domain: str = "general") -> None:
        """Append one document's token ids (without bos/eos: the writer adds them)."""
        if self._closed:
            raise HerdError("this ShardWriter is closed; create a new one to write more documents.")
        ids = np.asarray(tokens)
        if ids.size and (ids.min() < 0 or ids.max() >= self.info["n_words"]):
            raise HerdError(f"token id out of range [0, {self.info['n_words']}) in a document; tokenize with the manifest's tokenizer.")
        if self._file is None:
            self._open()
        doc = np.concatenate([self.bos, ids.astype(TOKEN_DTYPE, copy=False), self.eos])
        self._offsets.append(self._n)
        self._file.write(doc.tobytes())
        self._n += doc.size
        self.domains[domain] = self.domains.get(domain, 0) + int(doc.size)
        if self._n >= self.shard_tokens:
            self._roll()

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write this split into the manifest; returns the split record."""
        if self._closed:
            return self.summary()
        if self._file is not None:
            self._roll()
        self._closed = True
        path = self.out_dir / MANIFEST
        manifest = json.loads(path.read_text()) if path.is_file() else {}
        manifest.update({"format": FORMAT, "dtype": "uint32", "tokenizer": self.info, "seed": self.seed,
                         "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        manifest.setdefault("splits", {})[self.split] = self.summary()
        atomic_write(path, json.dumps(manifest, indent=1) + "\n")
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {"shards": list(self.shards), "tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards), "domains": dict(sorted(self.domains.items()))}

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:  # leave no half-written shard behind
            self._writing.__exit__(exc_type, exc, tb)  # closes and removes the temporary file
            self._file = None


class ShardDataset:
    """Read one split of a shard directory through np.memmap.

    `get(i, seq_len)` returns the i-th training window: seq_len + 1 consecutive tokens of one
    shard, cut back to back from the shard's start, as (inputs, targets, document_ids).
    Document ids number the documents inside the window 0, 1, 2, ... (they change exactly where a
    document starts), which is what a document-causal attention mask needs.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str = "train") -> None:
        self.out_dir = Path(out_dir)
        self.manifest = read_manifest(out_dir)
        if split not in self.manifest.get("splits", {}):
            raise HerdError(f"split {split!r} is not in {self.out_dir / MANIFEST} (it has "
                            f"{sorted(self.manifest.get('splits', {}))}); pick one of those.")
        self.split = split
        self._tokens: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        for shard in self.manifest["splits"][split]["shards"]:
            tok_path = self.out_dir / f"{shard['name']}.tokens"
            off_path = self.out_dir / f"{shard['name']}.offsets"
            for p in (tok_path, off_path):
                if not p.is_file():
                    raise HerdError(f"shard file {p} is missing; re-run the packing step for {self.out_dir}.")
            if tok_path.stat().st_size != shard["tokens"] * TOKEN_DTYPE.itemsize:
                raise HerdError(f"{tok_path} has {tok_path.stat().st_size} bytes but the manifest says "
                                f"{shard['tokens']} tokens; the shard is truncated or corrupt, re-pack the data.")
            tokens = np.memmap(tok_path, dtype=TOKEN_DTYPE, mode="r") if shard["tokens"] else np.zeros(0, TOKEN_DTYPE)
            self._tokens.append(tokens)
            self._offsets.append(np.memmap(off_path, dtype=OFFSET_DTYPE, mode="r"))
        sizes = np.array([t.size for t in self._tokens], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])  # global start of each shard
        self._window_cache: dict[int, np.ndarray] = {}

    @property
    def n_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def n_documents(self) -> int:
        return int(sum(o.size - 1 for o in self._offsets))

    def window(self, global_start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [global_start, global_start + length) of the split's token stream (may cross
        shards) and their document ids, both int64 [length]."""
        if global_start < 0 or length < 0 or global_start + length > self.n_tokens:
            raise HerdError(f"window [{global_start}, {global_start + length}) is outside the split's "
                            f"{self.n_tokens} tokens; ask for a window inside it.")
        tokens = np.empty(length, dtype=np.int64)   # [length]
        doc_ids = np.empty(length, dtype=np.int64)  # [length]
        pos, base = global_start, 0
        shard = int(np.searchsorted(self._starts, global_start, side="right") - 1)
        while base < length:
            local = pos - int(self._starts[shard])
            take = min(length - base, self._tokens[shard].size - local)
            if take <= 0:
                shard += 1
                continue
            tokens[base:base + take] = self._tokens[shard][local:local + take]
            # index of the document holding each position: last offset <= position
            idx = np.searchsorted(self._offsets[shard], np.arange(local, local + take), side="right") - 1
            doc_ids[base:base + take] = idx + (doc_ids[base - 1] + 1 - idx[0] if base else -idx[0])
            base += take
            pos += take
            shard += 1
        return tokens, doc_ids

    def _windows_per_shard(self, seq_len: int) -> np.ndarray:
        if seq_len not in self._window_cache:
            sizes = np.diff(self._starts)
            self._window_cache[seq_len] = np.maximum(sizes - 1, 0) // seq_len
        return self._window_cache[seq_len]

    def num_windows(self, seq_len: int) -> int:
        """How many non-overlapping training windows of seq_len + 1 tokens the split holds."""
        if seq_len < 1:
            raise HerdError(f"seq_len must be positive, got {seq_len}.")
        return int(self._windows_per_shard(seq_len).sum())

    def get(self, i: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The i-th window: (inputs [seq_len], targets [seq_len], document_ids [seq_len]) as int64."""
        per_shard = self._windows_per_shard(seq_len)
        total = int(per_shard.sum())
        if not 0 <= i < total:
            raise HerdError(f"window {i} is out of range: the split has {total} windows of {seq_len} tokens.")
        ends = np.cumsum(per_shard)
        shard = int(np.searchsorted(ends, i, side="right"))
        j = i - (int(ends[shard - 1]) if shard else 0)
        tokens, doc_ids = self.window(int(self._starts[shard]) + j * seq_len, seq_len + 1)
        return tokens[:-1], tokens[1:], doc_ids[:-1]

    def documents(self) -> Iterator[np.ndarray]:
        """Every document in order (token ids with bos and eos)."""
        for tokens, offsets in zip(self._tokens, self._offsets):
            for a, b in zip(offsets[:-1], offsets[1:]):
                yield np.asarray(tokens[int(a):int(b)], dtype=np.int64)
