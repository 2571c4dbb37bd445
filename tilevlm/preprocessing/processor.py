"""Processor: chat messages (or already-templated prompt texts) + images -> a model batch
(input_ids, attention_mask, labels, tiles).

Each `<image>` in a message's content is replaced by that image's image string (the config's
token layout, see `image_string`), in order. The contract checked here and again by the model:
the number of image-token ids equals total tiles x `mp_image_token_length`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from tilevlm.config import IGNORE_INDEX, VLMConfig
from tilevlm.preprocessing.image import ImageLike, default_image_threads, thread_map
from tilevlm.preprocessing.image_rule import image_grid, image_tiles, image_transform
from tilevlm.preprocessing.chat_template import (IMAGE_PLACEHOLDER, PlaceholderMismatch,
                                                 check_message, fill_placeholders,
                                                 place_image_placeholders)
from tilevlm.preprocessing.tokenizer import VLMTokenizer
from tilevlm.special_tokens import (get_layout, image_label, image_pieces, image_tokens,
                                    text_runs)


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
    """Image tokens of a width x height image, without reading pixels: the placeholders its
    tiles' features replace, tiles x `mp_image_token_length`, in every layout. The one
    definition `generate`, `chat`, `eval` and `inspect` report (README: "image tokens"); the
    markers a layout writes around them are text tokens (`image_prompt_tokens` adds them)."""
    return image_tiles(width, height, config) * config.mp_image_token_length


def image_prompt_tokens(width: int, height: int, config: VLMConfig,
                        tokenizer: VLMTokenizer | None = None) -> int:
    """Every prompt token a width x height image takes: its image tokens plus the layout's
    markers and any text the layout writes between them (Idefics3's row breaks, which need the
    tokenizer to count), without reading pixels."""
    pieces = image_pieces(image_grid(width, height, config), config.mp_image_token_length,
                          config.use_global_tile, config.image_token_layout)
    n_special, runs = text_runs(pieces)
    if runs and tokenizer is None:
        raise ValueError(f"the {config.image_token_layout} layout writes text between its "
                         "tokens: counting them needs the tokenizer")
    return n_special + sum(len(ids) for ids in tokenizer.encode_batch(runs)) if runs else n_special


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
                 image_threads: int | None = None, jpeg_draft: bool = False,
                 fast_resize: bool = False) -> None:
        if tokenizer.grid_side < config.max_tiles_per_side:
            raise ValueError(f"the tokenizer's {tokenizer.grid_side}x{tokenizer.grid_side} grid "
                             f"tokens cannot name the {config.max_tiles_per_side}-tile sides that "
                             f"max_img_size {config.max_img_size} allows")
        spec, held = get_layout(config.image_token_layout), tokenizer.layout
        if (held.image_token, held.global_token, held.appended) != (
                spec.image_token, spec.global_token, spec.appended):
            raise ValueError(f"the tokenizer holds the {held.name} layout's tokens, the config "
                             f"names the {spec.name} layout")
        # The model finds image tokens by id and embeds every id: both must agree with the config.
        if (tokenizer.image_token_id != config.image_token_id
                or len(tokenizer) > config.lm_vocab_size):
            raise ValueError(f"tokenizer and config disagree: the tokenizer has "
                             f"{tokenizer.base_vocab_size} base tokens and {len(tokenizer)} in "
                             f"all, the config lm_base_vocab_size {config.lm_base_vocab_size} and "
                             f"lm_vocab_size {config.lm_vocab_size} (image token id "
                             f"{tokenizer.image_token_id} in the tokenizer, "
                             f"{config.image_token_id} in the config)")
        self.config = config
        self.tokenizer = tokenizer
        # the config's image rule (jpeg_draft, fast_resize: opt-in speed, not the peer's pixels)
        self.transform = image_transform(config, jpeg_draft=jpeg_draft, fast_resize=fast_resize)
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
            messages, strings = self._place_images(index, messages, sample_grids)
            try:
                sample_ids, sample_labels = self._tokenize(messages, add_generation_prompt,
                                                           strings)
            except PlaceholderMismatch as e:
                raise ValueError(f"sample {index}: {e}") from None
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

    def encode_texts(self, texts: list[str], images: list[list[ImageLike]] | None = None,
                     padding_side: str = "right") -> dict[str, Any]:
        """Prompt texts that are already templated, each `<image>` in them standing for the
        next image of its sample -> the batch `__call__` gives (labels all -100). The
        tokenizer's post-processor applies (a BOS, say), as in transformers' processors. The
        caller wrote the template's markers, so special tokens in these texts are parsed, as
        transformers does; user text belongs in messages (`__call__`), where it stays text."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        images = images if images is not None else [[] for _ in texts]
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} texts but images for {len(images)} samples")
        loaded = self._load_images(images)
        full = [self._with_images(index, text, [g for _, g in loaded[index]])
                for index, text in enumerate(texts)]
        ids = self.tokenizer.encode_batch(full, add_special_tokens=True)
        for index, sample_ids in enumerate(ids):
            self._check_sample(index, sample_ids, sum(t.shape[0] for t, _ in loaded[index]))
        batch = self._pad(ids, [[IGNORE_INDEX] * len(x) for x in ids], padding_side)
        flat = [t for sample in loaded for t, _ in sample]
        batch["pixel_values"] = torch.cat(flat) if flat else None  # (N_tiles, 3, T, T)
        batch["grids"] = [[g for _, g in sample] for sample in loaded]
        batch["n_tiles"] = [sum(t.shape[0] for t, _ in sample) for sample in loaded]
        return batch

    def _with_images(self, index: int, text: str, grids: list[tuple[int, int]]) -> str:
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"sample {index}: {len(pieces) - 1} {IMAGE_PLACEHOLDER} in the text "
                             f"but {len(grids)} images")
        strings = self._image_strings(grids)
        return pieces[0] + "".join(s + p for s, p in zip(strings, pieces[1:]))

    def _image_strings(self, grids: list[tuple[int, int]]) -> list[str]:
        """Each image's label (the layout's, often none) and image string, in order."""
        cfg = self.config
        return [image_label(cfg.image_token_layout, k, len(grids)) + image_string(
            self.tokenizer, g, cfg.mp_image_token_length, cfg.use_global_tile,
            cfg.image_token_layout) for k, g in enumerate(grids)]

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
                      grids: list[tuple[int, int]]) -> tuple[list[dict[str, str]], list[str]]:
        """The messages with one `<image>` per image (as written, or at the start of the first
        user message), and each image's tokens as text, in order."""
        for i, m in enumerate(messages):
            check_message(m, i)
        try:
            messages = place_image_placeholders(messages, len(grids))
        except ValueError as e:
            raise ValueError(f"sample {index}: {e}") from None
        return messages, self._image_strings(grids)

    def _tokenize(self, messages: list[dict[str, str]], add_generation_prompt: bool,
                  images: list[str] = ()) -> tuple[list[int], list[int]]:
        """Token ids in the tokenizer's chat format, and labels that keep only the assistant
        replies (their content and closing marker). The template writes the messages with their
        `<image>` placeholders (as transformers' processors get them); each placeholder of the
        written text then becomes its image's tokens (`images`, in order). A special token
        spelled in a message is encoded as text (`user_text`)."""
        # User text stays text: special tokens come from the template and the images only.
        segments, hidden = self.tokenizer.marked_segments(messages, add_generation_prompt)
        texts = fill_placeholders([text for text, _ in segments], list(images))
        encoded = self.tokenizer.encode_marked(texts, hidden)
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
            token = self.tokenizer.layout.image_token
            raise ValueError(f"sample {index}: {found} {token} tokens in the text but "
                             f"{n_tiles} tiles x {self.config.mp_image_token_length} = {expected} "
                             f"expected (is {token} written in the text itself?)")

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
