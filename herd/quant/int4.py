"""int4 weight-only linear layers: group-wise asymmetric 4-bit weights, float activations.

Each row of w [N, K] is cut into groups of `group_size` weights; each group gets a scale and a
zero point (gpt-fast's convention, the one PyTorch's int4 kernels take):

    scale = (max - min) / 15,   zero = min + 8 * scale,   q = round((w - min) / scale) in [0, 15]
    w ~= (q - 8) * scale + zero

Scales and zeros are rounded to bfloat16 first and q is computed against the rounded values, so
the kernel sees exactly the grid the weights were put on. `scales_zeros` is stored as
[K / group_size, N, 2] bfloat16, the layout `_weight_int4pack_mm_for_cpu` reads.

Storage: `weight_int4` uint8 [N, K / 2], two weights per byte, element 2j in the low nibble and
2j + 1 in the high one. That is the portable form checkpoints hold. On CPU the buffer is
converted in place into the kernel's own tiled layout (`_convert_weight_to_int4pack_for_cpu`,
which differs between AVX-512 and AVX2 builds), so an int4 model keeps half a byte per weight in
memory; saving or moving the layer converts it back (see `_cpu_layout_positions`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from herd.errors import HerdError
from herd.quant.int8 import aligned

GROUP_SIZES = (32, 64, 128, 256)


def check_int4_shape(in_features: int, out_features: int, group_size: int) -> str | None:
    """Why a weight [out, in] cannot be int4 with this group size (None if it can)."""
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}"
    if in_features % group_size:
        return f"in_features {in_features} is not a multiple of the group size {group_size}"
    if out_features % 16:  # the CPU packing works in blocks of 16 output rows
        return f"out_features {out_features} is not a multiple of 16"
    return None


def quantize_int4(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """float [N, K] -> (q uint8 [N, K] in 0..15, scales_zeros bfloat16 [K / group_size, N, 2])."""
    n, k = w.shape
    problem = check_int4_shape(k, n, group_size)
    if problem:
        raise HerdError(f"cannot quantize a [{n}, {k}] weight to int4: {problem}; use int8 or another group size.")
    g = w.detach().float().reshape(n, k // group_size, group_size)  # [N, G, gs]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [N, G]
    scale = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((g - (zero - 8 * scale).unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 15)
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, N, 2]
    return q.reshape(n, k).to(torch.uint8), scales_zeros


def dequantize_int4(q: Tensor, scales_zeros: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q uint8 [N, K] in 0..15, scales_zeros [G, N, 2] -> float [N, K]."""
    n, k = q.shape
    groups = scales_zeros.shape[0]
    sz = scales_zeros.float().transpose(0, 1)  # [N, G, 2]
    w = (q.float().reshape(n, groups, k // groups) - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(n, k).to(dtype)


def pack_nibbles(q: Tensor) -> Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K / 2]: element 2j low nibble, 2j + 1 high nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 [N, K / 2] -> uint8 [N, K] values 0..15 (inverse of pack_nibbles)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def int4_kernel_available(device: torch.device) -> bool:
    """Whether PyTorch's CPU int4 kernel (and its weight packing) exists in this build."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") \
        and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _to_cpu_layout(q: Tensor) -> Tensor:
    """uint8 [N, K] values 0..15 -> the CPU kernel's uint8 [N, K / 2] tiled layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def _cpu_layout_positions(n: int, k: int) -> Tensor:
    """For each nibble slot of the CPU layout of an [n, k] weight, the flat index n_i * k + k_i it holds.

    The layout is PyTorch's private tiling (it depends on the CPU capability the build dispatches
    to), so rather than re-deriving it, pack the element indices themselves, four bits per pass,
    and read back where each one landed. Costs a few linear passes; used only to save or move.
    """
    index = torch.arange(n * k, dtype=torch.int64)
    where = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
        digit = ((index >> shift) & 15).to(torch.uint8).reshape(n, k)
        slots = unpack_nibbles(_to_cpu_layout(digit)).reshape(-1)  # digit found in each nibble slot
        where |= slots.to(torch.int64) << shift
    return where


def _from_cpu_layout(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of _to_cpu_layout: the CPU layout -> uint8 [N, K] values 0..15."""
    slots = unpack_nibbles(packed).reshape(-1)
    q = torch.empty(n * k, dtype=torch.uint8)
    q[_cpu_layout_positions(n, k)] = slots
    return q.reshape(n, k)


def _int4_matmul(x: Tensor, weight: Tensor, scales_zeros: Tensor, group_size: int, cpu_layout: bool,
                 out_features: int) -> Tensor:
    if cpu_layout:  # the kernel for every row count: unpacking the tiled layout per call would cost more
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, group_size, scales_zeros.to(torch.bfloat16))
        return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
    return F.linear(x, dequantize_int4(unpack_nibbles(weight), scales_zeros, x.dtype))


class _Int4Matmul(torch.autograd.Function):
    """y = x @ dequant(w).T with a gradient for x only (the weights are frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "Int4Linear") -> Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, None]:
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), None


class Int4Linear(nn.Module):
    """A bias-free linear layer with group-wise int4 weights (buffers `weight_int4`, `scales_zeros`)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128,
                 device: torch.device | str | None = None):
        super().__init__()
        problem = check_int4_shape(in_features, out_features, group_size)
        if problem:
            raise HerdError(f"cannot build an int4 layer [{out_features}, {in_features}]: {problem}; "
                            "use int8 or another group size.")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
        self.register_buffer("scales_zeros", torch.zeros(in_features // group_size, out_features, 2,
                                                         dtype=torch.bfloat16, device=device))
        self.cpu_layout = False  # whether weight_int4 holds the CPU kernel's layout (else pack_nibbles')

    @classmethod
    def from_float(cls, weight: Tensor, group_size: int = 128) -> "Int4Linear":
        """Quantize a float weight [out, in] (e.g. an nn.Linear's)."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, group_size, device="meta")
        q, layer.scales_zeros = quantize_int4(weight, group_size)
        layer.weight_int4 = pack_nibbles(q)
        layer.to(weight.device)
        layer._use_cpu_layout()
        return layer

    # -- layouts -------------------------------------------------------------------------------

    def _use_cpu_layout(self) -> None:
        """Switch the weight to the CPU kernel's layout when it lives on a CPU that has the kernel."""
        if not self.cpu_layout and int4_kernel_available(self.weight_int4.device):
            self.weight_int4 = _to_cpu_layout(unpack_nibbles(self.weight_int4))
            self.cpu_layout = True

    def int4_values(self) -> Tensor:
        """uint8 [out, in] quantized values 0..15, whatever the current layout."""
        if self.cpu_layout:
            return _from_cpu_layout(self.weight_int4, self.out_features, self.in_features)
        return unpack_nibbles(self.weight_int4)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.cpu_layout:  # checkpoints always hold the portable nibble layout
            destination[prefix + "weight_int4"] = pack_nibbles(self.int4_values())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.cpu_layout = False  # what is loaded is the portable layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scales_zeros = aligned(self.scales_zeros)  # (the weight is re-tiled into new memory)

    def _apply(self, fn, recurse=True):
        if self.cpu_layout:  # move / convert the portable form, then re-tile for the destination
            self.weight_int4 = pack_nibbles(self.int4_values())
            self.cpu_layout = False
        out = super()._apply(fn, recurse)
        if self.weight_int4.device.type != "meta":
            self._use_cpu_layout()
        return out

    # -- compute -------------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight [out, in] this layer computes with."""
        return dequantize_int4(self.int4_values(), self.scales_zeros, dtype)

    def _matmul(self, x: Tensor) -> Tensor:
        return _int4_matmul(x, self.weight_int4, self.scales_zeros, self.group_size, self.cpu_layout,
                            self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if not self.cpu_layout and self.weight_int4.device.type == "cpu":
            self._use_cpu_layout()  # loaded with load_state_dict(assign=True), which bypasses _apply
        if torch.is_grad_enabled() and x.requires_grad:
            return _Int4Matmul.apply(x, self)
        return self._matmul(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"
