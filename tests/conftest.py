"""Shared fixtures: configs, generated photo-like images, small offline tokenizers, a saved tiny
model. Plain helpers (no fixtures) are in helpers.py.

Everything is made here (no network, no files from outside the test's tmp directories).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from helpers import SMALL, byte_level_bpe, make_photo, png, run_tilevlm, train_args
from tilevlm import preset
from tilevlm.config import VLMConfig
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.weights.native import save_pretrained

# A few sentences in the style of the built-in synthetic data, for training tiny tokenizers.
CORPUS = [
    "What color is the tile in row 2, column 3?",
    "The tile in row 1, column 1 is red.",
    "How many circles are in the picture? There are three circles.",
    "Describe the image. A blue square above a green triangle on a white background.",
    "Is the yellow star left of the purple circle? Yes, it is.",
    "Answer briefly: orange, black, gray, pink, brown, cyan, magenta.",
]


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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A saved `tiny` model (seed 0) with `tiny_tokenizer`."""
    torch.manual_seed(0)
    cfg = preset("tiny", lm_base_vocab_size=tiny_tokenizer.base_vocab_size)
    directory = tmp_path_factory.mktemp("tiny_model")
    save_pretrained(VisionLanguageModel(cfg), directory, tokenizer=tiny_tokenizer)
    return directory


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face style tokenizer directory with none of our tokens, not even ChatML markers.

    Like a base model's: tokenizer.json (byte-level BPE, <|endoftext|> as its only special token)
    and tokenizer_config.json naming it as eos; no pad token.
    """
    tok = byte_level_bpe(CORPUS * 20, 300, ["<|endoftext|>"])
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": {"content": "<|endoftext|>", "special": True}, "bos_token": None,
              "tokenizer_class": "GPT2Tokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


# ----------------------------------------------------------------------------- runs and copies
@pytest.fixture(scope="session")
def small_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset at SMALL's sizes, as a config file for `tilevlm train --config`."""
    path = tmp_path_factory.mktemp("config") / "small.json"
    preset("tiny", **SMALL).to_json(path)
    return path


@pytest.fixture(scope="session")
def finished_run(small_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished synthetic run, made once: checkpoint-1, checkpoint-2 (`latest`), model/,
    metrics.jsonl. Read it only; change a `run_copy`."""
    out = tmp_path_factory.mktemp("run") / "run"
    done = run_tilevlm(*train_args(small_config, out, "--steps", 2, "--save-every", 1))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture
def model_copy(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small PNG file (40x30)."""
    path = tmp_path_factory.mktemp("image") / "photo.png"
    path.write_bytes(png(40, 30))
    return path
