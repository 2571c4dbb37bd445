"""The Idefics3 image rule (`VLMConfig.image_rule = "idefics3"`): transformers' Idefics3 image
processor (its Pillow backend) reproduced, for Idefics3 / SmolVLM checkpoints.

1. The longest edge becomes `size.longest_edge` (`VLMConfig.max_img_size`), the other side
   `int(long / aspect ratio)` rounded up to even, then both scaled below 4096 (`MAX_IMAGE_SIZE`).
2. With splitting, both sides go up to multiples of the tile (`max_image_size.longest_edge`,
   `VLMConfig.vit_img_size`): the longest first, then the other from `int(new long / aspect)`,
   as `resize_for_vision_encoder` does; without splitting, the image is resized to one square
   tile and is the global image alone.
3. An image larger than one tile is cut into square tiles row-major, and the global image is the
   whole resized image resized to one tile; otherwise the one tile is the global image.

Every resize is Lanczos on the 8-bit pixels (transformers' Pillow backend resizes uint8 arrays
through PIL), each step from the previous step's 8-bit result. Pixels are then rescaled by
1/255 in float64, cast to float32 and normalised `(x - mean) / std` in float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from tilevlm.config import VLMConfig
from tilevlm.preprocessing.image import ImageLike, load_image
from tilevlm.special_tokens import get_layout

MAX_IMAGE_SIZE = 4096  # transformers' absolute maximum side
_RESAMPLE = Image.Resampling.LANCZOS


def longest_edge_size(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """(width, height) after step 1: the longest edge to `longest_edge`, then below 4096."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    width, height = max(width, 1), max(height, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(width, 1), max(height, 1)


def tile_multiple_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """(width, height) after step 2 with splitting (`resize_for_vision_encoder`'s rounding)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return width, height


def idefics3_grid(width: int, height: int, config: VLMConfig) -> tuple[int, int]:
    """The (n_h, n_w) tile grid of a width x height image; (1, 1) is the global image alone."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not config.image_splitting:
        return 1, 1
    tile = config.vit_img_size
    w, h = tile_multiple_size(*longest_edge_size(width, height, config.max_img_size), tile)
    if w <= tile and h <= tile:
        return 1, 1
    return (h - tile) // tile + 1, (w - tile) // tile + 1


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == size else img.resize(size, _RESAMPLE)


class Idefics3ImageTransform:
    """PIL image -> normalized tiles [N, 3, T, T] and the grid (n_h, n_w), the global tile where
    the layout puts it (last for Idefics3). The same methods as `ImageTransform`."""

    def __init__(self, config: VLMConfig, jpeg_draft: bool = False,
                 fast_resize: bool = False) -> None:
        del jpeg_draft, fast_resize  # transformers' pixels: a full decode, plain Lanczos resizes
        self.config = config
        self.tile_size = config.vit_img_size
        self.global_first = get_layout(config.image_token_layout).global_first
        self._mean = np.asarray(config.image_mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(config.image_std, dtype=np.float32).reshape(3, 1, 1)

    def load(self, source: ImageLike, max_pixels: int = 89_478_485
             ) -> tuple[torch.Tensor, tuple[int, int]]:
        return self(load_image(source, max_pixels=max_pixels))

    def resize(self, img: Image.Image) -> tuple[Image.Image, Image.Image | None, tuple[int, int]]:
        """The resized image, the global image (None for a 1x1 grid) and the grid."""
        t = self.tile_size
        first = _resize(img, longest_edge_size(img.width, img.height, self.config.max_img_size))
        if not self.config.image_splitting:
            return _resize(first, (t, t)), None, (1, 1)
        resized = _resize(first, tile_multiple_size(first.width, first.height, t))
        grid = idefics3_grid(img.width, img.height, self.config)
        return resized, (_resize(resized, (t, t)) if grid != (1, 1) else None), grid

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        resized, thumb, (n_h, n_w) = self.resize(img)
        t = self.tile_size
        hwc = np.asarray(resized.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        tiles = [hwc[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(n_h) for c in range(n_w)]
        if thumb is not None:
            whole = np.asarray(thumb.convert("RGB"), dtype=np.uint8)  # (T, T, 3)
            tiles = [whole, *tiles] if self.global_first else [*tiles, whole]
        stacked = np.stack(tiles).transpose(0, 3, 1, 2)  # (N, 3, T, T) uint8
        scaled = (stacked.astype(np.float64) * (1 / 255)).astype(np.float32)
        return torch.from_numpy((scaled - self._mean) / self._std), (n_h, n_w)
