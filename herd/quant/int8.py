"""int8 weight-only linear layers: per-output-channel symmetric int8 weights, float activations.

    w[n, k] ~= scale[n] * q[n, k],   q in [-127, 127],   scale[n] = max_k |w[n, k]| / 127

The scale is rounded to bfloat16 *before* the weights are divided by it, so the kernel (which
takes bf16 scales) computes with exactly the scale the weights were quantized against.

Forward on CPU for a few rows (decode): `torch._weight_int8pack_mm(x_bf16, q, scale_bf16)`, PyTorch's
AVX-512/AVX2 int8 weight-only GEMV (bf16 activations, as gpt-fast and torchchat use it). For many
rows (prefill) that kernel is slower than a float GEMM, so the weight is dequantized into the
activation dtype, a block of rows at a time, and multiplied with a float GEMM; elsewhere (CUDA,
MPS) the dequantizing path is gpt-fast's `F.linear(x, q.to(x.dtype)) * scale`.

Backward: the weights are frozen (QLoRA-style fine-tuning trains adapters on top), so only the
input gets a gradient: grad_x = (grad_y * scale) @ q, the gradient through the dequantized weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DECODE_ROWS = 16
"""Up to this many rows the int8 kernel runs; above it (prefill) dequantize + float GEMM is faster."""
PREFILL_CHUNK = 512
"""Output rows dequantized at a time on the prefill path."""


def aligned(t: Tensor, alignment: int = 64) -> Tensor:
    """`t`, copied if its data does not start on an `alignment`-byte boundary.

    PyTorch's CPU int8/int4 kernels use aligned vector loads and crash on a misaligned pointer;
    tensors memory-mapped straight out of a safetensors file can start anywhere.
    """
    if t.device.type == "cpu" and t.numel() and t.data_ptr() % alignment:
        return t.clone()
    return t


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: float [N, K] -> (q int8 [N, K], scale bfloat16 [N]) with w ~= scale[:, None] * q."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)  # [N]
    scale = (amax / 127).to(torch.bfloat16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row: any scale, q = 0
    q = torch.round(w / scale.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q int8 [N, K], scale [N] -> float [N, K]."""
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(1)).to(dtype)


_HAS_KERNEL = hasattr(torch, "_weight_int8pack_mm")


def int8_kernel_available(device: torch.device) -> bool:
    """Whether PyTorch's int8 weight-only kernel runs on this device (CPU builds have it)."""
    return device.type == "cpu" and _HAS_KERNEL


def _int8_matmul(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [..., K] @ (scale * q).T -> [..., N] in x's dtype."""
    k = x.shape[-1]
    if _HAS_KERNEL and x.device.type == "cpu" and x.numel() <= DECODE_ROWS * k:
        # Few dispatcher calls on purpose: in eager decoding this runs ~85 times per token.
        if scale.dtype != torch.bfloat16:
            scale = scale.to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x.reshape(-1, k).to(torch.bfloat16), q, scale)  # [rows, N], bf16 only is fast
        return y.to(x.dtype).view(*x.shape[:-1], q.shape[0])
    if x.device.type != "cpu":
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    # Prefill on CPU: dequantize PREFILL_CHUNK output rows at a time into a small buffer that stays in
    # cache, instead of materializing the whole float weight (4 bytes per weight, page faults and all).
    x2 = x.reshape(-1, k)
    out = torch.empty(x2.shape[0], q.shape[0], dtype=x.dtype, device=x.device)  # [rows, N]
    for start in range(0, q.shape[0], PREFILL_CHUNK):
        out[:, start:start + PREFILL_CHUNK] = x2 @ q[start:start + PREFILL_CHUNK].to(x.dtype).t()
    return out.mul_(scale.to(x.dtype)).view(*x.shape[:-1], q.shape[0])


class _Int8Matmul(torch.autograd.Function):
    """y = x @ (scale * q).T with a gradient for x only (q and scale are frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(q, scale)
        return _int8_matmul(x, q, scale)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, None, None]:
        q, scale = ctx.saved_tensors
        grad_x = (grad_y * scale.to(grad_y.dtype)) @ q.to(grad_y.dtype)  # [..., N] @ [N, K]
        return grad_x, None, None


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 per-channel weights (buffers `weight_int8`, `scale`)."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_float(cls, weight: Tensor) -> "Int8Linear":
        """Quantize a float weight [out, in] (e.g. an nn.Linear's)."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, device="meta")
        layer.weight_int8, layer.scale = quantize_int8(weight)
        return layer.to(weight.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.weight_int8, self.scale = aligned(self.weight_int8), aligned(self.scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight [out, in] this layer computes with."""
        return dequantize_int8(self.weight_int8, self.scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _Int8Matmul.apply(x, self.weight_int8, self.scale)
        return _int8_matmul(x, self.weight_int8, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"
