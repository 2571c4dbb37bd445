"""Named data sources for the `train` and `eval` commands; only `synthetic` for now (dataset
readers for real data plug in here)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from tilevlm.config import VLMConfig
from tilevlm.data.synthetic import SyntheticSpec, SyntheticVQA, corpus_texts

log = logging.getLogger(__name__)

SOURCES = ("synthetic",)
SYNTHETIC_VOCAB_SIZE = 512  # base vocabulary of the BPE trained for the synthetic data


def synthetic_spec(config: VLMConfig, seed: int = 0) -> SyntheticSpec:
    """Synthetic images with the model's tile size and up to its largest grid (8 at most)."""
    return SyntheticSpec(tile_size=config.vit_img_size,
                         max_grid=max(1, min(8, config.max_tiles_per_side)), seed=seed)


def open_dataset(source: str, split: str, n: int, config: VLMConfig) -> Sequence[dict[str, Any]]:
    """`n` raw samples of `split` from a named source."""
    if source == "synthetic":
        return SyntheticVQA(split, n, synthetic_spec(config))
    raise ValueError(f"unknown data source {source!r}; available: {', '.join(SOURCES)} "
                     "(dataset files are not supported yet)")


def synthetic_tokenizer(config: VLMConfig) -> tuple[Any, VLMConfig]:
    """A BPE trained on everything the synthetic data can say, and the config with
    `lm_base_vocab_size` set to its base vocabulary."""
    from tilevlm.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(corpus_texts(synthetic_spec(config).max_grid),
                                    vocab_size=SYNTHETIC_VOCAB_SIZE, grid_side=config.grid_side)
    if config.lm_base_vocab_size != tokenizer.base_vocab_size:
        log.info("synthetic data: lm_base_vocab_size %d -> %d (the trained BPE's)",
                 config.lm_base_vocab_size, tokenizer.base_vocab_size)
        config = config.replace(lm_base_vocab_size=tokenizer.base_vocab_size)
    return tokenizer, config
