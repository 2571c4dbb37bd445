"""From a checked chat request to what the engine runs, through the model's own Processor (its
chat template and token layout, as `tilevlm generate` encodes a prompt): the images read from
their data: URLs or allowed files, the prompt's ids and tiles, and the counts `usage` reports.
Also the tile preview of one image, which needs the processor only (no model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tilevlm.preprocessing.image import load_image
from tilevlm.preprocessing.image_rule import image_tiles, image_transform
from tilevlm.preprocessing.processor import Processor, count_image_tokens
from tilevlm.serving.chat_request import ChatRequest
from tilevlm.serving.errors import bad_request
from tilevlm.serving.media import image_source
from tilevlm.serving.settings import ServeSettings
from tilevlm.special_tokens import get_layout, grid_token, image_pieces


@dataclass(frozen=True)
class Prompt:
    input_ids: torch.Tensor  # [1, T]
    pixel_values: torch.Tensor | None  # [N_tiles, 3, S, S]
    max_tokens: int
    image_tokens: int  # of the prompt's tokens, the images' (markers included)
    tiles: int

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids.shape[1]


def load_request_image(url: str, param: str, settings: ServeSettings) -> Image.Image:
    """One image of a request, decoded (a 400 when it is not one, or is too large)."""
    source = image_source(url, param, settings.allowed_local_media_path)
    try:
        return load_image(source, max_pixels=settings.max_image_pixels)
    except ValueError as e:
        name = "the data: URL" if isinstance(source, bytes) else Path(source).name
        message = str(e).replace("<bytes>", name)
        raise bad_request(f"{param}: {message}", param, "invalid_image") from None


def prepare_prompt(processor: Processor, chat: ChatRequest, settings: ServeSettings,
                   max_len: int) -> Prompt:
    """The engine's prompt for `chat`; a 400 for a bad image, a prompt the processor refuses,
    or a prompt + max_tokens past `max_len` positions."""
    images = [load_request_image(url, param, settings) for url, param in chat.image_urls]
    try:
        batch = processor([chat.messages], [images], padding_side="left",
                          add_generation_prompt=True)
    except ValueError as e:
        raise bad_request(str(e).removeprefix("sample 0: "), "messages") from None
    prompt = batch["input_ids"].shape[1]
    room = max_len - prompt
    if room < 1:
        raise bad_request(f"the prompt takes {prompt} tokens, which leaves no room for an answer "
                          f"in the model's {max_len} positions", "messages",
                          "context_length_exceeded")
    max_tokens = chat.max_tokens
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, room)
    elif max_tokens > room:
        raise bad_request(f"the prompt ({prompt} tokens) + max_tokens ({max_tokens}) is more "
                          f"than the model's {max_len} positions; ask for at most {room} new "
                          "tokens", "max_tokens", "context_length_exceeded")
    cfg = processor.config
    image_tokens = sum(count_image_tokens(i.width, i.height, cfg) for i in images)
    return Prompt(batch["input_ids"], batch["pixel_values"], max_tokens, image_tokens,
                  int(batch["n_tiles"][0]))


def tile_preview(processor: Processor, image: Image.Image) -> dict[str, Any]:
    """How the model sees `image`: its resized size, its tile grid with each tile's grid token
    (None where the layout writes none: a lone tile that is the global one), the global tile's
    token, and the tiles and tokens it takes; from the processor's own rules, no model needed."""
    cfg = processor.config
    resized, _, (rows, cols) = image_transform(cfg).resize(image)
    written = {text for text, _ in image_pieces((rows, cols), cfg.mp_image_token_length,
                                                 cfg.use_global_tile, cfg.image_token_layout)}
    global_token = get_layout(cfg.image_token_layout).global_token
    return {
        "original": [image.width, image.height],
        "resized": [resized.width, resized.height],
        "tile_size": cfg.vit_img_size,
        "grid": [rows, cols],
        "labels": [[grid_token(r, c) if grid_token(r, c) in written else None
                    for c in range(1, cols + 1)] for r in range(1, rows + 1)],
        "global_tile": global_token if global_token in written else None,
        "tiles": image_tiles(image.width, image.height, cfg),
        "tokens_per_tile": cfg.mp_image_token_length,
        "image_tokens": count_image_tokens(image.width, image.height, cfg),
        "layout": cfg.image_token_layout,
    }
