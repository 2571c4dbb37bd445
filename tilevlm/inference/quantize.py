"""How the weights are *stored* for inference: fp32, bf16, or weight-only int8.

Decoding one token reads every decoder weight once, so on a CPU (or a GPU at batch 1) the decode
step is bound by memory bandwidth and the bytes per weight set the speed: bf16 halves them,
weight-only int8 quarters them. Storing bf16 is not bf16 *autocast*, which keeps fp32 weights and
re-casts them at every step. Applied from outside the model (gpt-fast style).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp32", "bf16", "int8")
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


def _quantize_linears(module: nn.Module, act_dtype: torch.dtype) -> int:
    """Replace every bias-free nn.Linear under `module` by an Int8Linear; returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(module, name, Int8Linear(child.weight, act_dtype))
            count += 1
        else:
            count += _quantize_linears(child, act_dtype)
    return count


@torch.no_grad()
def inference_weights(model: nn.Module, weights: str = "fp32") -> nn.Module:
    """Store `model`'s weights for inference, in place; returns the model (in eval mode).

    fp32: as is. bf16: every weight in bf16 (the KV cache follows; RMSNorm still normalises in
    fp32). int8: bf16, then the decoder's Linear layers and its LM head as weight-only int8 (the
    tied embedding stays bf16 for the lookup; the head gets its own int8 copy). An int8 model is
    for generation only: it cannot be trained or saved with `save_pretrained`.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    model.eval()
    if weights == "fp32":
        return model.float()
    model.to(torch.bfloat16)
    if weights == "int8":
        decoder = model.decoder
        n = _quantize_linears(decoder.blocks, torch.bfloat16)
        # decoder.logits() calls the head module, so an int8 copy of the (tied) head replaces it
        decoder.lm_head = Int8Linear(decoder.lm_head_weight, torch.bfloat16)
        log.info("int8 weight-only: %d decoder Linear layers + the LM head", n)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (what a decode step streams, roughly)."""
    tensors = list(model.parameters()) + [b for b in model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
