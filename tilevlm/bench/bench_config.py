"""What `tilevlm bench` measures and how: the workload's sizes, precisions, repeats, parts and
peer (`BenchConfig`), validated before anything is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tilevlm.bench.workload import idefics3_token_ids
from tilevlm.config import VLMConfig, preset
from tilevlm.device import resolve_dtype
from tilevlm.inference.quantize import WEIGHT_FORMATS
from tilevlm.special_tokens import get_layout
from tilevlm.training.train_config import BF16_MODES

BENCH_PARTS = ("preprocess", "vision", "train", "prefill", "decode")
PEERS = ("transformers", "llama.cpp")  # what `--peer` can compare with (bench/peer_*.py)


@dataclass
class BenchConfig:
    preset: str = "original_small"
    max_img_size: int | None = None  # None: 2 x the tile size (a 2x2 grid + global tile)
    device: str = "cpu"
    dtype: str = "auto"  # a `tilevlm.device.DTYPE_NAMES` name ("auto": that module's rule)
    weights: str | None = None  # a `quantize.WEIGHT_FORMATS` name for inference; None: the dtype
    compile: bool = False  # torch.compile the decode step (generation.compiled_decode_step)
    compile_train: bool = False  # torch.compile every block for the training step
    baseline: bool = False  # also time prefill and decode with fp32 weights, eager, same run
    train_loss: str = "labels"  # "labels": logits at label positions only; "full": model().loss
    bf16_mode: str = "autocast"  # a bf16 training step: "autocast" or "weights" (TrainConfig's)
    threads: int | None = None  # torch intra-op threads; None: torch's default (the cores)
    repeats: int = 3
    warmup: int = 1
    train_batch: int = 4
    prompt_tokens: int = 24
    answer_tokens: int = 64
    decode_tokens: int = 64
    decode_batches: tuple[int, ...] = (1, 8)
    bandwidth_mib: int = 1024  # the buffer the memory bandwidth is measured with (bandwidth.py)
    vision_tiles: int = 20
    preprocess_images: int = 40
    preprocess_threads: int | None = None  # the parallel figure's threads; None: the cores (<= 4)
    parts: tuple[str, ...] = BENCH_PARTS
    seed: int = 0
    peer: str | None = None  # one of PEERS: prefill and decode against it (peer_*.py)
    llama_cpp: str | None = None  # --peer llama.cpp: the llama.cpp checkout (peer_llama_cpp.py)
    llama_cpp_bin: str | None = None  # its binaries; None: <llama_cpp>/build/bin
    overrides: dict[str, Any] = field(default_factory=dict)  # VLMConfig fields over the preset's

    def model_config(self) -> VLMConfig:
        base = preset(self.preset, **self.overrides)
        # a layout whose tokens are the tokenizer's own keeps the preset's vocabulary size
        keep = {} if get_layout(base.image_token_layout).appended else {
            "lm_vocab_size": base.lm_vocab_size}
        return base.replace(max_img_size=self.max_img_size or 2 * base.vit_img_size, **keep)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        return resolve_dtype(self.dtype, device)

    def validate(self) -> None:
        """A ValueError (one line) for a field out of its range; the peer's own needs are
        checked by its module (`check_peer`)."""
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        if self.bandwidth_mib < 1:
            raise ValueError(f"bandwidth_mib must be >= 1, got {self.bandwidth_mib}")
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, "
                             f"got {self.weights!r}")
        for name in ("threads", "preprocess_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.bf16_mode not in BF16_MODES:
            raise ValueError(f"bf16_mode must be one of {', '.join(BF16_MODES)}, "
                             f"got {self.bf16_mode!r}")
        if self.train_loss not in ("labels", "full"):
            raise ValueError(f"train_loss must be 'labels' or 'full', got {self.train_loss!r}")
        unknown = set(self.parts) - set(BENCH_PARTS)
        if unknown:
            raise ValueError(f"unknown bench parts {sorted(unknown)}; choose from "
                             f"{', '.join(BENCH_PARTS)}")
        if self.peer is not None:
            self._check_peer()
        if (self.llama_cpp or self.llama_cpp_bin) and self.peer != "llama.cpp":
            raise ValueError("--llama-cpp and --llama-cpp-bin are for --peer llama.cpp")

    def _check_peer(self) -> None:
        """The comparison runs Idefics3ForConditionalGeneration (or its converted weights): an
        Idefics3-shaped preset whose images the bench can write, and prefill or decode."""
        if self.peer not in PEERS:
            raise ValueError(f"--peer must be one of {', '.join(PEERS)}, got {self.peer!r}")
        cfg = self.model_config()
        if (cfg.image_token_layout, cfg.image_rule) != ("idefics3", "idefics3"):
            raise ValueError(f"--peer {self.peer} runs Idefics3ForConditionalGeneration, which "
                             f"needs an Idefics3-shaped preset (--preset smolvlm_256m); "
                             f"{self.preset} writes images in the {cfg.image_token_layout!r} "
                             "layout")
        idefics3_token_ids(cfg)  # the bench can write its images
        if not {"prefill", "decode"} & set(self.parts):
            raise ValueError(f"--peer {self.peer} compares prefill and decode: add them to --parts")
        if self.baseline:
            raise ValueError(f"--peer {self.peer} already times fp32 weights; drop --baseline")
        if self.peer == "llama.cpp" and not self.llama_cpp:
            raise ValueError("--peer llama.cpp needs --llama-cpp DIR: a llama.cpp checkout with "
                             "its binaries built")
