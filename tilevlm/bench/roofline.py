"""What bounds a step: its matrix FLOPs, counted op by op, against this machine's GEMM peak.

    flops = count_flops(step)                 # runs step() once, returns FLOPs by kind
    peak = gemm_peak(torch.bfloat16, device)  # GFLOP/s of a 2048 x 2048 matmul, measured here
    bound_s = flops.total / (peak * 1e9)      # no step of this work can be faster

Counted: every matmul, linear, convolution and attention call of the forward and the backward
pass (torch's FlopCounterMode, plus CPU's flash-attention kernels, which it does not know).
Causal attention counts half its score matrix, the half its kernels compute. Element-wise work
(norms, activations, the optimizer) counts nothing: it is what the bound leaves out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import flop_counter

from tilevlm.bench.timing import sync

aten = torch.ops.aten
ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_flash_attention_for_cpu_backward",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_flash_attention_forward",
                 "_efficient_attention_forward")
PEAK_SIDE = 2048  # the square matmul gemm_peak times


@dataclass
class StepFlops:
    matmul: int  # linears, matmuls, convolutions
    attention: int  # the score and value products inside attention kernels

    @property
    def total(self) -> int:
        return self.matmul + self.attention


def _cpu_flash_forward(q_shape, k_shape, v_shape, dropout_p=0.0, is_causal=False, *args,
                       **kwargs) -> int:
    flops = flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)
    return flops // 2 if is_causal else flops


def _cpu_flash_backward(grad_shape, q_shape, k_shape, v_shape, _out, _logsumexp,
                        dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    flops = flop_counter.sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)
    return flops // 2 if is_causal else flops


def count_flops(fn: Callable[[], Any]) -> StepFlops:
    """Run fn() once and count the FLOPs of its matrix work (forward and backward)."""
    mode = flop_counter.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward})
    with mode:
        fn()
    matmul = attention = 0
    for op, count in mode.get_flop_counts().get("Global", {}).items():
        name = getattr(op, "__name__", str(op)).split(".")[0]
        if any(name.startswith(a) for a in ATTENTION_OPS):
            attention += count
        else:
            matmul += count
    return StepFlops(matmul=matmul, attention=attention)


def gemm_peak(dtype: torch.dtype, device: torch.device, seconds: float = 1.5) -> float:
    """Best GFLOP/s of a PEAK_SIDE^2 matmul in `dtype` on `device` (its current threads).

    Into one output buffer (no allocation inside the timing), the best of `seconds` of runs: on
    a shared machine a neighbour's burst lowers some runs, never the best of many."""
    a = torch.randn(PEAK_SIDE, PEAK_SIDE, device=device).to(dtype)
    b = torch.randn(PEAK_SIDE, PEAK_SIDE, device=device).to(dtype)
    out = torch.empty(PEAK_SIDE, PEAK_SIDE, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # first call: kernel selection
    sync(device)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * PEAK_SIDE**3 / best / 1e9
