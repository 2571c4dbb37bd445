"""Speed paths, applied from outside the model (gpt-fast / torchtitan style).

The model files compute one thing plainly; what makes them fast on a given machine lives here:

- `inference_weights(model, "fp32" | "bf16" | "int8")`: how the weights are *stored* for
  inference. Decoding one token reads every decoder weight once, so on a CPU (or a GPU at batch
  1) the decode step is bound by memory bandwidth and the bytes per weight set the speed: bf16
  halves them, weight-only int8 quarters them. Storing bf16 is not bf16 *autocast*, which keeps
  fp32 weights and re-casts them at every step (slower than fp32).
- `compiled_decode_step()`: `torch.compile` of `generate.decode_step` for `generate(step_fn=...)`;
  `mode="reduce-overhead"` captures it as a CUDA graph (the KV cache is static, no graph breaks).
- `label_loss(model, batch)`: the training loss computing logits only where a label counts (the
  answer tokens), not over every prompt and image position: the same value, a fraction of the
  49k-wide LM-head work and memory.
- `compile_blocks(model)`: per-block `torch.compile` for training (state-dict keys unchanged).
- `adamw(...)`: AdamW with the fused kernel (CPU and CUDA).

The trainer (train.py) uses the training paths directly: `TrainConfig.compile` calls
`compile_blocks` once before building the optimizer, and its forward passes `return_logits=False`
(what `label_loss` does), so DDP sees the model's own forward.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tilevlm.generate import decode_step

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp32", "bf16", "int8")
# Up to this many rows (tokens) the CPU int8 kernel wins; from 32 rows on, measured on the
# 2-core Zen 4 for SmolLM2-135M's shapes, dequantise + bf16 GEMM is faster.
INT8_KERNEL_MAX_ROWS = 16


# ----------------------------------------------------------------------------- inference weights

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
            # prefill, dequantising once and a bf16 GEMM beats that kernel 2-3x.
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


# ----------------------------------------------------------------------------- compiled decode

def compiled_decode_step(mode: str | None = "reduce-overhead", fullgraph: bool = True,
                         backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """`generate.decode_step` under `torch.compile`, for `generate(..., step_fn=...)`.

    fullgraph=True makes a graph break an error instead of a silent slowdown. dynamic=False: the
    shapes of a decode step are fixed for a whole generation (batch, max_len), so each new
    (batch, max_len) compiles once; "reduce-overhead" then replays a CUDA graph per step (on a CPU
    it is plain inductor). The first call of each shape pays the compile time.
    """
    kwargs: dict[str, Any] = {"fullgraph": fullgraph, "dynamic": False, "backend": backend}
    if backend == "inductor" and mode is not None:
        kwargs["mode"] = mode
    return torch.compile(decode_step, **kwargs)


def decode_step_graph_breaks(model: nn.Module, batch_size: int = 1, max_len: int = 16) -> int:
    """How many graph breaks `torch._dynamo.explain` finds in one decode step of `model`."""
    device = next(model.parameters()).device
    model.decoder.setup_cache(batch_size, max_len)
    try:
        tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        positions = torch.full((batch_size,), 3, dtype=torch.long, device=device)
        mask = torch.ones(batch_size, max_len, dtype=torch.long, device=device)
        cache_position = torch.tensor([3], device=device)
        with torch.inference_mode():
            explanation = torch._dynamo.explain(decode_step)(model, tokens, positions,
                                                             cache_position, mask)
    finally:
        model.decoder.clear_cache()
    return explanation.graph_break_count


# ----------------------------------------------------------------------------- training

def label_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """`model(**batch).loss` with the 49k-wide LM head (and the cross-entropy) only at the
    positions whose next label counts: in SFT batches the answer tokens, about a fifth of the
    rows in the bench workload. Same loss up to float rounding (see `VisionLanguageModel.forward`,
    `return_logits=False`; the trainer uses that directly, so DDP sees the forward)."""
    return model(**batch, return_logits=False).loss


def compile_blocks(model: nn.Module, training_only: bool = True, **compile_kwargs: Any
                   ) -> nn.Module:
    """Compile every vision and decoder block in place (torchtitan's per-block compile).

    Per block, not the whole model: the image-token scatter has a data-dependent check (a graph
    break) and every block has the same code, so one compiled graph serves all blocks of a stack
    and compile time stays short. Only `forward` is replaced, so the state-dict keys and the
    parameters stay the same: checkpoints and the optimizer see no difference.

    training_only: the compiled forward runs while the block is in train mode; in eval mode
    (validation, generation with its KV cache, whose shapes change every call) it stays eager,
    so evaluation never waits on recompiles.
    """
    for stack in (model.vision_encoder.blocks, model.decoder.blocks):
        for block in stack:
            eager = block.forward
            compiled = torch.compile(eager, **compile_kwargs)
            if training_only:
                block.forward = _train_mode_switch(block, compiled, eager)
            else:
                block.forward = compiled
    return model


def _train_mode_switch(block: nn.Module, compiled: Callable[..., Any],
                       eager: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return (compiled if block.training else eager)(*args, **kwargs)
    return forward


def adamw(params: Iterable[Any], lr: float, device: torch.device | str, **kwargs: Any
          ) -> torch.optim.AdamW:
    """AdamW with the fused (one kernel for all tensors) implementation on CPU and CUDA."""
    from tilevlm.optim import FUSED_ADAMW_DEVICES

    fused = torch.device(device).type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(params, lr=lr, fused=fused, **kwargs)
