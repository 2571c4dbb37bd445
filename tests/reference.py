"""Plain reference implementations the tests compare the fast library code against.

Slow and obvious on purpose: torch ops on whole images instead of the preallocated NumPy tiling of
`ImageTransform`, the ChatML text in one string instead of the processor's labelled pieces, and
one full forward per token instead of the KV cache of `generate`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from tilevlm.config import VLMConfig
from tilevlm.preprocessing.chat_template import chat_segments


# ----------------------------------------------------------------------------- images

def nanovlm_resized_size(width: int, height: int, tile: int, max_side: int,
                         resize_to_max_side_len: bool = False) -> tuple[int, int]:
    """nanoVLM's DynamicResize._get_new_hw, step by step as it is written there (4e0c096):
    the (width, height) an image is resized to before it is split into tiles."""
    long, short = (width, height) if width >= height else (height, width)
    target_long = max_side if resize_to_max_side_len else min(max_side, math.ceil(long / tile) * tile)
    scale = target_long / long
    target_short = math.ceil(short * scale / tile) * tile
    target_short = max(target_short, tile)
    return (target_long, target_short) if width >= height else (target_short, target_long)


def nanovlm_tiles(img: Image.Image, tile: int, max_side: int,
                  resize_to_max_side_len: bool = False) -> torch.Tensor:
    """nanoVLM's image pipeline (data/processors.py get_image_processor, 4e0c096), in what each
    step does rather than in its code -> [N, 3, tile, tile] in [0, 1], global tile first:

    1. DynamicResize: torchvision's `resize(pil_image, [h, w], BICUBIC)`. For a PIL image
       torchvision calls Pillow's `Image.resize((w, h), BICUBIC)` and nothing else (no
       `reducing_gap`, no box pre-shrink; Pillow's bicubic is antialiased on downscales).
    2. ToTensor: the 8-bit pixels as float32 / 255, channels first.
    3. GlobalAndSplitImages: the tensor cut into row-major tiles; unless the grid is 1x1, the
       global tile first: torchvision's `resize(tensor, [tile, tile])`, whose defaults are
       bilinear with antialiasing, i.e. `F.interpolate(..., "bilinear", align_corners=False,
       antialias=True)` on the float tensor, not rounded to 8 bits.
    """
    size = nanovlm_resized_size(img.width, img.height, tile, max_side, resize_to_max_side_len)
    x = to_tensor(img.resize(size, Image.Resampling.BICUBIC))  # (3, H, W)
    tiles = split_tiles(x, tile)
    if tiles.shape[0] == 1:
        return tiles
    thumb = torch.nn.functional.interpolate(x[None], size=(tile, tile), mode="bilinear",
                                            align_corners=False, antialias=True)
    return torch.cat([thumb, tiles])


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as float32 [3, H, W] in [0, 1]."""
    arr = np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(255.0)  # (3, H, W)


def normalize(pixels: torch.Tensor, config: VLMConfig) -> torch.Tensor:
    """(pixels - image_mean) / image_std, per channel of a [3, H, W] tensor."""
    mean = torch.tensor(config.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.image_std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


def split_tiles(pixels: torch.Tensor, tile_size: int) -> torch.Tensor:
    """[C, H, W] -> [n_h * n_w, C, T, T], tiles in row-major order."""
    c, h, w = pixels.shape
    if h % tile_size or w % tile_size:
        raise ValueError(f"image size {w}x{h} is not a multiple of the tile size {tile_size}")
    n_h, n_w = h // tile_size, w // tile_size
    tiles = pixels.reshape(c, n_h, tile_size, n_w, tile_size)  # (C, n_h, T, n_w, T)
    return tiles.permute(1, 3, 0, 2, 4).reshape(n_h * n_w, c, tile_size, tile_size)


def reassemble_tiles(tiles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `split_tiles`: [n_h * n_w, C, T, T] -> [C, n_h * T, n_w * T]."""
    n_h, n_w = grid
    n, c, t, t2 = tiles.shape
    if n != n_h * n_w or t != t2:
        raise ValueError(f"{n} tiles of {t}x{t2} do not form a {n_h}x{n_w} grid of square tiles")
    grid_tiles = tiles.reshape(n_h, n_w, c, t, t)  # (n_h, n_w, C, T, T)
    return grid_tiles.permute(2, 0, 3, 1, 4).reshape(c, n_h * t, n_w * t)


# ----------------------------------------------------------------------------- text

def chatml(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as one ChatML string: the text pieces of `chat_segments`, joined."""
    return "".join(text for text, _ in chat_segments(messages, add_generation_prompt))


# ----------------------------------------------------------------------------- decoding

@torch.no_grad()
def full_forward_answers(model: nn.Module, processor: Any, conversations: list[list[dict[str, str]]],
                         images: list[list[Any]], max_new_tokens: int) -> list[str]:
    """Greedy answers by one full forward per token: slow (O(n^2)) but needs nothing from the
    model beyond `forward`, so it also serves stub models and as the reference for the cache.
    An `answer_fn` for `tilevlm.evaluation.quiz.evaluate`.

    Rows are right-padded; each row's next token is read at its own last position and written
    just after it, so padding (always after a row's tokens) never influences it."""
    batch = processor(conversations, images, add_generation_prompt=True)
    device = next(model.parameters()).device
    prompt_len = batch["attention_mask"].sum(1).to(device)  # (B,)
    pixel_values = batch["pixel_values"]
    pixel_values = pixel_values.to(device) if pixel_values is not None else None
    ids, lengths = _decode_loop(model, batch["input_ids"].to(device), prompt_len, pixel_values,
                                max_new_tokens, processor.tokenizer)
    eos = processor.tokenizer.eos_token_id
    answers = []
    for row, start, end in zip(ids.tolist(), prompt_len.tolist(), lengths.tolist()):
        new = row[start:end]
        answers.append(processor.decode(new[:new.index(eos)] if eos in new else new))
    return answers


def _decode_loop(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor,
                 pixel_values: torch.Tensor | None, max_new_tokens: int,
                 tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Append up to `max_new_tokens` greedy tokens per row; returns (ids, row lengths)."""
    batch_size = input_ids.shape[0]
    pad = tokenizer.pad_token_id
    ids = torch.cat([input_ids, input_ids.new_full((batch_size, max_new_tokens), pad)], 1)
    rows = torch.arange(batch_size, device=ids.device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        width = int(lengths.max())
        mask = (torch.arange(width, device=ids.device) < lengths[:, None]).long()  # (B, W)
        logits = model(ids[:, :width], pixel_values=pixel_values, attention_mask=mask).logits
        next_ids = logits[rows, lengths - 1].argmax(-1)  # (B,)
        next_ids = torch.where(done, torch.full_like(next_ids, pad), next_ids)
        ids[rows, lengths] = next_ids
        lengths = lengths + (~done).long()
        done |= next_ids == tokenizer.eos_token_id
        if bool(done.all()):
            break
    return ids, lengths
