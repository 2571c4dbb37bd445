"""The image rules' pixels against their peers' at every scale: extreme aspect ratios, several-fold
shrinks and sizes next to a tile boundary, on images of pixel-sized detail (where two resize
methods differ most; a smooth photo hides a different resize within a level or two).

nanoVLM's pipeline is tests/reference.py's `nanovlm_tiles` (written from what nanoVLM's code
does); Idefics3's is transformers' own Pillow image processor, `Idefics3ImageProcessorPil`.
Both must be equal, not close: the same 8-bit values in every grid tile, and the global tile
(float in nanoVLM) within float32 rounding of the normalisation, 1e-6 (one 8-bit level is 0.0039).
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_fine_detail
from tilevlm import preset
from tilevlm.preprocessing.idefics3_image import Idefics3ImageTransform
from tilevlm.preprocessing.image import FAST_RESIZE_GAP, ImageTransform

from reference import nanovlm_resized_size, nanovlm_tiles

# (width, height, preset): every kind of scale, for the rule all tilevlm presets share
NANOVLM_CASES = [
    (1000, 10, "tiny"),  # 10x shrink of a strip
    (10, 1000, "tiny"),
    (1, 20000, "split_448"),  # a one-pixel strip
    (20000, 1, "split_896"),
    (3000, 40, "split_896"),
    (40, 3000, "split_896"),
    (3000, 2250, "split_448"),  # a several-fold shrink of a photo-sized image
    (4032, 3024, "original_small"),  # 13x
    (1200, 900, "tiny"),  # 12x
    (449, 448, "split_448"),  # next to the grid
    (447, 448, "split_448"),
    (448, 448, "split_448"),  # exactly the grid: no resize at all
    (225, 224, "split_896"),
    (97, 95, "tiny"),
    (31, 33, "tiny"),  # upscales
    (1, 1, "split_448"),
]


def _plain(name: str):
    """The preset with mean 0 and std 1, so tiles are the [0, 1] pixels nanoVLM's ToTensor makes."""
    return preset(name, image_mean=(0, 0, 0), image_std=(1, 1, 1))


@pytest.mark.parametrize("width, height, name", NANOVLM_CASES)
def test_nanovlm_pixels_are_equal_at_every_scale(width, height, name):
    config = _plain(name)
    img = make_fine_detail(width, height, seed=width + height)
    tiles, grid = ImageTransform(config)(img)
    expected = nanovlm_tiles(img, config.vit_img_size, config.max_img_size)
    w, h = nanovlm_resized_size(width, height, config.vit_img_size, config.max_img_size)
    assert grid == (h // config.vit_img_size, w // config.vit_img_size)
    assert tiles.shape == expected.shape
    assert_same_pixels(tiles, expected)


def assert_same_pixels(tiles: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal 8-bit values in the grid tiles (all but the first when there is a global tile),
    and every value within float32 rounding."""
    grid = slice(1 if tiles.shape[0] > 1 else 0, None)
    assert torch.equal((tiles[grid] * 255).round(), (expected[grid] * 255).round())
    assert (tiles - expected).abs().max() <= 1e-6

def test_nanovlm_pixels_with_resize_to_max_side_len():
    config = _plain("split_448").replace(resize_to_max_side_len=True)
    for size in [(300, 100), (3000, 1000)]:  # scaled up, and down, to the max side
        img = make_fine_detail(*size)
        expected = nanovlm_tiles(img, 224, 448, resize_to_max_side_len=True)
        assert_same_pixels(ImageTransform(config)(img)[0], expected)


def test_fast_resize_is_opt_in_keeps_the_grid_and_moves_pixels_only_past_a_6x_shrink(
        tiny_tokenizer):
    config = _plain("tiny")  # 32-px tiles, at most 96 px: a 1200x900 image shrinks 12x
    plain, fast = ImageTransform(config), ImageTransform(config, fast_resize=True)
    big = make_fine_detail(1200, 900)
    (exact, grid), (quick, quick_grid) = plain(big), fast(big)
    assert quick_grid == grid and quick.shape == exact.shape
    assert_same_pixels(exact, nanovlm_tiles(big, 32, 96))
    assert 0 < (quick - exact).abs().max() < 0.2  # what `fast_resize` trades (docs/performance.md)
    small = make_fine_detail(500, 400)  # under FAST_RESIZE_GAP * 2 = 6x: no box pre-shrink
    assert 500 / 96 < 2 * FAST_RESIZE_GAP
    assert torch.equal(fast(small)[0], plain(small)[0])
    # the Processor's switch is the same one, off by default
    from tilevlm.preprocessing.processor import Processor

    config = config.replace(lm_base_vocab_size=tiny_tokenizer.base_vocab_size)
    assert torch.equal(Processor(config, tiny_tokenizer).transform(big)[0], exact)
    assert torch.equal(Processor(config, tiny_tokenizer, fast_resize=True).transform(big)[0],
                       quick)


# ----------------------------------------------------------------------------- Idefics3

# (width, height, tile, longest edge): SmolVLM-256M's 512 / 2048, and small tiles for the rest
IDEFICS3_CASES = [
    (1, 20000, 64, 192), (20000, 1, 64, 192), (3000, 40, 64, 192), (40, 3000, 64, 192),
    (4032, 3024, 64, 192),  # 21x
    (3000, 2000, 512, 2048),
    (193, 192, 64, 192), (191, 192, 64, 192), (65, 64, 64, 192), (64, 64, 64, 192),
    (7, 5, 64, 192),  # upscaled to the longest edge
]


def _transformers_frames(img, tile: int, longest: int, splitting: bool, config) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    processor = transformers.Idefics3ImageProcessorPil(
        size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
        do_image_splitting=splitting, image_mean=list(config.image_mean),
        image_std=list(config.image_std))
    return processor(images=[[img]], return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("splitting", [True, False])
@pytest.mark.parametrize("width, height, tile, longest", IDEFICS3_CASES)
def test_idefics3_pixels_are_equal_at_every_scale(width, height, tile, longest, splitting):
    if tile == 512 and not splitting:
        pytest.skip("one resize to one tile: the small tiles cover it")
    config = preset("smolvlm_256m", vit_img_size=tile, max_img_size=longest,
                    mp_image_token_length=(tile // 64) ** 2, image_splitting=splitting)
    img = make_fine_detail(width, height, seed=width * 3 + height)
    ours, grid = Idefics3ImageTransform(config)(img)
    frames = _transformers_frames(img, tile, longest, splitting, config)
    assert ours.shape == frames.shape  # the same number of tiles, nothing padded for one image
    assert torch.equal(ours, frames)
