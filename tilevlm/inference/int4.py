"""Weight-only int4 Linear, group-wise like llama.cpp's q4_0 / Q4_K: every group of
`group_size` consecutive input weights of a row gets its own scale and offset, and each weight
is one of 16 levels between the group's minimum and maximum.

    w ~= (q - 8) * scale + zero,  q in 0..15,  scale = (max - min) / 15,  zero = min + 8 * scale

(the form torch's CPU kernel `aten._weight_int4pack_mm_for_cpu` computes), so the error per
weight is at most scale / 2 = (max - min) / 30 of its group, plus the rounding of the scale and
offset, which are stored in bf16. Storage: half a byte a weight plus
a bf16 scale and offset per group (4.5 bits a weight at 64, 5 at 32).

A decode step (few rows) runs torch's fused int4 kernel, which reads the packed weight; prefill
(many rows) dequantises the weight to the activations' dtype and runs one GEMM, as Int8Linear
does. The kernel wants its own blocked layout (`_convert_weight_to_int4pack_for_cpu`); the
weights are kept in that layout only, and `unpack_cpu_int4` reads it back for the dequantised
path (checked against the levels when the layer is built: a torch whose layout differs is an
error, never wrong numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU kernel accepts
INT4_GROUP_SIZE = 32  # q4_0's block; docs/performance.md has the accuracy of 32 against 64
KERNEL_BLOCK_N = 64  # output rows per block of the CPU kernel's packed layout
INNER_K_TILES = 8  # the packing argument torch's CPU tests use (ignored by the CPU packer)
INT4_KERNEL_MAX_ROWS = 16  # as Int8Linear: up to this many rows the fused kernel, above it a GEMM


def int4_fits(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> bool:
    """Whether the CPU kernel takes this [out, in] weight: out a multiple of 16, in of the group."""
    out_features, in_features = weight.shape
    return out_features % 16 == 0 and in_features % group_size == 0


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """[out, in] weight -> levels [out, in] (int32, 0..15), scale and zero [out, in / group]."""
    w = weight.detach().float()
    groups = w.reshape(w.shape[0], -1, group_size)  # (out, in/g, g)
    low, high = groups.amin(-1), groups.amax(-1)  # (out, in/g)
    scale = ((high - low) / 15).clamp(min=1e-12)  # (out, in/g)
    levels = torch.round((groups - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15)
    return levels.reshape(w.shape).to(torch.int32), scale, low + 8 * scale


def unpack_cpu_int4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The CPU kernel's packed [out, in / 2] uint8 -> the levels [out, in] (uint8, 0..15).

    Whole blocks of 64 rows: byte j of input k holds row j (low nibble) and row 32 + j (high);
    the last, partial block: rows 2j and 2j + 1 of input k."""
    full = out_features // KERNEL_BLOCK_N * KERNEL_BLOCK_N
    parts = []
    if full:
        b = packed[:full].reshape(full // KERNEL_BLOCK_N, in_features, KERNEL_BLOCK_N // 2)
        parts.append(torch.cat([b & 0xF, b >> 4], 2).transpose(1, 2).reshape(full, in_features))
    rest = out_features - full
    if rest:
        b = packed[full:].reshape(in_features, rest // 2)  # (in, rest/2)
        parts.append(torch.stack([b & 0xF, b >> 4], 2).reshape(in_features, rest).T)
    return torch.cat(parts)  # (out, in)


class Int4Linear(nn.Module):
    """Weight-only int4 Linear (no bias), group-wise scales and offsets (module docstring)."""

    def __init__(self, weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE,
                 act_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if group_size not in INT4_GROUP_SIZES or not int4_fits(weight, group_size):
            raise ValueError(f"int4 needs out_features % 16 == 0 and in_features divisible by "
                             f"a group size in {INT4_GROUP_SIZES}; got {list(weight.shape)} "
                             f"with groups of {group_size}")
        levels, scale, zero = quantize_int4(weight.cpu(), group_size)
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, INNER_K_TILES)
        if not torch.equal(unpack_cpu_int4(packed, *weight.shape).int(), levels):
            raise RuntimeError(f"torch {torch.__version__} packs int4 weights in a layout "
                               "tilevlm does not know; use --weights int8")
        self.register_buffer("weight_int4", packed.to(weight.device))  # (out, in/2) uint8
        # the kernel's [in / group, out, 2] table of (scale, zero)
        table = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", table.to(weight.device, act_dtype))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight the int4 levels stand for, in `dtype`."""
        levels = unpack_cpu_int4(self.weight_int4, self.out_features, self.in_features)
        groups = levels.view(self.out_features, -1, self.group_size).to(dtype) - 8  # (out, in/g, g)
        scale, zero = self.scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)  # (out, in/g)
        return (groups * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(self.out_features, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (M, in)
        if x.device.type == "cpu" and flat.shape[0] <= INT4_KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.weight_int4, self.group_size, self.scales_and_zeros.to(x.dtype))
        else:  # prefill (or not a CPU): one dequantisation, then a GEMM in the activations' dtype
            y = F.linear(flat, self.dequantized(x.dtype))  # (M, out)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 weights "
                f"in groups of {self.group_size}")
