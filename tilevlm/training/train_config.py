"""TrainConfig: every training knob, with the one set of defaults that `train()` and the
`tilevlm train` command share. Light on purpose (no torch import): the CLI builds its flags
from these fields."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tilevlm.device import DEVICE_HELP, DTYPE_NAMES

NONFINITE_ACTIONS = ("stop", "skip")
BF16_MODES = ("autocast", "weights")


def _knob(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field with its CLI help (and choices) attached."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Every training knob, with the one set of defaults the CLI uses too."""

    steps: int = _knob(1000, "optimizer steps")
    batch_size: int = _knob(8, "samples (packed: rows) per micro-batch, per process")
    grad_accum: int = _knob(1, "micro-batches per optimizer step")
    lr_projector: float = _knob(1e-3, "projector learning rate (0 freezes it)")
    lr_vision: float = _knob(5e-5, "vision encoder learning rate (0 freezes it)")
    lr_decoder: float = _knob(5e-5, "decoder learning rate (0 freezes it)")
    weight_decay: float = _knob(0.01, "AdamW weight decay of matrices and embeddings")
    adam_beta1: float = _knob(0.9, "AdamW beta1")
    adam_beta2: float = _knob(0.95, "AdamW beta2")
    warmup_steps: int = _knob(50, "linear warmup steps")
    min_lr_ratio: float = _knob(0.1, "cosine decay ends at this fraction of each learning rate")
    grad_clip: float = _knob(1.0, "max global gradient norm (0: no clipping)")
    dtype: str = _knob("auto", "auto: bf16 autocast on CUDA, fp32 on CPU; fp32; bf16 (CPU too)",
                       DTYPE_NAMES)
    bf16_mode: str = _knob("autocast", "how a bf16 run computes: autocast (fp32 weights, ops "
                           "cast to bf16 as they run) or weights (bf16 weights for the forward "
                           "and backward, fp32 master weights in the optimizer: faster on CPUs, "
                           "less memory)", BF16_MODES)
    device: str = _knob("auto", DEVICE_HELP)
    eval_every: int = _knob(100, "validate every N steps (0: only at the end)")
    eval_batches: int = _knob(4, "validation set size, in batches")
    eval_max_new_tokens: int = _knob(16, "longest validation answer, in tokens")
    save_every: int = _knob(500, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    out_dir: str = _knob("runs/train", "checkpoints and metrics.jsonl go here")
    seed: int = _knob(0, "seed of the data order, the RNGs and the model init")
    on_nonfinite: str = _knob("stop", "a NaN/inf loss: stop with an error, or skip the update",
                              NONFINITE_ACTIONS)
    num_workers: int = _knob(0, "DataLoader worker processes (decode, resize and tile images)")
    shuffle: bool = _knob(True, "map-style data (the synthetic set): a fresh seeded order each "
                          "epoch; --no-shuffle: index order (data ordered as a curriculum)")
    pack: int = _knob(0, "dataset paths: pack samples into rows of this many tokens "
                      "(0: one sample per row)")
    max_tiles: int = _knob(64, "packing: most image tiles in one row and in one micro-batch")
    shuffle_block: int = _knob(1024, "dataset paths: rows shuffled together (a seeded shuffle "
                               "buffer per epoch; 0: file order)")
    compile: str = _knob("", "torch.compile the vision and decoder blocks for the training "
                         "step: a backend name, usually 'inductor' ('': eager)")
    activation_checkpointing: bool = _knob(False, "recompute each vision and decoder block's "
                                           "activations in the backward pass (less memory, "
                                           "about one more forward of compute)")
    fsdp: bool = _knob(False, "under torchrun, shard parameters, gradients and optimizer state "
                       "over the processes (FSDP2 fully_shard per block) instead of replicating "
                       "them (DDP); one process trains unsharded")
    lora: int = _knob(0, "LoRA rank (0: off): the vision and decoder weights stay frozen and "
                      "low-rank adapters train on the --lora-vision / --lora-decoder layers; the "
                      "projector trains in full unless --lr-projector 0")
    lora_alpha: float = _knob(16.0, "LoRA scale numerator: an adapter adds alpha / rank x B A")
    lora_dropout: float = _knob(0.0, "dropout on the adapters' inputs")
    lora_vision: str = _knob("", "vision-block layers given adapters, comma-separated, from "
                             "qkv, proj, fc1, fc2 ('': none)")
    lora_decoder: str = _knob("qkv,out,gate_up,down", "decoder-block layers given adapters, "
                              "comma-separated, from qkv, out, gate_up, down ('': none)")
    progress: bool = _knob(True, "show a progress bar (only on a terminal: a redirected log "
                           "gets loss lines instead)")
    log_every: int = _knob(10, "without a progress bar, a loss line every N steps (0: none)")

    def __post_init__(self) -> None:
        # Written so that NaN fails every check (every comparison with NaN is false).
        for name in ("steps", "batch_size", "grad_accum", "max_tiles", "eval_max_new_tokens"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_projector", "lr_vision", "lr_decoder", "weight_decay", "warmup_steps",
                     "grad_clip", "eval_every", "eval_batches", "save_every", "num_workers", "pack",
                     "shuffle_block", "log_every"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, "
                                 f"got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps > self.steps:  # the learning rate would rise all run, never decay
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is larger than steps "
                             f"({self.steps}); give --warmup-steps at most --steps (a tenth of "
                             "it is usual)")
        if self.lora:
            self.lora_spec()  # a ValueError for a bad rank, dropout or layer name
        if self.fsdp and self.lora:
            # The adapters' hooks and the merge / adapter-alone saves read unsharded weights;
            # LoRA trains few parameters, so DDP (without --fsdp) is the way to run it.
            raise ValueError("--fsdp does not support --lora: LoRA's trained state is small, "
                             "train it without --fsdp (DDP under torchrun)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"TrainConfig.dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if self.bf16_mode not in BF16_MODES:
            raise ValueError(f"TrainConfig.bf16_mode must be one of {BF16_MODES}, "
                             f"got {self.bf16_mode!r}")
        if self.bf16_mode == "weights" and self.fsdp:
            raise ValueError("--bf16-mode weights does not combine with --fsdp: FSDP keeps fp32 "
                             "master shards and computes in bf16 on its own (--dtype bf16)")
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"TrainConfig.on_nonfinite must be one of {NONFINITE_ACTIONS}, "
                             f"got {self.on_nonfinite!r}")

    def lora_spec(self) -> Any:
        """The LoRASpec of the lora_* fields, or None when --lora is 0."""
        if not self.lora:
            return None
        from tilevlm.training.lora import LoRASpec  # imports torch: this module stays light

        names = lambda text: tuple(n.strip() for n in text.split(",") if n.strip())  # noqa: E731
        return LoRASpec(self.lora, self.lora_alpha, self.lora_dropout, names(self.lora_vision),
                        names(self.lora_decoder))

    @property
    def part_lrs(self) -> dict[str, float]:
        return {"vision_encoder": self.lr_vision, "projector": self.lr_projector,
                "decoder": self.lr_decoder}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
