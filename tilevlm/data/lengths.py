"""Sample lengths known before any pixel is decoded: image sizes from headers, exact token counts.

The Processor's token count is text tokens plus, per image, `image_prompt_tokens` of its size, and
the text around `<image>` is tokenized in pieces (special tokens split the text the same way), so
`measure` equals `len(processor(...)["input_ids"][0])` exactly while reading only image headers
(`PIL.Image.open` parses the header; pixels are decoded later, in the collator).

`LengthFilter` drops (and counts) samples over `lm_max_length` and images whose header does not
parse, and adds `n_tokens` and `n_tiles` to each sample it passes on, for packing.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Iterable, Iterator

from PIL import Image

from tilevlm.data.sample import Sample
from tilevlm.data.skips import IMAGE_ERROR, TOO_LONG, SkipCounter, SkipSample
from tilevlm.preprocessing.decoding import ImageLoadError, decoding, image_file
from tilevlm.preprocessing.image import displayed_size
from tilevlm.preprocessing.image_rule import image_tiles
from tilevlm.preprocessing.processor import image_prompt_tokens
from tilevlm.preprocessing.chat_template import IMAGE_PLACEHOLDER
from tilevlm.special_tokens import image_label

def image_size(source: Any, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header of a path, encoded bytes or a PIL image; SkipSample
    (image_error) when it does not open or is over `max_pixels`."""
    if isinstance(source, Image.Image):
        size = source.size
    else:
        size = _header_size(source)
    if size[0] <= 0 or size[1] <= 0 or size[0] * size[1] > max_pixels:
        raise SkipSample(IMAGE_ERROR, f"image size {size[0]}x{size[1]} is empty or over the "
                                      f"{max_pixels}-pixel limit")
    return size


def _header_size(source: Any) -> tuple[int, int]:
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        fp = image_file(source, name)  # a regular file: a FIFO would block the header pass
        with decoding(name, "cannot read the image header"), warnings.catch_warnings():
            # Our own pixel limit applies (above); Pillow's would only warn or raise early.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                return displayed_size(img)
    except ImageLoadError as e:
        raise SkipSample(IMAGE_ERROR, str(e)) from None


class SampleMeter:
    """Token and tile counts of raw samples, from text and image headers only."""

    def __init__(self, processor: Any) -> None:
        self.config = processor.config
        self.tokenizer = processor.tokenizer
        # More characters than this cannot fit lm_max_length tokens (the factor 4 leaves room
        # for normalizers that drop characters): such text is refused without tokenizing it.
        self.max_chars = 4 * self.config.lm_max_length * self.tokenizer.max_token_chars

    def measure(self, sample: Sample) -> tuple[int, int]:
        """(tokens, tiles) the Processor will produce for this sample."""
        cfg = self.config
        sizes = [image_size(s, cfg.max_image_pixels) for s in sample["images"]]
        n_tiles = sum(image_tiles(w, h, cfg) for w, h in sizes)
        image_tokens = sum(image_prompt_tokens(w, h, cfg, self.tokenizer) for w, h in sizes)
        return self.text_tokens(sample["messages"]) + image_tokens, n_tiles

    def text_tokens(self, messages: list[dict[str, str]]) -> int:
        """Chat-format tokens of the messages with every `<image>` replaced by its text label
        (the layout's, often none) and no special tokens (no generation prompt). The label joins
        the text before it, as in the processor, where special tokens split the text; special
        tokens spelled in the messages count as the text they are (`user_text`)."""
        n_chars = sum(len(m["content"]) for m in messages)
        if n_chars > self.max_chars:
            raise SkipSample(TOO_LONG, f"{n_chars} characters of text, more than "
                                       f"lm_max_length {self.config.lm_max_length} tokens can "
                                       "hold (never truncated)")
        layout = self.config.image_token_layout
        n_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        index = itertools.count()
        pieces: list[str] = []
        segments, hidden = self.tokenizer.marked_segments(messages)  # as the Processor does
        for text, _ in segments:
            *before, last = text.split(IMAGE_PLACEHOLDER)
            pieces += [p + image_label(layout, next(index), n_images) for p in before] + [last]
        return sum(len(ids) for ids in self.tokenizer.encode_marked(pieces, hidden))


class LengthFilter:
    """Samples of `samples` that fit `max_tokens` (default `lm_max_length`), each with `n_tokens`
    and `n_tiles` added; the rest are counted in `skips` (too_long, image_error)."""

    def __init__(self, samples: Iterable[Sample], processor: Any, max_tokens: int | None = None,
                 skips: SkipCounter | None = None) -> None:
        self.samples = samples
        self.meter = SampleMeter(processor)
        self.max_tokens = max_tokens or processor.config.lm_max_length
        self.skips = skips if skips is not None else getattr(samples, "skips", SkipCounter())

    def __iter__(self) -> Iterator[Sample]:
        for sample in self.samples:
            where = sample.get("source", "")
            try:
                n_tokens, n_tiles = self.meter.measure(sample)
            except SkipSample as e:
                self.skips.skip(e, where)
                continue
            if n_tokens > self.max_tokens:
                self.skips.add(TOO_LONG, where, f"{n_tokens} tokens, more than {self.max_tokens} "
                                                "(never truncated)")
                continue
            yield {**sample, "n_tokens": n_tokens, "n_tiles": n_tiles}
