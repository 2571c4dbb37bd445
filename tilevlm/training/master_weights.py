"""bf16 training with fp32 master weights (`TrainConfig.bf16_mode = "weights"`).

Autocast keeps the model in fp32 and casts, op by op, every weight it multiplies (once per
forward) and every activation that crosses between a bf16 matmul and an fp32 op; on a CPU those
copies and the fp32 element-wise passes are a large part of a step (docs/performance.md). Here
the model itself holds bf16 weights, so the forward and backward run in bf16 throughout (norms
still normalise in fp32 inside), and the optimizer steps fp32 copies:

    master = MasterWeights(model)              # model -> bf16; fp32 masters of every parameter
    optimizer = AdamW(master.groups(groups))   # the same groups, over the masters
    ... loss.backward()
    master.grads_to_masters()                  # bf16 grads -> fp32 master grads
    optimizer.step(); master.masters_to_weights()
    with master.fp32_weights(): save(model)    # checkpoints hold the fp32 masters

Frozen parameters get masters too, so a saved model never holds bf16-rounded frozen weights.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


class MasterWeights:
    def __init__(self, model: nn.Module) -> None:
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        for p in model.parameters():
            master = nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
            p.data = p.data.to(torch.bfloat16)
            self.pairs.append((p, master))
        self._master_of = {id(p): m for p, m in self.pairs}

    def groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Optimizer groups of model parameters -> the same groups over their masters (whose
        requires_grad follows the model's, as the groups froze it)."""
        for p, master in self.pairs:
            master.requires_grad_(p.requires_grad)
        return [{**g, "params": [self._master_of[id(p)] for p in g["params"]]} for g in groups]

    def trainable(self) -> list[nn.Parameter]:
        return [m for _, m in self.pairs if m.requires_grad]

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """Move the backward's bf16 gradients onto the masters, in fp32 (the model's are freed)."""
        for p, master in self.pairs:
            if p.grad is not None:
                master.grad = p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_weights(self) -> None:
        """The updated masters, rounded to bf16, become the model's weights."""
        for p, master in self.pairs:
            if master.requires_grad:
                p.copy_(master)

    @contextlib.contextmanager
    def fp32_weights(self) -> Iterator[None]:
        """The model holds its fp32 masters (the same storage) while the block runs: what a
        checkpoint or a shared model saves."""
        for p, master in self.pairs:
            p.data = master.data
        try:
            yield
        finally:
            for p, master in self.pairs:
                p.data = master.data.to(torch.bfloat16)
