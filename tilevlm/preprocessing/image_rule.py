"""Which image rule a config names (`VLMConfig.image_rule`), in one place: the tile grid of an
image size (known before any pixel is decoded), the tiles it takes, and the transform that makes
its pixels. "tilevlm": preprocessing/image.py; "idefics3": preprocessing/idefics3_image.py."""

from __future__ import annotations

from tilevlm.config import VLMConfig
from tilevlm.preprocessing.idefics3_image import Idefics3ImageTransform, idefics3_grid
from tilevlm.preprocessing.image import ImageTransform, tile_grid, tiles_per_image


def image_grid(width: int, height: int, config: VLMConfig) -> tuple[int, int]:
    """The (n_h, n_w) tile grid a width x height image gets under the config's image rule."""
    if config.image_rule == "idefics3":
        return idefics3_grid(width, height, config)
    return tile_grid(width, height, config.vit_img_size, config.max_img_size,
                     config.resize_to_max_side_len)


def image_tiles(width: int, height: int, config: VLMConfig) -> int:
    """Tiles (the grid's, plus the global tile when there is one) of a width x height image."""
    return tiles_per_image(image_grid(width, height, config), config.use_global_tile)


def image_transform(config: VLMConfig, jpeg_draft: bool = False, fast_resize: bool = False
                    ) -> ImageTransform | Idefics3ImageTransform:
    """The transform (load, resize, __call__) of the config's image rule; `jpeg_draft` and
    `fast_resize` are `ImageTransform`'s opt-in shortcuts (the Idefics3 rule takes neither)."""
    if config.image_rule == "idefics3":
        return Idefics3ImageTransform(config, jpeg_draft=jpeg_draft, fast_resize=fast_resize)
    return ImageTransform(config, jpeg_draft=jpeg_draft, fast_resize=fast_resize)
