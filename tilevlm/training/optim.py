"""Optimizer and learning-rate schedule: one learning rate per model part, AdamW, warmup + cosine.

A part whose learning rate is 0 is frozen: its parameters get `requires_grad=False` and are not
given to the optimizer at all. Each part is split into a decayed group (matrices, embeddings) and
an undecayed one (biases, norm scales). The schedule is a pure function of the step, so the
schedule's state is the step alone.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from tilevlm.training.lora import frozen_parameters

MODEL_PARTS = ("vision_encoder", "projector", "decoder")
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch (>= 2.4) has a fused AdamW kernel


def split_parts(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters of each part; a parameter outside the three parts is an error."""
    parts = {name: list(getattr(model, name).parameters()) for name in MODEL_PARTS}
    owned = {id(p) for params in parts.values() for p in params}
    stray = [name for name, p in model.named_parameters() if id(p) not in owned]
    if stray:
        raise ValueError(f"parameters outside {', '.join(MODEL_PARTS)} have no learning rate: "
                         f"{', '.join(stray[:5])}")
    return parts


def param_groups(model: nn.Module, lrs: dict[str, float],
                 weight_decay: float) -> list[dict]:
    """AdamW groups for the parts with lr > 0; parts with lr == 0, and the weights LoRA keeps
    frozen (`lora.frozen_parameters`), are frozen in place."""
    frozen = frozen_parameters(model)
    groups = []
    for part, params in split_parts(model).items():
        lr = lrs[part]
        for p in params:
            p.requires_grad_(lr > 0 and id(p) not in frozen)
        params = [p for p in params if p.requires_grad]
        if not params:
            continue
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for name, group, wd in ((part, decay, weight_decay), (f"{part}.no_decay", no_decay, 0.0)):
            if group:
                groups.append({"name": name, "params": group, "lr": lr, "base_lr": lr,
                               "weight_decay": wd})
    if not groups:
        raise ValueError("every learning rate is 0: nothing to train")
    return groups


def build_optimizer(model: nn.Module, lrs: dict[str, float], weight_decay: float,
                    betas: tuple[float, float], device_type: str,
                    over: Callable[[list[dict]], list[dict]] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parts, as one fused kernel on CPU and CUDA: the same update as
    the default multi-tensor one up to float rounding, in less time (docs/performance.md).
    `over`: maps the model's groups to the tensors the optimizer steps instead (fp32 masters)."""
    groups = param_groups(model, lrs, weight_decay)
    if over is not None:
        groups = over(groups)
    return torch.optim.AdamW(groups, betas=betas, fused=device_type in FUSED_ADAMW_DEVICES)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based): linear warmup
    to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Scale every group's base learning rate by `factor`; returns the largest lr set."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return max(group["lr"] for group in optimizer.param_groups)


def adamw(params: Iterable[Any], lr: float, device: torch.device | str, **kwargs: Any
          ) -> torch.optim.AdamW:
    """AdamW with the fused (one kernel for all tensors) implementation on CPU and CUDA."""
    fused = torch.device(device).type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(params, lr=lr, fused=fused, **kwargs)
