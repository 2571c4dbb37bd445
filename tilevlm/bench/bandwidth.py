"""What bounds a decode step: the bytes of weights it reads, against this machine's memory
bandwidth (the decode part's roofline, as `roofline.py` is the training step's).

    gbps = memory_bandwidth(device)                 # GB/s of a large copy, measured here
    step_bytes = decode_weight_bytes(model)         # weights one decode step reads
    bound = gbps * 1e9 / step_bytes                 # decode steps a second no code can beat

A decode step at batch B reads every decoder weight once for the whole batch (the blocks, the
final norm and the LM head; the embedding lookup reads B rows, left out), so the bound is in
steps a second: B x that in tokens. The bandwidth is a STREAM-style copy of a buffer larger
than the caches, read + write bytes counted (the issue's figures count them so), the best of a
few copies on the current threads.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tilevlm.bench.timing import sync

BANDWIDTH_MIB = 1024  # the copied buffer: larger than any CPU's cache we run on
BANDWIDTH_COPIES = 5


def memory_bandwidth(device: torch.device, mib: int = BANDWIDTH_MIB,
                     copies: int = BANDWIDTH_COPIES) -> float:
    """Read + write GB/s of the best of `copies` copies of a `mib` MiB buffer on `device`."""
    src = torch.ones(mib * 2**18, device=device)  # fp32: 4 bytes an element
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: the pages are mapped before any timing
    sync(device)
    best = float("inf")
    for _ in range(copies):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


def _weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, an attached KV cache left out."""
    tensors = list(module.parameters()) + [b for name, b in module.named_buffers()
                                           if "kv_cache." not in name]
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: the decoder's blocks, final norm and LM head (its
    own module when it has one, e.g. a quantised copy of a tied head; else the embedding)."""
    decoder = model.decoder
    head = decoder.lm_head if decoder.lm_head is not None else decoder.token_embedding
    return sum(_weight_bytes(m) for m in (*decoder.blocks, decoder.norm, head))


def decode_roofline(tokens_per_s: float, batch: int, step_bytes: int, gbps: float
                    ) -> dict[str, float]:
    """The bound of a decode figure and how close it comes (fields for the bench's JSON)."""
    bound_steps = gbps * 1e9 / step_bytes
    return {"weight_mb_per_step": step_bytes / 1e6, "bandwidth_gbps": gbps,
            "bound_tokens_per_s": bound_steps * batch,
            "bound_fraction": tokens_per_s / (bound_steps * batch)}
