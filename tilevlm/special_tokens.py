"""tilevlm's special tokens and the token layout of one image: the one home of both facts.

The tokens are nanoVLM's, so its checkpoints keep their token ids. They follow the base
vocabulary in this order: IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, then grid_token(r, c) for r, c in
1..grid_side row-major (`r1c1 ... r1cG, r2c1 ... rGcG`).

How one image with an n_h x n_w tile grid is written is a named layout (`VLMConfig.
image_token_layout`), each defined here and nowhere else:

- "tilevlm" (the seed's; the default): when the grid is larger than 1x1 and the global tile is
  used, GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN x L for the thumbnail, then per tile, row-major,
  grid_token(i, j) + IMAGE_TOKEN x L. A 1x1 grid is grid_token(1, 1) + IMAGE_TOKEN x L, so every
  tile is named by its cell.
- "nanovlm" (nanoVLM's `get_image_string`, for the models it trained): the global part always
  comes first, and a 1x1 grid is the global part alone; when a sample holds several images,
  each is preceded by the text label `<image: {index}>`.

The count of special tokens is the same in both layouts: tiles x (1 + L).
"""

from __future__ import annotations

IMAGE_TOKEN = "<|image|>"
GLOBAL_IMAGE_TOKEN = "<|global_image|>"


def grid_token(row: int, col: int) -> str:
    """The token string for tile (row, col), both 1-based: `r{row}c{col}` in the seed's names."""
    return f"<row_{row}_col_{col}>"


def special_tokens(grid_side: int) -> list[str]:
    """Our special tokens in id order: image, global image, then the grid cells row-major."""
    grid = [grid_token(r, c) for r in range(1, grid_side + 1) for c in range(1, grid_side + 1)]
    return [IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, *grid]


IMAGE_TOKEN_LAYOUTS = ("tilevlm", "nanovlm")


def check_layout(layout: str, use_global: bool) -> None:
    """A ValueError unless `layout` is a known layout that works with `use_global`."""
    if layout not in IMAGE_TOKEN_LAYOUTS:
        raise ValueError(f"VLMConfig.image_token_layout must be one of "
                         f"{', '.join(IMAGE_TOKEN_LAYOUTS)}, got {layout!r:.60}")
    if layout == "nanovlm" and not use_global:
        raise ValueError("VLMConfig.image_token_layout 'nanovlm' always writes the global image "
                         "token, so it needs use_global_tile = true")


def has_global_tile(grid: tuple[int, int], use_global: bool) -> bool:
    """A thumbnail tile comes before the grid when asked for and the grid is larger than 1x1."""
    return use_global and grid[0] * grid[1] > 1


def image_tokens(grid: tuple[int, int], tokens_per_tile: int, use_global: bool,
                 layout: str = "tilevlm") -> list[str]:
    """The special tokens standing for one image with this tile grid, in order (one string per
    token). The tiles' pixels come in the same order: the global thumbnail (if any), then the
    grid row-major."""
    n_h, n_w = grid
    tile = [IMAGE_TOKEN] * tokens_per_tile
    out = [GLOBAL_IMAGE_TOKEN, *tile] if has_global_tile(grid, use_global) else []
    if layout == "nanovlm" and (n_h, n_w) == (1, 1):
        return [GLOBAL_IMAGE_TOKEN, *tile]  # the only tile is the whole image
    for i in range(1, n_h + 1):
        for j in range(1, n_w + 1):
            out += [grid_token(i, j), *tile]
    return out


def image_label(layout: str, index: int, n_images: int) -> str:
    """The text written before image `index` (0-based) of a sample with `n_images` images."""
    return f"<image: {index}>" if layout == "nanovlm" and n_images > 1 else ""
