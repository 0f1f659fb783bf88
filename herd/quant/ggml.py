"""llama.cpp's Q8_0 and Q4_0 weight blocks: packing, unpacking and the byte layout GGUF stores.

Both formats cut each row into blocks of 32 weights and give every block one float16 scale d
(ggml-common.h, `block_q8_0` / `block_q4_0`):

    Q8_0  34 bytes: d (fp16), 32 x int8 q            with x ~= d * q,       d = max|x| / 127
    Q4_0  18 bytes: d (fp16), 16 bytes of nibbles    with x ~= d * (q - 8), d = (the x of largest |x|) / -8
          byte j holds element j in its low nibble and element j + 16 in its high nibble.

The arithmetic follows ggml-quants.c (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) step by
step in float32, including its round-half-away-from-zero (`roundf`), so the bytes equal those of
llama.cpp and of the `gguf` package's `gguf.quants.quantize` (tests check bit equality). Work is
done in chunks of rows so a large matrix never needs more than a few extra megabytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from herd.errors import HerdError

BLOCK = 32
"""Weights per block (QK8_0 = QK4_0 = 32)."""
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}
"""Bytes per block of each format."""

_CHUNK_BLOCKS = 1 << 16  # blocks per chunk: bounds the float32 temporaries to a few MB


def _roundf(x: Tensor) -> Tensor:
    """C's roundf (half away from zero) in float32, written as ggml's Python reference does."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + (2 * (a - floored)).floor())


def _blocks(w: Tensor, fmt: str) -> Tensor:
    if w.shape[-1] % BLOCK:
        raise HerdError(f"{fmt.upper()} needs rows whose length is a multiple of {BLOCK}, got {w.shape[-1]}; "
                        "keep this tensor in f16/f32.")
    return w.detach().reshape(-1, BLOCK)


def _q8_0_chunk(blocks: Tensor) -> Tensor:
    blocks = blocks.float()
    d = blocks.abs().amax(dim=1, keepdim=True) / 127  # [n, 1]
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _roundf(blocks * inv).to(torch.int8)  # [n, 32]
    return torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], dim=1)  # [n, 34]


def _q4_0_chunk(blocks: Tensor) -> Tensor:
    blocks = blocks.float()
    idx = blocks.abs().argmax(dim=1, keepdim=True)
    d = blocks.gather(1, idx) / -8  # [n, 1] signed: the largest-magnitude weight maps to q = 0
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = (blocks * inv + 8.5).trunc().clamp(0, 15).to(torch.uint8)  # [n, 32]
    packed = q[:, :16] | (q[:, 16:] << 4)  # [n, 16]
    return torch.cat([d.half().view(torch.uint8), packed], dim=1)  # [n, 18]


def quantize_blocks(w: Tensor, fmt: str) -> Tensor:
    """Pack a float tensor [..., K] (K a multiple of 32) as Q8_0 or Q4_0 bytes: uint8 [..., K / 32 * bytes]."""
    if fmt not in BLOCK_BYTES:
        raise HerdError(f"unknown block format '{fmt}'; use q8_0 or q4_0.")
    blocks = _blocks(w, fmt)
    fn = _q8_0_chunk if fmt == "q8_0" else _q4_0_chunk
    out = torch.empty(blocks.shape[0], BLOCK_BYTES[fmt], dtype=torch.uint8)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[start:start + _CHUNK_BLOCKS] = fn(blocks[start:start + _CHUNK_BLOCKS].cpu())
    return out.reshape(*w.shape[:-1], w.shape[-1] // BLOCK * BLOCK_BYTES[fmt])


def dequantize_blocks(data: Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unpack Q8_0 or Q4_0 bytes uint8 [..., n_blocks * bytes] into floats [..., n_blocks * 32]."""
    if fmt not in BLOCK_BYTES:
        raise HerdError(f"unknown block format '{fmt}'; use q8_0 or q4_0.")
    nb = BLOCK_BYTES[fmt]
    if data.shape[-1] % nb:
        raise HerdError(f"{fmt.upper()} data rows must be a multiple of {nb} bytes, got {data.shape[-1]}; "
                        "the file is corrupt.")
    blocks = data.reshape(-1, nb)
    out = torch.empty(blocks.shape[0], BLOCK, dtype=dtype)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        b = blocks[start:start + _CHUNK_BLOCKS]
        d = b[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
        if fmt == "q8_0":
            q = b[:, 2:].contiguous().view(torch.int8).float()  # [n, 32]
        else:
            nib = b[:, 2:]
            q = torch.cat([nib & 0x0F, nib >> 4], dim=1).float() - 8  # [n, 32]
        out[start:start + _CHUNK_BLOCKS] = (q * d).to(dtype)
    return out.reshape(*data.shape[:-1], data.shape[-1] // nb * BLOCK)
