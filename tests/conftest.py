"""Shared fixtures: configs, generated photo-like images, small offline tokenizers.

Everything is made here (no network, no files from outside the test's tmp directories).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from tilevlm import preset
from tilevlm.config import VLMConfig

# A few sentences in the style of the built-in synthetic data, for training tiny tokenizers.
CORPUS = [
    "What color is the tile in row 2, column 3?",
    "The tile in row 1, column 1 is red.",
    "How many circles are in the picture? There are three circles.",
    "Describe the image. A blue square above a green triangle on a white background.",
    "Is the yellow star left of the purple circle? Yes, it is.",
    "Answer briefly: orange, black, gray, pink, brown, cyan, magenta.",
]


# Narrow widths over the `tiny` preset: trainer and evaluation tests run many steps quickly.
SMALL = dict(vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=2, vit_n_blocks=1,
             lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=2, lm_n_kv_heads=1, lm_n_blocks=1,
             max_img_size=64)


def make_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients, a few blobs and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    img = np.stack([200 * u + 30, 180 * v + 40, 120 * (1 - u) * (1 - v) + 60], axis=-1)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.4)
        blob = np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - 0.6 * blob) + 0.6 * blob * rng.uniform(0, 255, size=3)
    img = img + rng.normal(0, 6, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture
def photo() -> Callable[..., Image.Image]:
    """Factory: photo(width, height, seed=0) -> a generated photo-like RGB image."""
    return make_photo


@pytest.fixture
def tiny_config() -> VLMConfig:
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE with the tiny preset's 512 base tokens and an 8x8 grid of grid tokens."""
    from tilevlm.preprocessing.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS * 20, vocab_size=512, grid_side=8)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face style tokenizer directory with none of our tokens, not even ChatML markers.

    Like a base model's: tokenizer.json (byte-level BPE, <|endoftext|> as its only special token)
    and tokenizer_config.json naming it as eos; no pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": {"content": "<|endoftext|>", "special": True}, "bos_token": None,
              "tokenizer_class": "GPT2Tokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
