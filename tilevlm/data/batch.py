"""The micro-batch the trainer consumes: the model's inputs, and beside them what the data
pipeline reports (samples dropped on the way, by reason; from a stream, where it now stands).

    batch = VLMCollator(processor)(samples)        # or PackedCollator, or a TrainStream
    if not batch.empty:
        loss = model(**batch.inputs_on(device)).loss
    batch.skipped                                   # {"image_error": 1, ...}

A batch with nothing usable left is `empty` (no inputs) but still carries its counts and stream
position, so nothing that was drawn goes uncounted. A `TrainBatch` crosses DataLoader worker
processes as it is (a dataclass pickles) and pins its inputs itself (`pin_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tilevlm.config import IGNORE_INDEX

# The keyword arguments of the model's forward that a batch provides.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values")
OTHER = "other"  # the skip reason of a sample dropped without a named one (map-style data)


@dataclass(frozen=True, order=True)
class StreamPosition:
    """Where a training stream (`data.stream.TrainStream`) stands: an epoch, a block of its rows,
    and the micro-batches of that block already consumed."""

    epoch: int = 0
    block: int = 0
    plans: int = 0  # micro-batches of the block already consumed

    def to_list(self) -> list[int]:
        return [self.epoch, self.block, self.plans]


def padding_fraction(real_tokens: int, slots: int) -> float:
    """The share of token slots that are padding (0 when there are none)."""
    return 1.0 - real_tokens / slots if slots else 0.0


@dataclass
class TrainBatch:
    """One micro-batch: what the model takes and what the trainer counts."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # model(**inputs); {}: empty
    n_samples: int = 0  # samples in the batch (packed: several per row)
    n_real_tokens: int = 0  # the input tokens that are not padding
    skipped: dict[str, int] = field(default_factory=dict)  # samples dropped on the way, by reason
    stream: StreamPosition | None = None  # a stream's position once this batch is consumed
    info: dict[str, Any] = field(default_factory=dict)  # n_tiles, grids, segment_ids, sources

    @classmethod
    def of(cls, tensors: dict[str, Any], n_samples: int | None = None,
           n_real_tokens: int | None = None, **rest: Any) -> "TrainBatch":
        """A processor-style dict split into model inputs (None ones left out) and `info`;
        by default one sample per row and the 2-D attention mask's tokens are the real ones."""
        inputs = {k: v for k, v in tensors.items() if k in MODEL_INPUTS and v is not None}
        info = {k: v for k, v in tensors.items() if k not in MODEL_INPUTS}
        if n_samples is None:
            n_samples = inputs["input_ids"].shape[0]
        if n_real_tokens is None:
            n_real_tokens = _real_tokens(inputs)
        return cls(inputs, n_samples, n_real_tokens, info=info, **rest)

    @property
    def empty(self) -> bool:
        return not self.inputs

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def rows(self) -> int:
        return self.inputs["input_ids"].shape[0]

    @property
    def slots(self) -> int:
        """Token slots, padding included: rows x padded length."""
        return self.inputs["input_ids"].numel()

    def label_count(self) -> int:
        """Tokens the loss counts: labels that are not ignored, after the one-token shift."""
        return int((self.inputs["labels"][:, 1:] != IGNORE_INDEX).sum())

    def inputs_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}

    def pin_memory(self) -> "TrainBatch":
        """What a DataLoader with `pin_memory=True` calls: the inputs (what goes to the device)
        in page-locked memory."""
        return replace(self, inputs={k: v.pin_memory() for k, v in self.inputs.items()})


def _real_tokens(inputs: dict[str, torch.Tensor]) -> int:
    """Tokens the 2-D attention mask keeps; every slot without one."""
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return inputs["input_ids"].numel()
