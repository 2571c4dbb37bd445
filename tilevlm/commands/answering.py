"""Answering one conversation on the command line, streaming the reply: `generate` and `chat`.

Not a command itself.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from tilevlm.commands.options import sampling_params

if TYPE_CHECKING:  # heavy modules are imported when a command runs
    from torch import nn

    from tilevlm.preprocessing.processor import Processor


def prepare_batch(processor: Processor, messages: list[dict[str, str]], images: Sequence[str],
                  max_new_tokens: int) -> dict[str, Any]:
    """The model batch for one conversation, or a ValueError (a bad image, placeholders that do
    not match the images, too long for lm_max_length or for max_new_tokens more) from the
    processor alone: no weights are needed to find these."""
    from tilevlm.preprocessing.image import load_image

    config = processor.config
    loaded = [load_image(i, max_pixels=config.max_image_pixels) for i in images]
    batch = processor([messages], [loaded], padding_side="left", add_generation_prompt=True)
    prompt, limit = batch["input_ids"].shape[1], config.lm_max_position_embeddings
    if prompt + max_new_tokens > limit:
        raise ValueError(f"the prompt ({prompt} tokens) + --max-new-tokens ({max_new_tokens}) "
                         f"exceed lm_max_position_embeddings ({limit}); ask for fewer new tokens")
    return batch


def stream_batch(model: nn.Module, processor: Processor, batch: dict[str, Any],
                 args: argparse.Namespace, out: TextIO | None = None) -> str:
    """Stream the reply to `out` (stdout); print the stats line to stderr; return the reply."""
    from tilevlm.inference.generation import GenerationStats, stream_generate

    out = out or sys.stdout
    stats = GenerationStats()
    pieces = []
    for piece in stream_generate(model, batch, processor.tokenizer, args.max_new_tokens,
                                 sampling_params(args), args.stop, args.seed, stats):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    print(f"[{stats.summary()}]", file=sys.stderr)
    return "".join(pieces)


def stream_answer(model: nn.Module, processor: Processor, messages: list[dict[str, str]],
                  images: Sequence[str], args: argparse.Namespace,
                  out: TextIO | None = None) -> str:
    """`prepare_batch` then `stream_batch`."""
    batch = prepare_batch(processor, messages, images, args.max_new_tokens)
    return stream_batch(model, processor, batch, args, out)
