"""What `tilevlm train` / `eval` read: the built-in `synthetic` source (map-style, by name) or a
local dataset path (parquet, save_to_disk, LLaVA; streamed through `tilevlm.data.readers`).

    data = training_data("synthetic", "train", 100_000, config)       # a SyntheticVQA
    data = training_data("cauldron/ai2d", "train", 0, config)         # a DatasetSpec
    reader = data.open(rank, world_size)                              # this rank's RowReader

`named_dataset` is the by-name lookup; `tilevlm.data.readers.open_dataset` reads a path.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from tilevlm.config import VLMConfig
from tilevlm.data.lengths import LengthFilter
from tilevlm.data.readers.dataset import open_dataset
from tilevlm.data.synthetic import SyntheticSpec, SyntheticVQA, corpus_texts
from tilevlm.preprocessing.tokenizer import train_bpe_tokenizer

log = logging.getLogger(__name__)

SOURCES = ("synthetic",)
SYNTHETIC_VOCAB_SIZE = 512  # base vocabulary of the BPE trained for the synthetic data


@dataclass(frozen=True)
class DatasetSpec:
    """A local dataset path and how to read it; `open` gives one rank's reader. Picklable, so
    DataLoader workers can open their own readers."""

    path: str
    data_format: str | None = None  # parquet | hf | llava; None: detected from the path
    image_root: str | None = None
    split: str = "train"  # the split of a saved DatasetDict

    def open(self, rank: int = 0, world_size: int = 1) -> Any:
        return open_dataset(self.path, self.data_format, self.image_root, rank=rank,
                            world_size=world_size, split=self.split)

    def first_samples(self, n: int, processor: Any) -> list[dict[str, Any]]:
        """The first `n` usable samples (header-checked, within lm_max_length), e.g. for
        validation."""
        return list(itertools.islice(LengthFilter(self.open(), processor), n))


def synthetic_spec(config: VLMConfig, seed: int = 0) -> SyntheticSpec:
    """Synthetic images with the model's tile size and up to its largest grid (8 at most)."""
    return SyntheticSpec(tile_size=config.vit_img_size,
                         max_grid=max(1, min(8, config.max_tiles_per_side)), seed=seed)


def named_dataset(source: str, split: str, n: int, config: VLMConfig) -> Sequence[dict[str, Any]]:
    """`n` raw samples of `split` from a named source (map-style)."""
    if source == "synthetic":
        return SyntheticVQA(split, n, synthetic_spec(config))
    raise ValueError(f"unknown data source {source!r}; available: {', '.join(SOURCES)}, "
                     "or a dataset path")


def training_data(data: str, split: str, n: int, config: VLMConfig,
                  data_format: str | None = None,
                  image_root: str | None = None) -> Sequence[dict[str, Any]] | DatasetSpec:
    """A named source (map-style samples) or, for anything else, a `DatasetSpec` of the path,
    checked now (format detected, files readable) so a wrong path fails before training."""
    if data in SOURCES and data_format is None:
        return named_dataset(data, split, n, config)
    spec = DatasetSpec(data, data_format, image_root, split)
    spec.open()  # raises a ValueError that says what was expected
    return spec


def synthetic_tokenizer(config: VLMConfig) -> tuple[Any, VLMConfig]:
    """A BPE trained on everything the synthetic data can say, and the config with
    `lm_base_vocab_size` set to its base vocabulary."""
    tokenizer = train_bpe_tokenizer(corpus_texts(synthetic_spec(config).max_grid),
                                    vocab_size=SYNTHETIC_VOCAB_SIZE, grid_side=config.grid_side)
    if config.lm_base_vocab_size != tokenizer.base_vocab_size:
        log.info("synthetic data: lm_base_vocab_size %d -> %d (the trained BPE's)",
                 config.lm_base_vocab_size, tokenizer.base_vocab_size)
        config = config.replace(lm_base_vocab_size=tokenizer.base_vocab_size)
    return tokenizer, config
