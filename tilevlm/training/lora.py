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
from safetensors.torch import save_file
from torch import nn

from tilevlm.files import json_field, read_json_object
from tilevlm.weights.safetensors_files import read_safetensors, read_shapes
from tilevlm.weights.run_folder import ADAPTER_DIR  # noqa: F401  (OUT/adapter/ of a LoRA run)

ADAPTED_PARTS = ("vision_encoder", "decoder")
TARGETS = {"vision_encoder": ("qkv", "proj", "fc1", "fc2"),
           "decoder": ("qkv", "out", "gate_up", "down")}
ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MAX_RANK = 65536  # far above any useful rank; a larger one is an error, not an allocation


@dataclass(frozen=True)
class LoRASpec:
    """Rank, scale, dropout and the Linear names adapted in each part's blocks."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    vision: tuple[str, ...] = ()
    decoder: tuple[str, ...] = TARGETS["decoder"]

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"the LoRA rank must be in 1..{MAX_RANK}, got {self.rank}")
        if not math.isfinite(self.alpha):  # NaN would merge into NaN weights
            raise ValueError(f"--lora-alpha must be a finite number, got {self.alpha}")
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
    def from_dict(cls, data: dict, where: str | Path = ADAPTER_CONFIG) -> "LoRASpec":
        """The spec of an adapter_config.json we may not have written: every field checked for
        type and range, a ValueError naming the file and the field."""
        rank = json_field(data, "rank", "int", where, low=1, high=MAX_RANK)
        alpha = json_field(data, "alpha", "number", where)
        dropout = json_field(data, "dropout", "number", where, 0.0, low=0)
        names = {}
        for part in ("vision", "decoder"):
            value = json_field(data, part, "list", where)
            if not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: {part} must be a list of layer names, got "
                                 f"{value!r:.60}")
            names[part] = tuple(value)
        try:
            return cls(rank, float(alpha), float(dropout), names["vision"], names["decoder"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


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


def read_adapter_config(directory: str | Path) -> LoRASpec:
    """The LoRASpec of an adapter directory's adapter_config.json, checked (`from_dict`)."""
    config = Path(directory) / ADAPTER_CONFIG
    return LoRASpec.from_dict(read_json_object(config), config)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the adapter saved in `directory` to a base `model` (in place); returns it. The
    config, then the tensors' names and shapes (from the header, before any adapter is made),
    then their values (finite) are checked: a ValueError naming the file otherwise."""
    directory = Path(directory)
    spec = read_adapter_config(directory)
    path = directory / ADAPTER_TENSORS
    _check_adapter_shapes(model, spec, read_shapes(directory, files=[path]), path)
    tensors = read_safetensors(directory, files=[path])
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path}: non-finite values (NaN or inf) in {', '.join(bad[:3])}")
    apply_lora(model, spec)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return model


def _check_adapter_shapes(model: nn.Module, spec: LoRASpec, shapes: dict[str, tuple[int, ...]],
                          path: Path) -> None:
    """Every tensor of the file is an adapter the spec gives this model (with its rank) or one
    of the model's own parameters, at its shape; every adapter of the spec is in the file."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    adapters = _adapter_shapes(model, spec)
    expected.update(adapters)
    wrong = [f"{k} {list(v)} (expected {list(expected[k])})" if k in expected else
             f"{k} (not in this model)" for k, v in shapes.items() if expected.get(k) != tuple(v)]
    missing = sorted(set(adapters) - set(shapes))
    if wrong or missing:
        raise ValueError(f"{path}: the adapter does not fit this model with rank {spec.rank}: "
                         + "; ".join(x for x in (", ".join(wrong[:3]),
                                                 f"missing {', '.join(missing[:3])}" if missing
                                                 else "") if x))


def _adapter_shapes(model: nn.Module, spec: LoRASpec) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes the adapters of `spec` take in `model`."""
    shapes = {}
    for part in ADAPTED_PARTS:
        names = spec.targets(part)
        for name, module in getattr(model, part).blocks.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in names:
                out, inp = module.weight.shape
                shapes[f"{part}.blocks.{name}.lora.a"] = (spec.rank, inp)
                shapes[f"{part}.blocks.{name}.lora.b"] = (out, spec.rank)
    return shapes


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
