"""Processor: chat messages + images -> a model batch (input_ids, attention_mask, labels, tiles).

Each `<image>` in a message's content is replaced by that image's image string (grid tokens and
image tokens, see `image_string`), in order. The contract checked here and again by the model:
the number of IMAGE_TOKEN ids equals total tiles x `mp_image_token_length`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from tilevlm.config import IGNORE_INDEX, VLMConfig
from tilevlm.preprocessing.image import (ImageLike, ImageTransform, default_image_threads, thread_map,
                           tile_grid, tiles_per_image)
from tilevlm.preprocessing.chat_template import (IMAGE_PLACEHOLDER, check_message,
                                                 place_image_placeholders)
from tilevlm.preprocessing.tokenizer import VLMTokenizer
from tilevlm.special_tokens import IMAGE_TOKEN, image_label, image_tokens


def image_string(tokenizer: VLMTokenizer, grid: tuple[int, int], mp_image_token_length: int,
                 use_global: bool, layout: str = "tilevlm") -> str:
    """The special tokens standing for one image with this tile grid, as one string (the
    layouts are `tilevlm.special_tokens`)."""
    n_h, n_w = grid
    if not (1 <= n_h <= tokenizer.grid_side and 1 <= n_w <= tokenizer.grid_side):
        raise ValueError(f"a {n_h}x{n_w} tile grid does not fit the tokenizer's "
                         f"{tokenizer.grid_side}x{tokenizer.grid_side} grid tokens")
    return "".join(image_tokens(grid, mp_image_token_length, use_global, layout))


def count_image_tokens(width: int, height: int, config: VLMConfig) -> int:
    """Tokens (markers + image tokens) a width x height image takes, without reading pixels."""
    grid = tile_grid(width, height, config.vit_img_size, config.max_img_size,
                     config.resize_to_max_side_len)
    return tiles_per_image(grid, config.use_global_tile) * (1 + config.mp_image_token_length)


# Below this many pixels, an already-decoded image is processed faster on the calling thread:
# there is nothing to decode and little to resize, so handing it to a thread costs more than it
# saves (docs/performance.md has the figures).
SMALL_DECODED_PIXELS = 256 * 256


class Processor:
    """Turns conversations (lists of {"role", "content"} dicts) and their images into a batch.

    Images go where `<image>` appears in the messages, in order. A sample with images but no
    `<image>` at all gets them at the very start of its first user message. Labels are -100
    everywhere except the assistant replies' content tokens and their closing `<|im_end|>`.
    Samples longer than `config.lm_max_length` are refused, never truncated.
    """

    def __init__(self, config: VLMConfig, tokenizer: VLMTokenizer,
                 image_threads: int | None = None, jpeg_draft: bool = False) -> None:
        if tokenizer.grid_side < config.max_tiles_per_side:
            raise ValueError(f"the tokenizer's {tokenizer.grid_side}x{tokenizer.grid_side} grid "
                             f"tokens cannot name the {config.max_tiles_per_side}-tile sides that "
                             f"max_img_size {config.max_img_size} allows")
        # The model finds image tokens by id and embeds every id: both must agree with the config.
        if (tokenizer.image_token_id != config.lm_base_vocab_size
                or len(tokenizer) > config.lm_vocab_size):
            raise ValueError(f"tokenizer and config disagree: the tokenizer has "
                             f"{tokenizer.base_vocab_size} base tokens and {len(tokenizer)} in "
                             f"all, the config lm_base_vocab_size {config.lm_base_vocab_size} and "
                             f"lm_vocab_size {config.lm_vocab_size}")
        self.config = config
        self.tokenizer = tokenizer
        self.transform = ImageTransform(config, jpeg_draft=jpeg_draft)  # see ImageTransform
        # A batch's images are decoded on this many threads (None: `default_image_threads()`).
        self.image_threads = image_threads

    def __call__(self, conversations: list[list[dict[str, str]]],
                 images: list[list[ImageLike]] | None = None, padding_side: str = "right",
                 add_generation_prompt: bool = False) -> dict[str, Any]:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if images is not None and len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but images for {len(images)} "
                             "samples; give one (possibly empty) list of images per sample")
        loaded = self._load_images(images or [[] for _ in conversations])
        ids, labels, tiles, grids = [], [], [], []
        for index, messages in enumerate(conversations):
            sample_tiles = [t for t, _ in loaded[index]]
            sample_grids = [g for _, g in loaded[index]]
            messages = self._place_images(index, messages, sample_grids)
            sample_ids, sample_labels = self._tokenize(messages, add_generation_prompt)
            self._check_sample(index, sample_ids, sum(t.shape[0] for t in sample_tiles))
            ids.append(sample_ids)
            labels.append(sample_labels)
            tiles.append(sample_tiles)
            grids.append(sample_grids)
        batch = self._pad(ids, labels, padding_side)
        flat = [t for sample in tiles for t in sample]
        batch["pixel_values"] = torch.cat(flat) if flat else None  # (N_tiles, 3, T, T)
        batch["grids"] = grids
        batch["n_tiles"] = [sum(t.shape[0] for t in sample) for sample in tiles]
        return batch

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _load_images(self, images: list[Sequence[ImageLike]]
                     ) -> list[list[tuple[torch.Tensor, tuple[int, int]]]]:
        """Tiles and grid of every image of every sample, decoded in parallel (`image_threads`);
        the first bad image (in sample order) raises, naming its sample and position."""
        jobs = [(index, k, source) for index, sample in enumerate(images)
                for k, source in enumerate(sample or ())]

        def load(job: tuple[int, int, ImageLike]) -> tuple[torch.Tensor, tuple[int, int]]:
            index, k, source = job
            try:
                return self.transform.load(source, max_pixels=self.config.max_image_pixels)
            except ValueError as e:
                raise ValueError(f"sample {index}, image {k}: {e}") from None

        threads = default_image_threads() if self.image_threads is None else self.image_threads
        pil = [source for _, _, source in jobs if isinstance(source, Image.Image)]
        if len({id(p) for p in pil}) != len(pil):  # one PIL object twice: never load it from
            threads = 1  # two threads
        if len(pil) == len(jobs) and all(p.width * p.height < SMALL_DECODED_PIXELS for p in pil):
            threads = 1  # nothing to decode and little to resize: threads cost more than they save
        results = iter(thread_map(load, jobs, threads))
        return [[next(results) for _ in sample or ()] for sample in images]

    def _place_images(self, index: int, messages: list[dict[str, str]],
                      grids: list[tuple[int, int]]) -> list[dict[str, str]]:
        """Copies of the messages with each `<image>` replaced by its image string."""
        for i, m in enumerate(messages):
            check_message(m, i)
        try:
            messages = place_image_placeholders(messages, len(grids))
        except ValueError as e:
            raise ValueError(f"sample {index}: {e}") from None
        cfg = self.config
        strings = iter(image_label(cfg.image_token_layout, k, len(grids)) + image_string(
            self.tokenizer, g, cfg.mp_image_token_length, cfg.use_global_tile,
            cfg.image_token_layout) for k, g in enumerate(grids))
        placed = []
        for m in messages:
            pieces = m["content"].split(IMAGE_PLACEHOLDER)
            content = pieces[0] + "".join(next(strings) + p for p in pieces[1:])
            placed.append({**m, "content": content})
        return placed

    def _tokenize(self, messages: list[dict[str, str]], add_generation_prompt: bool
                  ) -> tuple[list[int], list[int]]:
        """Token ids in the tokenizer's chat format, and labels that keep only the assistant
        replies (their content and closing marker)."""
        segments = self.tokenizer.chat_segments(messages, add_generation_prompt)
        encoded = self.tokenizer.encode_batch([text for text, _ in segments])
        ids: list[int] = []
        labels: list[int] = []
        for seg_ids, (_, labelled) in zip(encoded, segments):
            ids += seg_ids
            labels += seg_ids if labelled else [IGNORE_INDEX] * len(seg_ids)
        return ids, labels

    def _check_sample(self, index: int, ids: list[int], n_tiles: int) -> None:
        limit = self.config.lm_max_length
        if len(ids) > limit:
            raise ValueError(f"sample {index}: {len(ids)} tokens, more than lm_max_length {limit} "
                             "(samples are never truncated; shorten the text or use fewer or "
                             "smaller images)")
        found = sum(1 for i in ids if i == self.tokenizer.image_token_id)
        expected = n_tiles * self.config.mp_image_token_length
        if found != expected:
            raise ValueError(f"sample {index}: {found} {IMAGE_TOKEN} tokens in the text but "
                             f"{n_tiles} tiles x {self.config.mp_image_token_length} = {expected} "
                             f"expected (is {IMAGE_TOKEN} written in the text itself?)")

    def _pad(self, ids: list[list[int]], labels: list[list[int]], side: str
             ) -> dict[str, torch.Tensor]:
        length = max((len(x) for x in ids), default=0)
        batch = len(ids)
        input_ids = torch.full((batch, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        label_ids = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        for b, (x, y) in enumerate(zip(ids, labels)):
            span = slice(0, len(x)) if side == "right" else slice(length - len(x), length)
            input_ids[b, span] = torch.tensor(x, dtype=torch.long)
            label_ids[b, span] = torch.tensor(y, dtype=torch.long)
            attention[b, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}
