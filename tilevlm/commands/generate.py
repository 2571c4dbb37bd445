"""`tilevlm generate`: answer one prompt about one or more images, streaming the answer."""

from __future__ import annotations

import argparse

from tilevlm.commands.answering import prepare_batch, stream_batch
from tilevlm.commands.options import (add_generation_arguments, check_generation_arguments,
                                      check_max_new_tokens, model_source, store_weights)

HELP = "answer a prompt about images with a trained model, streaming the answer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", default=[], metavar="IMG",
                        help="image file (repeatable; placed where <image> appears in the prompt, "
                        "else before it)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tilevlm.device import resolve_device
    from tilevlm.weights.loading import load_model, load_processor

    check_generation_arguments(args)  # bad options, model directory, images and prompt all
    # fail before the weights load or the vision encoder runs
    resolve_device(args.device)
    source = model_source(args)
    check_max_new_tokens(args.max_new_tokens, source.config)
    processor = load_processor(source, args.tokenizer)
    messages = [{"role": "user", "content": args.prompt}]
    batch = prepare_batch(processor, messages, args.image, args.max_new_tokens)
    model = store_weights(load_model(source, processor, args.device), args)
    stream_batch(model, processor, batch, args)
    return 0
