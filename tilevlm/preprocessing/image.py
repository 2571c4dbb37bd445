"""Images in, tiles out: load safely, resize to tile multiples, normalize, split into tiles.

Pillow + NumPy + torch only (no torchvision). The tile grid is a pure function of the image size
(`tile_grid`), so token counts are known before any pixel is decoded.

Resize rule (`tile_grid`), nanoVLM's DynamicResize, which the seed describes: the long side
becomes `max_img_size` with `resize_to_max_side_len`, else its length rounded *up* to a multiple of
the tile size, at most `max_img_size`; the short side keeps the aspect ratio and is rounded *up*
to a multiple of the tile size too, at least one tile. So a 1280x720 photo is a 2x2 grid at
`max_img_size` 448, and a 100x60 image one whole tile. The image is resized once, Pillow's plain
bicubic from its 8-bit pixels (what torchvision's resize of a PIL image, nanoVLM's, calls); the
global thumbnail is a bilinear (antialiased) resize of the resized image's float [0, 1] pixels to
one tile, as nanoVLM's GlobalAndSplitImages does. Both are nanoVLM's pixels exactly, at any scale.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps

from tilevlm.config import VLMConfig
from tilevlm.preprocessing.decoding import ImageLoadError, decoding, image_file
from tilevlm.special_tokens import get_layout

ImageLike = Union[str, Path, bytes, Image.Image]
_T = TypeVar("_T")
_R = TypeVar("_R")

# Modes with an alpha channel: composited on white.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Modes whose samples are not 8-bit: rescaled to 8 bits before conversion.
_WIDE_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_RESAMPLE = Image.Resampling.BICUBIC
_ORIENTATION = 0x0112  # the EXIF orientation tag
_TRANSPOSING = {5, 6, 7, 8}  # orientations that swap width and height
_DRAFT_SCALES = (8, 4, 2)  # the reduced scales libjpeg decodes at directly
FAST_RESIZE_GAP = 3.0  # `fast_resize`'s Pillow reducing_gap
_PIL_LIMIT_LOCK = threading.Lock()
_TRUNCATED_LOCK = threading.Lock()
_truncated_seen_allowed = False  # Pillow's LOAD_TRUNCATED_IMAGES was found on: loads serialise


# ----------------------------------------------------------------------------- loading

def load_image(source: ImageLike, max_pixels: int = 89_478_485,
               draft_scale: Callable[[int, int], int] | None = None) -> Image.Image:
    """Open `source` (a path, encoded bytes or a PIL image) as an RGB image.

    EXIF orientation is applied; alpha is composited on white; 16-bit and float images are
    rescaled to 8 bits; an animated image gives its first frame (with a warning). Any failure is an
    ImageLoadError (a ValueError) naming the input and the reason; images over `max_pixels` are
    refused from their header, before any pixel is decoded.

    `draft_scale(width, height)` (speed; `ImageTransform.draft_scale`) gets the displayed size
    from the header and returns 1, 2, 4 or 8: a JPEG is then decoded at that fraction of its
    size (libjpeg scales in the DCT, far cheaper than a full decode and a resize).
    """
    name = _source_name(source)
    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels, name)
        with decoding(name), _truncated_refused():
            source.load()  # a lazily opened image may still hold undecoded (corrupt) data
        out = _finish(source, name)
        return out.copy() if out is source else out  # never hand back the caller's object
    fp = image_file(source, name)
    with decoding(name):
        with _our_pixel_limit():
            img = Image.open(fp)  # reads the header only
        with img:
            _check_size(img.size, max_pixels, name)  # before a single pixel is decoded
            if draft_scale is not None and img.format == "JPEG":
                _draft(img, draft_scale)
            with _truncated_refused():
                img.load()  # a full decode: truncated or corrupt data fails here, not later
            return _finish(img, name)


def _source_name(source: ImageLike) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return "<PIL image>"
    if isinstance(source, (str, Path)):
        return str(source)
    raise ImageLoadError(f"cannot load an image from a {type(source).__name__}; "
                         "give a path, encoded bytes or a PIL image")


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """An opened image's (width, height) once `load_image` applies its EXIF orientation:
    orientations 5-8 swap the sides (phone photos). The EXIF block is part of the header, so no
    pixel is decoded."""
    width, height = img.size
    return (height, width) if _header_orientation(img) in _TRANSPOSING else (width, height)


def _header_orientation(img: Image.Image) -> int:
    if img.format == "PNG" and "exif" not in img.info:
        # Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the
        # pixel data. Such files are rare; the processor's own count check still catches them.
        return 1
    return img.getexif().get(_ORIENTATION, 1)


def _draft(img: Image.Image, draft_scale: Callable[[int, int], int]) -> None:
    """Ask libjpeg to decode `img` at 1/scale of its size (the scale chosen on the displayed,
    EXIF-oriented size; the same factor applies to the stored one)."""
    width, height = img.size
    scale = draft_scale(*displayed_size(img))
    if scale > 1 and width >= scale and height >= scale:
        img.draft(None, (width // scale, height // scale))  # libjpeg picks exactly `scale`


def _finish(img: Image.Image, name: str) -> Image.Image:
    """First frame, EXIF orientation, RGB (no copy when there is nothing to change)."""
    if getattr(img, "is_animated", False):
        warnings.warn(f"{name}: animated image; using the first frame", stacklevel=3)
    with decoding(name, f"cannot turn or convert this {img.mode} image to RGB"):
        if img.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even for none
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


@contextlib.contextmanager
def _truncated_refused() -> Iterator[None]:
    """Pillow's check for truncated files on, for one decode. Another library in the process may
    have switched it off for everyone (lmms-eval does, at import: Pillow then fills the missing
    rows with grey, without a word); a truncated image must still be refused here. While the
    switch is off nothing changes; once it has been seen on, decodes take a lock and turn it off
    for their duration, so no thread of ours decodes while another has turned it back on."""
    global _truncated_seen_allowed
    if not (_truncated_seen_allowed or ImageFile.LOAD_TRUNCATED_IMAGES):
        yield
        return
    _truncated_seen_allowed = True
    with _TRUNCATED_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


@contextlib.contextmanager
def _our_pixel_limit() -> Iterator[None]:
    """Switch Pillow's own bomb check off while a header is parsed: `_check_size` applies ours.

    Otherwise Pillow warns above its limit and raises above twice it, before our check runs and
    whatever `max_pixels` the caller chose. A lock keeps threads from restoring a stale value.
    """
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{name}: zero-sized image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(f"{name}: {width}x{height} = {width * height} pixels, more than the "
                             f"limit of {max_pixels} (a decompression bomb?); to allow it, "
                             "raise the model config's max_image_pixels (load_image's "
                             "max_pixels)")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; alpha on white; wide samples rescaled, not clipped."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _WIDE_MODES:
        img = Image.fromarray(_wide_to_uint8(np.asarray(img), img.mode))
    if img.mode in _ALPHA_MODES:
        if img.mode == "La":  # premultiplied: Pillow converts it to LA only
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _wide_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Rescale 16-bit / 32-bit / float samples to 0..255 (documented heuristics, never clipping).

    I;16: the full 0..65535 range. I: as is when within 0..255 (8-bit data in a wide mode), else
    0..65535 when within it, else min-max. F: times 255 when within [0, 1], as is when within
    [0, 255], else min-max. NaN and infinities become 0.
    """
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if mode.startswith("I;16"):
        scaled = arr / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = arr
    elif mode == "I" and lo >= 0 and hi <= 65535:
        scaled = arr / 257.0
    else:
        scaled = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- tiling

def tile_grid(width: int, height: int, tile_size: int, max_img_size: int,
              resize_to_max_side_len: bool = False) -> tuple[int, int]:
    """The (n_h, n_w) tile grid of a width x height image; see the module docstring for the rule.

    The same floating-point steps as nanoVLM's DynamicResize, so a nanoVLM-born model sees the
    grids it was trained on, also where a product lands next to a tile boundary.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if tile_size <= 0 or max_img_size < tile_size:
        raise ValueError(f"need 0 < tile_size <= max_img_size, got {tile_size} and {max_img_size}")
    long_side, short_side = max(width, height), min(width, height)
    target_long = max_img_size if resize_to_max_side_len else min(
        max_img_size, math.ceil(long_side / tile_size) * tile_size)
    scale = target_long / long_side
    target_short = max(math.ceil(short_side * scale / tile_size) * tile_size, tile_size)
    max_tiles = max_img_size // tile_size
    n_long = min(target_long // tile_size, max_tiles)
    n_short = min(target_short // tile_size, max_tiles)
    return (n_short, n_long) if width >= height else (n_long, n_short)


def tiles_per_image(grid: tuple[int, int], use_global: bool) -> int:
    """Tiles an image with this grid takes: the grid, plus the global tile when the grid > 1x1."""
    n_h, n_w = grid
    return n_h * n_w + (1 if use_global and n_h * n_w > 1 else 0)


def resize_to_tiles(img: Image.Image, tile_size: int, max_img_size: int,
                    resize_to_max_side_len: bool = False,
                    reducing_gap: float | None = None) -> Image.Image:
    """Resize once (bicubic, antialiased) to the tile-multiple size `tile_grid` gives.

    `reducing_gap` (speed, off by default): Pillow first box-shrinks the image by a whole factor
    while it stays `reducing_gap` times larger than the target, which is faster for several-fold
    shrinks but is not nanoVLM's plain bicubic resize (`FAST_RESIZE_GAP`, `ImageTransform`).
    """
    n_h, n_w = tile_grid(img.width, img.height, tile_size, max_img_size, resize_to_max_side_len)
    size = (n_w * tile_size, n_h * tile_size)
    if img.size == size:
        return img
    return img.resize(size, _RESAMPLE, reducing_gap=reducing_gap)


# ----------------------------------------------------------------------------- several at once

def default_image_threads() -> int:
    """Threads for decoding a batch's images: the cores (at most 4), but 1 inside a DataLoader
    worker process, where the workers already share out the cores."""
    if torch.utils.data.get_worker_info() is not None:
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def thread_map(fn: Callable[[_T], _R], items: Sequence[_T], threads: int) -> list[_R]:
    """[fn(x) for x in items], on `threads` threads; results (and the first error) in order.

    Pillow's decoders and resampling and NumPy's arithmetic release the GIL, so threads run the
    image work truly in parallel, and unlike DataLoader worker processes they do not pay to ship
    the float tiles between processes (docs/performance.md has the figures).
    The pool is kept per process (a forked DataLoader worker must not reuse its parent's).
    """
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="tilevlm-image")
    return list(_POOLS[key].map(fn, items))


class ImageTransform:
    """PIL image -> normalized tiles [N, 3, T, T] and the grid (n_h, n_w); the global thumbnail
    comes first or last as the config's token layout says (`TokenLayout.global_first`).

    The global tile (the whole image resized to one tile) is added when `config.use_global_tile`
    and the grid is larger than 1x1; a 1x1 grid's only tile already is the whole image.

    Speed (`tilevlm bench`, preprocessing): the image is resized once; the uint8 pixels are
    converted to float, cut into tiles and normalized in one preallocated [N, 3, T, T] tensor
    (each tile a view of it). Two opt-in shortcuts trade nanoVLM's exact pixels for speed on
    large images, so both are off unless asked for (docs/performance.md has their cost and
    pixel difference): `jpeg_draft=True` lets `load` decode a large JPEG at a reduced scale
    (`draft_scale`; the same grid, pixels a few 8-bit levels away from a full decode and
    resize), `fast_resize=True` lets Pillow box-shrink before the bicubic resize
    (`FAST_RESIZE_GAP`; the same grid, pixels up to about 20 levels away on fine detail shrunk
    several-fold, identical below a 6x shrink).
    """

    def __init__(self, config: VLMConfig, jpeg_draft: bool = False,
                 fast_resize: bool = False) -> None:
        self.jpeg_draft = jpeg_draft
        self.reducing_gap = FAST_RESIZE_GAP if fast_resize else None
        self.tile_size = config.vit_img_size
        self.max_img_size = config.max_img_size
        self.resize_to_max_side_len = config.resize_to_max_side_len
        self.use_global = config.use_global_tile
        self.global_first = get_layout(config.image_token_layout).global_first
        mean = torch.tensor(config.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(config.image_std, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std == x * scale - shift, applied in place on the tiles.
        self._scale = (1.0 / (255.0 * std)).numpy()  # (3, 1, 1)
        self._shift = (mean / std).numpy()  # (3, 1, 1)

    def load(self, source: ImageLike, max_pixels: int = 89_478_485
             ) -> tuple[torch.Tensor, tuple[int, int]]:
        """`self(load_image(source))` (a large JPEG decoded at a reduced scale with `jpeg_draft`)."""
        draft = self.draft_scale if self.jpeg_draft else None
        return self(load_image(source, max_pixels=max_pixels, draft_scale=draft))

    def load_many(self, sources: Iterable[ImageLike], max_pixels: int = 89_478_485,
                  threads: int | None = None) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """`load` for each source, on `threads` threads (default: `default_image_threads()`)."""
        threads = default_image_threads() if threads is None else threads
        return thread_map(lambda source: self.load(source, max_pixels), list(sources), threads)

    def draft_scale(self, width: int, height: int) -> int:
        """The largest JPEG reduction (8, 4, 2, else 1) of a width x height image that keeps its
        tile grid and still leaves at least the resized size in both directions (so the resize
        stays a downscale and token counts never depend on the decoder)."""
        grid = tile_grid(width, height, self.tile_size, self.max_img_size,
                         self.resize_to_max_side_len)
        need_w, need_h = grid[1] * self.tile_size, grid[0] * self.tile_size
        for scale in _DRAFT_SCALES:
            w, h = -(-width // scale), -(-height // scale)  # libjpeg rounds up
            if w >= need_w and h >= need_h and grid == tile_grid(
                    w, h, self.tile_size, self.max_img_size, self.resize_to_max_side_len):
                return scale
        return 1

    def resize(self, img: Image.Image) -> tuple[Image.Image, Image.Image | None, tuple[int, int]]:
        """The resized image, the global thumbnail (or None, 8-bit for display) and the grid."""
        resized, grid = self._resized(img)
        if not self._has_thumbnail(grid):
            return resized, None, grid
        thumb = global_thumbnail(_hwc_uint8(resized), self.tile_size)  # (3, T, T) in [0, 1]
        thumb8 = np.rint(thumb.transpose(1, 2, 0) * 255.0).clip(0, 255).astype(np.uint8)
        return resized, Image.fromarray(thumb8), grid

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        resized, grid = self._resized(img)
        t, (n_h, n_w) = self.tile_size, grid
        thumbs = 1 if self._has_thumbnail(grid) else 0
        first = thumbs if self.global_first else 0  # where the grid's tiles start
        hwc = _hwc_uint8(resized)  # (H, W, 3)
        # NumPy, not torch, for the tiles: these small loops run on one thread, and torch's
        # thread pool costs more than it saves here (and a lot when the cores are shared).
        tiles = np.empty((thumbs + n_h * n_w, 3, t, t), dtype=np.float32)  # (N, 3, T, T)
        if thumbs:
            thumb = global_thumbnail(hwc, t)  # (3, T, T) in [0, 1]
            np.subtract(thumb * (255.0 * self._scale), self._shift,
                        out=tiles[0 if self.global_first else -1])
        pixels = hwc.reshape(n_h, t, n_w, t, 3)  # (n_h, T, n_w, T, 3)
        # One pass: uint8 -> float, channels first, row-major tiles (each tile a view).
        self._normalize_into(tiles[first:first + n_h * n_w].reshape(n_h, n_w, 3, t, t),
                             pixels.transpose(0, 2, 4, 1, 3))  # (n_h, n_w, 3, T, T)
        return torch.from_numpy(tiles), grid

    def _resized(self, img: Image.Image) -> tuple[Image.Image, tuple[int, int]]:
        resized = resize_to_tiles(img, self.tile_size, self.max_img_size,
                                  self.resize_to_max_side_len, self.reducing_gap)
        return resized, (resized.height // self.tile_size, resized.width // self.tile_size)

    def _has_thumbnail(self, grid: tuple[int, int]) -> bool:
        return tiles_per_image(grid, self.use_global) > grid[0] * grid[1]

    def _normalize_into(self, out: np.ndarray, pixels: np.ndarray) -> None:
        """out = (pixels / 255 - mean) / std, written in place (pixels: uint8, channels at -3)."""
        np.multiply(pixels, self._scale, out=out)
        np.subtract(out, self._shift, out=out)


def global_thumbnail(hwc: np.ndarray, tile_size: int) -> np.ndarray:
    """The whole resized image as one tile: its float [0, 1] pixels resized bilinearly with
    antialiasing (nanoVLM's global patch: torchvision's tensor resize, which is this
    interpolate call). uint8 [H, W, 3] -> float32 [3, T, T]."""
    x = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))[None].float() / 255.0
    thumb = F.interpolate(x, size=(tile_size, tile_size), mode="bilinear", align_corners=False,
                          antialias=True)  # (1, 3, T, T)
    return thumb[0].numpy()


def _hwc_uint8(img: Image.Image) -> np.ndarray:
    """An RGB PIL image as uint8 [H, W, 3] (read-only, no copy beyond Pillow's export)."""
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
