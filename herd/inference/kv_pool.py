"""The paged KV cache: a pool of fixed-size blocks that requests borrow and give back, and the
prefix cache that lets a new request reuse the blocks of an earlier one with the same beginning.

Layout (the design of vLLM's PagedAttention and nano-vllm's block manager, in plain PyTorch):
each layer's keys and values live in one tensor of `num_blocks * block_size` slots
[slots, n_kv_heads, head_dim]. A request owns a list of blocks (its block table); the token at
position p sits in slot `table[p // block_size] * block_size + p % block_size`. A forward writes
this step's keys/values into their slots and gathers, for every row, the slots of the positions
it may read (PagedStep.update, the hook herd.model's attention calls). Block 0 is never handed out:
padding tokens write there and masked reads point there.

Prefix caching: when a block is full, it is published under a chained hash of its tokens and
every token before it (blake2b of the previous block's digest and its token ids), so equal hashes
mean equal prefixes. A cryptographic hash, not Python's hash(): a client must not be able to craft
a prompt whose blocks collide with another client's and so read that client's cached keys and
values (vLLM moved to SHA-256 for this reason). The block's own token ids are compared too. A
new request walks its prompt block by block and takes every published block that matches
(ref-counted: many running requests may share a system prompt's blocks). A released block keeps
its hash and stays findable until the pool needs it for something else (least recently freed
first), so the next turn of a chat finds its whole history cached.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from herd.model import ModelArgs

SCRATCH_BLOCK = 0


class BlockManager:
    """Which blocks are free, who holds the others (reference counts), and the prefix-cache index."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError("a KV pool needs at least 2 blocks (block 0 is the scratch block)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        # Free blocks, least recently freed first: allocation takes from the front, so cached
        # content that was used last survives longest.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.by_hash: dict[bytes, int] = {}
        self.hits = 0  # prefix-cache statistics, in tokens
        self.queries = 0

    @property
    def usable(self) -> int:
        """Blocks a request can ever hold (all but the scratch block)."""
        return self.num_blocks - 1

    def num_free(self) -> int:
        return len(self.free)

    def used_fraction(self) -> float:
        """Share of the pool held by running requests (free blocks that still cache a prefix count as free)."""
        return 1.0 - len(self.free) / self.usable

    @staticmethod
    def chain_hash(prev: bytes | None, tokens: Sequence[int]) -> bytes:
        """128-bit digest of a block's tokens and (through prev, the previous block's digest) all before it."""
        return hashlib.blake2b((prev or b"") + array("q", tokens).tobytes(), digest_size=16).digest()

    def match_prefix(self, tokens: Sequence[int], max_blocks: int) -> list[int]:
        """The published blocks that hold the first full blocks of `tokens` (at most max_blocks), in order."""
        bs, out, prev = self.block_size, [], None
        for j in range(max_blocks):
            chunk = tuple(tokens[j * bs:(j + 1) * bs])
            if len(chunk) < bs:
                break
            h = self.chain_hash(prev, chunk)
            b = self.by_hash.get(h)
            if b is None or self.block_tokens[b] != chunk:
                break
            out.append(b)
            prev = h
        return out

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks (taking them off the free list if nobody held them)."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, evicting the least recently freed cached content. The caller checks num_free()."""
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None and self.by_hash.get(h) == b:
                del self.by_hash[h]
            self.block_hash[b] = self.block_tokens[b] = None
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference per block; a block nobody holds goes to the back of the free list (still cached)."""
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None

    def publish(self, block: int, prev: bytes | None, tokens: Sequence[int]) -> bytes:
        """Make a full block findable by its chained hash; returns the hash (the next block's `prev`)."""
        chunk = tuple(tokens)
        h = self.chain_hash(prev, chunk)
        if self.block_hash[block] is None:
            self.block_hash[block], self.block_tokens[block] = h, chunk
            self.by_hash.setdefault(h, block)  # an equal block published earlier stays the one found
        return h

    def leaked(self) -> int:
        """Blocks with a reference when no request runs: must be 0 (a test and /health check this)."""
        return sum(1 for b in range(1, self.num_blocks) if self.ref[b] != 0)


class KVPool:
    """The key and value tensors of every layer: [num_blocks * block_size, n_kv_heads, head_dim] each."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        slots = num_blocks * block_size
        shape = (slots, args.n_kv_heads, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        # Reused output buffers of the block gather (eager mode): allocating a fresh multi-MB tensor for
        # every layer costs more than the copy itself (page faults). One layer's keys and values are
        # consumed by attention before the next layer gathers, so two buffers serve every layer.
        self._workspace: list[Tensor] = [torch.empty(0, device=device, dtype=dtype) for _ in range(2)]

    def workspace(self, which: int, numel: int) -> Tensor:
        ws = self._workspace[which]
        if ws.numel() < numel:
            ws = self._workspace[which] = torch.empty(max(numel, 2 * ws.numel()), device=ws.device, dtype=ws.dtype)
        return ws[:numel]

    @torch.no_grad()
    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's keys and values in every layer (a fork's own copy of a shared partial block)."""
        for t in self.k + self.v:
            blocks = t.view(self.num_blocks, self.block_size, *t.shape[1:])
            blocks[dst].copy_(blocks[src])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class PagedStep:
    """What one forward sees of the pool: the slot each new token writes, the blocks each row reads.

    write: LongTensor [B * S] (row-major over the [B, S] tokens; padding writes to the scratch block).
    table: LongTensor [B, nb], the first nb blocks of every row's block table (padded with the scratch
    block): position t of row b is at t of the gathered [nb * block_size] positions, and the mask hides
    those a query may not see. Whole blocks are gathered (contiguous 16-token copies, several times
    faster than gathering token by token). Implements the cache hook herd.model's attention calls.
    """

    def __init__(self, pool: KVPool, write: Tensor, table: Tensor, reuse_buffers: bool = False):
        self.pool, self.write, self.table = pool, write, table
        self._table_flat = table.reshape(-1)
        self.reuse_buffers = reuse_buffers  # gather into the pool's workspace (eager only, not under compile)

    def update(self, layer: int, k: Tensor, v: Tensor, cache_pos: Tensor | None, kv_len: int) -> tuple[Tensor, Tensor]:
        k_pool, v_pool = self.pool.k[layer], self.pool.v[layer]
        bsz, heads, seqlen, dim = k.shape
        k_pool.index_copy_(0, self.write, k.transpose(1, 2).reshape(bsz * seqlen, heads, dim).to(k_pool.dtype))
        v_pool.index_copy_(0, self.write, v.transpose(1, 2).reshape(bsz * seqlen, heads, dim).to(v_pool.dtype))
        bs, span = self.pool.block_size, self.table.shape[1] * self.pool.block_size
        rows = (self.pool.num_blocks, bs * heads * dim)  # one row per block: contiguous copies
        out = []
        for i, pool in enumerate((k_pool, v_pool)):
            if self.reuse_buffers:
                buf = self.pool.workspace(i, self._table_flat.numel() * rows[1]).view(-1, rows[1])
                gathered = torch.index_select(pool.view(rows), 0, self._table_flat, out=buf)
            else:
                gathered = pool.view(rows).index_select(0, self._table_flat)
            out.append(gathered.view(bsz, span, heads, dim).transpose(1, 2).to(k.dtype))
        return out[0], out[1]  # [B, H, nb * block_size, D]
