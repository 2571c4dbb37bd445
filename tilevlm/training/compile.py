"""Per-block `torch.compile` for training, applied from outside the model (torchtitan style)."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn
import torch


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
