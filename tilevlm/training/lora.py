"""LoRA: low-rank adapters on chosen Linear layers of the vision tower and the decoder, applied
from outside the model (the model files know nothing of them).

An adapted `nn.Linear` keeps its weight (and state-dict key) and gains a child `lora` holding
`a` (rank x in) and `b` (out x rank, zero at the start), and a forward hook adding
`dropout(x) @ a.T @ b.T * alpha / rank` to its output. A fused layer (the decoder's `qkv` and
`gate_up`, the vision `qkv`) gets one adapter over its whole output, as `peft` does for fused
projections. `merge_lora` folds every adapter into its weight and removes it: a plain model.

Under LoRA the vision and decoder weights are frozen (`frozen_parameters`); the projector, new in
a built model, trains in full at --lr-projector (0 freezes it too). `adapter_tensors` is what an
adapter directory holds: the `lora` tensors and every other tensor that trained.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tilevlm.files import read_json_object
from tilevlm.weights.run_folder import ADAPTER_DIR  # noqa: F401  (OUT/adapter/ of a LoRA run)

ADAPTED_PARTS = ("vision_encoder", "decoder")
TARGETS = {"vision_encoder": ("qkv", "proj", "fc1", "fc2"),
           "decoder": ("qkv", "out", "gate_up", "down")}
ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoRASpec:
    """Rank, scale, dropout and the Linear names adapted in each part's blocks."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    vision: tuple[str, ...] = ()
    decoder: tuple[str, ...] = TARGETS["decoder"]

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"the LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        for part, names in (("vision_encoder", self.vision), ("decoder", self.decoder)):
            unknown = sorted(set(names) - set(TARGETS[part]))
            if unknown:
                raise ValueError(f"no {', '.join(unknown)} layer in the {part} blocks; choose "
                                 f"from {', '.join(TARGETS[part])}")
        if not (self.vision or self.decoder):
            raise ValueError("LoRA with no target layer in either part: name some")

    def targets(self, part: str) -> tuple[str, ...]:
        return self.vision if part == "vision_encoder" else self.decoder

    @classmethod
    def from_dict(cls, data: dict) -> "LoRASpec":
        return cls(int(data["rank"]), float(data["alpha"]), float(data["dropout"]),
                   tuple(data["vision"]), tuple(data["decoder"]))


class LoRA(nn.Module):
    """The adapter of one Linear layer: delta(x) = dropout(x) @ a.T @ b.T * alpha / rank."""

    def __init__(self, linear: nn.Linear, spec: LoRASpec) -> None:
        super().__init__()
        weight = linear.weight
        self.a = nn.Parameter(torch.empty(spec.rank, weight.shape[1], dtype=weight.dtype,
                                          device=weight.device))
        self.b = nn.Parameter(torch.zeros(weight.shape[0], spec.rank, dtype=weight.dtype,
                                          device=weight.device))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))  # as nn.Linear (and peft) initialise
        self.dropout = nn.Dropout(spec.dropout)
        self.scale = spec.alpha / spec.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.a.T) @ self.b.T * self.scale  # (..., out)

    def weight_delta(self) -> torch.Tensor:
        return (self.b @ self.a) * self.scale  # (out, in)


def _add_delta(linear: nn.Linear, inputs: tuple[torch.Tensor, ...],
               output: torch.Tensor) -> torch.Tensor:
    return output + linear.lora(inputs[0])


def _targets(model: nn.Module, spec: LoRASpec) -> list[nn.Linear]:
    found = []
    for part in ADAPTED_PARTS:
        names = spec.targets(part)
        for name, module in getattr(model, part).blocks.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in names:
                found.append(module)
    return found


def apply_lora(model: nn.Module, spec: LoRASpec) -> nn.Module:
    """Add adapters to `model` in place (see the module docstring); returns it."""
    if getattr(model, "lora_spec", None) is not None:
        raise ValueError("this model already has LoRA adapters")
    for linear in _targets(model, spec):
        linear.add_module("lora", LoRA(linear, spec))
        linear.register_forward_hook(_add_delta)
    model.lora_spec = spec
    return model


def frozen_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters LoRA keeps frozen: every vision and decoder tensor but the
    adapters' (none without LoRA)."""
    if getattr(model, "lora_spec", None) is None:
        return set()
    return {id(p) for part in ADAPTED_PARTS for name, p in getattr(model, part).named_parameters()
            if ".lora." not in f".{name}"}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters, and every other tensor that trains (the projector unless frozen)."""
    frozen = frozen_parameters(model)
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if id(p) not in frozen and p.requires_grad}


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """`adapter.safetensors` + `adapter_config.json` (the LoRASpec) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(model), str(directory / ADAPTER_TENSORS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(asdict(model.lora_spec), indent=2) + "\n")
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the adapter saved in `directory` to a base `model` (in place); returns it."""
    directory = Path(directory)
    try:
        spec = LoRASpec.from_dict(read_json_object(directory / ADAPTER_CONFIG))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: not a LoRA adapter config ({e})") from None
    apply_lora(model, spec)
    tensors = load_file(str(directory / ADAPTER_TENSORS))
    own = dict(model.named_parameters())
    wrong = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{directory}: the adapter does not fit this model ({', '.join(wrong[:3])})")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and remove it: a plain model (in place)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and hasattr(module, "lora"):
            module.weight += module.lora.weight_delta().to(module.weight.dtype)
            for key, hook in list(module._forward_hooks.items()):  # by identity: a deep copy
                if hook is _add_delta:  # of the model has its own hook dicts, no handles
                    del module._forward_hooks[key]
            del module.lora
    model.lora_spec = None
    return model
