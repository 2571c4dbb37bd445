"""The bench's workload, the same for tilevlm and its peers: random token ids around one
full-grid image per row (`synthetic_batch`), the image string's ids in the model's layout, and the
image files the preprocessing figure reads. No tokenizer and no download: a layout whose tokens
are a tokenizer's own (idefics3) gets SmolVLM's ids after the config's base vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tilevlm.config import IGNORE_INDEX, VLMConfig
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.special_tokens import (
    IDEFICS3_IMAGE_TOKEN,
    SMOLVLM_GRID_SIDE,
    image_tokens,
    smolvlm_token_ids,
)

# The idefics3 layout's "\n" text pieces: a fixed base-vocabulary id stands in for the
# tokenizer's newline (the bench's text ids are random; which id it is does not change the speed).
NEWLINE_ID = 198


def idefics3_token_ids(cfg: VLMConfig) -> dict[str, int]:
    """Ids of the idefics3 layout's tokens (and its "\\n" text piece) for a bench config with no
    tokenizer, laid out as SmolVLM's tokenizer lays them out after the base vocabulary."""
    if cfg.image_token_layout != "idefics3":
        raise ValueError(f"the {cfg.image_token_layout!r} layout's ids come from the config "
                         "(special_token_ids), not from SmolVLM's tokenizer layout")
    ids = smolvlm_token_ids(cfg.lm_base_vocab_size)
    image_id = ids[IDEFICS3_IMAGE_TOKEN]
    if cfg.image_token_id != image_id or image_id >= cfg.lm_vocab_size:
        raise ValueError(f"a bench config in the idefics3 layout needs SmolVLM's token layout: "
                         f"lm_image_token_id = lm_base_vocab_size + "
                         f"{image_id - cfg.lm_base_vocab_size} = {image_id} below "
                         f"lm_vocab_size, got {cfg.image_token_id} and {cfg.lm_vocab_size}")
    if cfg.max_tiles_per_side > SMOLVLM_GRID_SIDE:
        raise ValueError(f"SmolVLM's tokenizer names grids up to {SMOLVLM_GRID_SIDE}x"
                         f"{SMOLVLM_GRID_SIDE} tiles; max_img_size {cfg.max_img_size} allows "
                         f"{cfg.max_tiles_per_side} per side")
    return {**ids, "\n": min(NEWLINE_ID, cfg.lm_base_vocab_size - 1)}


def image_token_ids(model: VisionLanguageModel, grid: tuple[int, int]) -> list[int]:
    """The image string of one image as ids, in the model's token layout (an appended one: the
    presets')."""
    cfg = model.cfg
    ids = cfg.special_token_ids()
    if not ids:  # the tokenizer's own tokens (idefics3): SmolVLM's tokenizer layout
        ids = idefics3_token_ids(cfg)
    return [ids[token] for token in image_tokens(grid, cfg.mp_image_token_length,
                                                  cfg.use_global_tile, cfg.image_token_layout)]


def synthetic_batch(model: VisionLanguageModel, batch_size: int, prompt_tokens: int,
                    answer_tokens: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """batch_size samples of one image (full grid) + a prompt (+ an answer with labels)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    side = cfg.max_img_size // cfg.vit_img_size
    image = image_token_ids(model, (side, side))
    n_tiles = side * side + (1 if side > 1 and cfg.use_global_tile else 0)
    text = lambda n: torch.randint(0, cfg.lm_base_vocab_size, (n,), generator=g).tolist()  # noqa: E731
    rows, labels = [], []
    for _ in range(batch_size):
        prompt = text(4) + image + text(prompt_tokens)
        answer = text(answer_tokens)
        rows.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
    tiles = torch.randn(batch_size * n_tiles, 3, cfg.vit_img_size, cfg.vit_img_size, generator=g)
    return {"input_ids": torch.tensor(rows, device=device),
            "labels": torch.tensor(labels, device=device),
            "attention_mask": torch.ones(len(rows), len(rows[0]), dtype=torch.long, device=device),
            "pixel_values": tiles.to(device)}


def preprocess_files(directory: Path, n: int, seed: int) -> list[Path]:
    """n JPEG/PNG files from 64x64 to 2000x1500, including a 100x1800 strip."""
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (2000, 1500), (100, 1800), (640, 480), (1024, 768), (300, 500), (224, 224),
             (1280, 720), (500, 300), (800, 800)]
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 255, size=(max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        path = directory / f"img{i:02d}.{'jpg' if i % 2 else 'png'}"
        img.save(path, quality=90) if i % 2 else img.save(path)
        paths.append(path)
    return paths
