"""Per-block `torch.compile` for training, applied from outside the model (torchtitan style)."""

from __future__ import annotations

from typing import Any

from torch import nn


def check_backend(name: str) -> None:
    """A ValueError unless `name` is a torch.compile backend of this install."""
    import torch._dynamo

    if name not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"--compile {name!r}: not a torch.compile backend here; e.g. "
                         f"{', '.join(torch._dynamo.list_backends())}")


def compile_blocks(model: nn.Module, training_only: bool = True, **compile_kwargs: Any
                   ) -> nn.Module:
    """Compile every vision and decoder block in place with `nn.Module.compile`.

    Per block, not the whole model: the image-token scatter has a data-dependent check (a graph
    break) and every block has the same code, so one compiled graph serves all blocks of a stack
    and compile time stays short. `Module.compile` leaves the module, its parameters and its
    state-dict keys as they are: checkpoints and the optimizer see no difference.

    training_only: the compiled call runs while the block is in train mode; in eval mode
    (validation, generation with its KV cache, whose shapes change every call) it stays eager,
    so evaluation never waits on recompiles.
    """
    for stack in (model.vision_encoder.blocks, model.decoder.blocks):
        for block in stack:
            block.compile(**compile_kwargs)
            if training_only:
                _eager_in_eval(block)
    return model


def _eager_in_eval(block: nn.Module) -> None:
    """Eval-mode calls of a compiled block skip the compiled code.

    torch has no documented per-module switch for this (`torch.compiler.set_stance` is
    process-wide), so this wraps the private `_compiled_call_impl` that `Module.compile` sets and
    `Module.__call__` prefers; `_call_impl` is the eager call it compiled."""
    compiled, eager = block._compiled_call_impl, block._call_impl

    def call(*args: Any, **kwargs: Any) -> Any:
        return (compiled if block.training else eager)(*args, **kwargs)

    block._compiled_call_impl = call
