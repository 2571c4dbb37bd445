"""Per-block activation checkpointing, applied from outside the model (torchtitan style).

Each vision and decoder block keeps only its input during the forward pass and recomputes its
activations in the backward pass (`torch.utils.checkpoint`, non-reentrant): less memory per
block for about one more forward's compute. The block's class is swapped for a subclass whose
`forward` runs the original one under `checkpoint` (as FSDP2's `fully_shard` swaps classes), so
the module tree, the parameters and the state-dict keys stay exactly as they were, and a
`copy.deepcopy` of the model stays checkpointed on its own weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_SUBCLASSES: dict[type, type] = {}


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Checkpoint every vision and decoder block of `model`, in place; returns `model`."""
    for stack in (model.vision_encoder.blocks, model.decoder.blocks):
        for block in stack:
            block.__class__ = _checkpointed(type(block))
    return model


def is_checkpointed(block: nn.Module) -> bool:
    return type(block) in _SUBCLASSES.values()


def _checkpointed(cls: type) -> type:
    """`cls` with its forward under `checkpoint` while training with gradients (one subclass
    per block class)."""
    if cls in _SUBCLASSES.values():
        return cls
    if cls not in _SUBCLASSES:
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            inner = super(subclass, self).forward
            # Evaluation and generation (no_grad / inference_mode, a KV cache written in place)
            # have nothing to recompute: they run the block as it is.
            if not (self.training and torch.is_grad_enabled()):
                return inner(*args, **kwargs)
            # Non-reentrant: works with inputs that need no grad, with kwargs and under
            # torch.compile; the RNG state is kept, so LoRA dropout recomputes the same mask.
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)

        subclass = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})
        _SUBCLASSES[cls] = subclass
    return _SUBCLASSES[cls]
