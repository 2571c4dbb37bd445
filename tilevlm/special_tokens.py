"""tilevlm's special tokens and the token layout of one image: the one home of both facts.

The tokens are nanoVLM's, so its checkpoints keep their token ids. They follow the base
vocabulary in this order: IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, then grid_token(r, c) for r, c in
1..grid_side row-major (`r1c1 ... r1cG, r2c1 ... rGcG`).

One image with an n_h x n_w tile grid is written as: (when the grid is larger than 1x1 and the
global tile is used) GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN x L for the thumbnail, then per tile,
row-major, grid_token(i, j) + IMAGE_TOKEN x L. A 1x1 grid is grid_token(1, 1) + IMAGE_TOKEN x L,
as in the seed's single-tile configuration (nanoVLM's newer code writes GLOBAL_IMAGE_TOKEN there
instead: the same count, 1 + L, and r1c1 keeps every tile named by its cell).
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


def has_global_tile(grid: tuple[int, int], use_global: bool) -> bool:
    """A thumbnail tile comes before the grid when asked for and the grid is larger than 1x1."""
    return use_global and grid[0] * grid[1] > 1


def image_tokens(grid: tuple[int, int], tokens_per_tile: int, use_global: bool) -> list[str]:
    """The tokens standing for one image with this tile grid, in order (one string per token)."""
    n_h, n_w = grid
    tile = [IMAGE_TOKEN] * tokens_per_tile
    out = [GLOBAL_IMAGE_TOKEN, *tile] if has_global_tile(grid, use_global) else []
    for i in range(1, n_h + 1):
        for j in range(1, n_w + 1):
            out += [grid_token(i, j), *tile]
    return out
