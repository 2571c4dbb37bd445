"""`tilevlm inspect IMAGE`: how an image is resized and tiled, and how many tokens it costs."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from tilevlm.commands.options import MODEL_HELP, add_model_argument, check_outputs, model_source

if TYPE_CHECKING:  # heavy modules are imported in run() only
    from PIL import Image

    from tilevlm.config import VLMConfig

HELP = "show how an image is resized and tiled and how many image tokens it takes"
DEFAULT_PRESET = "split_448"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tilevlm.config import PRESETS  # light: the config module only

    parser.add_argument("image", help="image file (any format Pillow reads)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), help="configuration whose tile "
                        f"size and max_img_size are used (default: {DEFAULT_PRESET})")
    add_model_argument(source, required=False, help="use this model's image rule and token "
                       "layout instead: " + MODEL_HELP)
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="tokenizer directory (for a nanoVLM --model)")
    parser.add_argument("--save-png", metavar="OUT.png", default=None,
                        help="also draw the tiles, grid labels and global thumbnail to this PNG")


def run(args: argparse.Namespace) -> int:
    from tilevlm.preprocessing.image import load_image, tiles_per_image
    from tilevlm.preprocessing.image_rule import image_transform
    from tilevlm.preprocessing.processor import count_image_tokens

    check_outputs({"--save-png": args.save_png}, {"IMAGE": args.image, "--model": args.model,
                                                  "--tokenizer": args.tokenizer})
    config, tokenizer = _config(args)
    img = load_image(args.image, max_pixels=config.max_image_pixels)
    resized, thumb, grid = image_transform(config).resize(img)
    n_tiles = tiles_per_image(grid, config.use_global_tile)
    n_tokens = count_image_tokens(img.width, img.height, config)
    global_note = " (incl. 1 global thumbnail)" if thumb is not None else ""
    print(f"image:        {args.image}")
    source = f"model:        {args.model}" if args.model else f"preset:       {config.name}"
    print(f"{source} (tile {config.vit_img_size} px, max side {config.max_img_size} px)")
    print(f"original:     {img.width}x{img.height}")
    print(f"resized:      {resized.width}x{resized.height}")
    print(f"grid:         {grid[0]}x{grid[1]} (rows x cols)")
    print(f"tiles:        {n_tiles}{global_note}")
    print(f"image tokens: {n_tokens} ({n_tiles} tiles x {config.mp_image_token_length}, as "
          "generate, chat and eval count them)")
    print(_prompt_line(img.width, img.height, config, tokenizer, n_tokens))
    if args.save_png:
        _save_png(args.save_png, img, resized, grid, config.vit_img_size, thumb,
                  f"{args.image}: {img.width}x{img.height} -> {resized.width}x{resized.height}, "
                  f"{grid[0]}x{grid[1]} tiles, {n_tokens} image tokens")
    return 0


def _prompt_line(width: int, height: int, config: VLMConfig, tokenizer: Any,
                 n_tokens: int) -> str:
    """Every prompt token the image takes: its image tokens and the layout's markers (text)."""
    from tilevlm.preprocessing.processor import image_prompt_tokens

    layout = config.image_token_layout
    try:
        total = image_prompt_tokens(width, height, config, tokenizer)
    except ValueError:  # the layout writes text (Idefics3's row breaks): its tokenizer counts it
        return (f"prompt tokens: the {n_tokens} image tokens + the {layout} layout's markers and "
                "row breaks (give --model to count them with its tokenizer)")
    return (f"prompt tokens: {total} (the image tokens + {total - n_tokens} of the {layout} "
            "layout's markers, counted as text)")


def _config(args: argparse.Namespace) -> tuple[VLMConfig, Any]:
    """The image settings of --model (with its tokenizer, which counts the text a layout
    writes; a nanoVLM checkpoint has none unless --tokenizer is given), else of --preset."""
    from tilevlm.config import preset
    from tilevlm.weights.loading import load_processor

    if not args.model:
        return preset(args.preset or DEFAULT_PRESET), None
    source = model_source(args)
    if source.format == "nanovlm" and args.tokenizer is None:
        return source.config, None
    processor = load_processor(source, args.tokenizer)
    return processor.config, processor.tokenizer


def _save_png(path: str, original: Image.Image, resized: Image.Image, grid: tuple[int, int],
              tile_size: int, thumb: Image.Image | None, title: str) -> None:
    from pathlib import Path

    from tilevlm.files import atomic_write, make_output_dir
    from tilevlm.preprocessing.tile_figure import draw_tiles

    out = Path(path)
    make_output_dir(out.parent, "directory of --save-png")
    figure = draw_tiles(resized, grid, tile_size, thumb, title, original)
    try:  # whole or not at all
        atomic_write(out, lambda tmp: figure.save(tmp, format="PNG"))
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e}") from None
    logger.info("wrote the tile figure to %s", out)
