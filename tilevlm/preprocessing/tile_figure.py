"""Draw how an image is tiled: tile borders with grid-token labels, the global thumbnail, a caption.

Small tiles (the `tiny` preset's 32 px) are enlarged with nearest-neighbour scaling so the figure
stays readable; the tiling itself is shown as is.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

_MIN_TILE_PX = 160  # tiles are drawn at least this large
_MARGIN = 12
_BORDER = (255, 64, 32)
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def draw_tiles(img_resized: Image.Image, grid: tuple[int, int], tile_size: int,
               global_tile: Image.Image | None = None, title: str | None = None,
               original: Image.Image | None = None) -> Image.Image:
    """A figure of `img_resized` cut into its `grid` of `tile_size` tiles, labelled r1c1, r1c2, ...

    The `original` image (if given) is drawn to the left at the tiles' height, labelled with its
    size; the global thumbnail (if any) to the right, labelled "global"; `title` (may hold
    several lines; long lines are wrapped) underneath.
    """
    n_h, n_w = grid
    if img_resized.size != (n_w * tile_size, n_h * tile_size):
        raise ValueError(f"image size {img_resized.size} does not match a {n_h}x{n_w} grid of "
                         f"{tile_size}-px tiles")
    scale = max(1, math.ceil(_MIN_TILE_PX / tile_size))
    tile_px = tile_size * scale
    font = _font(max(12, tile_px // 10))
    main = _enlarge(img_resized, scale)
    left = _at_height(original, main.height) if original is not None else None
    thumb = _enlarge(global_tile, scale) if global_tile is not None else None
    panels = [p for p in (left, main, thumb) if p is not None]
    width = _MARGIN * (len(panels) + 1) + sum(p.width for p in panels)
    text_lines = _wrap(title or "", font, width - 2 * _MARGIN)
    line_h = _line_height(font)
    height = _MARGIN * 2 + main.height + (len(text_lines) * line_h + _MARGIN if text_lines else 0)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = _MARGIN
    for panel in panels:
        canvas.paste(panel, (x, _MARGIN))
        if panel is main:
            _draw_grid(draw, (x, _MARGIN), grid, tile_px, font)
        else:
            text = "global" if panel is thumb else f"original {original.width}x{original.height}"
            _label(draw, (x, _MARGIN), panel.size, text, font)
        x += panel.width + _MARGIN
    y = _MARGIN * 2 + main.height
    for line in text_lines:
        draw.text((_MARGIN, y), line, fill=_TEXT, font=font)
        y += line_h
    return canvas


def _at_height(img: Image.Image, height: int) -> Image.Image:
    """`img` as RGB, scaled (aspect kept) to `height` pixels."""
    width = max(1, round(img.width * height / img.height))
    return img.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _enlarge(img: Image.Image, scale: int) -> Image.Image:
    img = img.convert("RGB")
    if scale == 1:
        return img
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def _draw_grid(draw: ImageDraw.ImageDraw, origin: tuple[int, int], grid: tuple[int, int],
               tile_px: int, font: ImageFont.ImageFont) -> None:
    x0, y0 = origin
    for row in range(grid[0]):
        for col in range(grid[1]):
            corner = (x0 + col * tile_px, y0 + row * tile_px)
            _label(draw, corner, (tile_px, tile_px), f"r{row + 1}c{col + 1}", font)


def _label(draw: ImageDraw.ImageDraw, corner: tuple[int, int], size: tuple[int, int], text: str,
           font: ImageFont.ImageFont) -> None:
    """A bordered box with `text` on a white tab in its top-left corner."""
    x, y = corner
    w, h = size
    line = max(2, w // 80)
    draw.rectangle([x, y, x + w - 1, y + h - 1], outline=_BORDER, width=line)
    left, top, right, bottom = draw.textbbox((x + 2 * line, y + 2 * line), text, font=font)
    draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=_BACKGROUND)
    draw.text((x + 2 * line, y + 2 * line), text, fill=_TEXT, font=font)


def _line_height(font: ImageFont.ImageFont) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return int(bottom - top) + 6


def _wrap(text: str, font: ImageFont.ImageFont, max_width: int) -> list[str]:
    """Split on newlines, then wrap each line greedily by word to `max_width` pixels."""
    lines: list[str] = []
    for paragraph in text.splitlines():
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and font.getlength(candidate) > max_width:
                lines.append(current)
                current = word
            else:
                current = candidate
        lines.append(current)
    return lines
