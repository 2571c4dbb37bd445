"""How the weights are *stored* for inference: fp32, bf16, weight-only int8 or int4.

Decoding one token reads every decoder weight once, so on a CPU (or a GPU at batch 1) the decode
step is bound by memory bandwidth and the bytes per weight set the speed: bf16 halves them,
weight-only int8 quarters them, group-wise int4 (`int4.py`) takes about a sixth. Storing bf16 is
not bf16 *autocast*, which keeps fp32 weights and re-casts them at every step. Applied from
outside the model (gpt-fast style).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tilevlm.inference.int4 import INT4_GROUP_SIZE, Int4Linear, int4_fits

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4")
# Up to this many rows (tokens) the CPU int8 kernel wins; above it dequantise + bf16 GEMM is
# faster (docs/performance.md has the measurement).
INT8_KERNEL_MAX_ROWS = 16


class Int8Linear(nn.Module):
    """Weight-only int8 Linear (no bias): int8 rows with one scale per output feature.

    Activations keep their dtype; y = (x @ q.T) * scale. Symmetric per-row quantisation, so the
    weight error is at most scale / 2 = max|w_row| / 254 per entry.
    """

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        w = weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(act_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (M, in)
        scale = self.scale.to(x.dtype)
        if x.device.type == "cpu" and flat.shape[0] <= INT8_KERNEL_MAX_ROWS:
            # A decode step: the fused int8-weight kernel reads a quarter of the fp32 bytes.
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, scale)  # (M, out)
        else:  # gpt-fast's form (inductor fuses the dequantisation into the matmul); on a CPU
            # prefill, dequantising once and a bf16 GEMM beats that kernel, made for few rows
            # (docs/performance.md has the figures).
            y = F.linear(flat, self.weight_int8.to(x.dtype)) * scale  # (M, out)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def _int8(weight: torch.Tensor) -> nn.Module:
    return Int8Linear(weight, torch.bfloat16)


def _int4_else_int8(group_size: int) -> Callable[[torch.Tensor], nn.Module]:
    """Int4 where the CPU kernel takes the shape, else int8 (e.g. a tiny model's odd widths)."""
    def make(weight: torch.Tensor) -> nn.Module:
        if int4_fits(weight, group_size):
            return Int4Linear(weight, group_size, torch.bfloat16)
        return _int8(weight)
    return make


def _quantize_linears(module: nn.Module, make: Callable[[torch.Tensor], nn.Module]) -> int:
    """Replace every bias-free nn.Linear under `module` by make(its weight); returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(module, name, make(child.weight))
            count += 1
        else:
            count += _quantize_linears(child, make)
    return count


@torch.no_grad()
def inference_weights(model: nn.Module, weights: str = "fp32",
                      int4_group_size: int = INT4_GROUP_SIZE) -> nn.Module:
    """Store `model`'s weights for inference, in place; returns the model (in eval mode).

    fp32: as is. bf16: every weight in bf16 (the KV cache follows; RMSNorm still normalises in
    fp32). int8: bf16, then the decoder's Linear layers and its LM head as weight-only int8 (the
    tied embedding stays bf16 for the lookup; the head gets its own int8 copy). int4: the same
    with the blocks' Linear layers as group-wise int4 (int8 where a width does not fit its
    kernel) and the LM head in int8, as llama.cpp's q4_0 files keep their output matrix at a
    higher precision (the logits are the most sensitive product). An int8 or int4 model is for
    generation only: it cannot be trained or saved with `save_pretrained`.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    model.eval()
    if weights == "fp32":
        return model.float()
    model.to(torch.bfloat16)
    if weights in ("int8", "int4"):
        decoder = model.decoder
        make = _int8 if weights == "int8" else _int4_else_int8(int4_group_size)
        n = _quantize_linears(decoder.blocks, make)
        # decoder.logits() calls the head module, so an int8 copy of the (tied) head replaces it
        decoder.lm_head = _int8(decoder.lm_head_weight)
        log.info("%s weight-only: %d decoder Linear layers + the LM head in int8", weights, n)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (what a decode step streams, roughly)."""
    tensors = list(model.parameters()) + [b for b in model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
