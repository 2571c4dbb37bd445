"""`tilevlm generate`: answer one prompt about one or more images, streaming the answer."""

from __future__ import annotations

import argparse
import sys

HELP = "answer a prompt about images with a trained model, streaming the answer"


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, device and sampling options shared with `tilevlm chat`."""
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory (from `tilevlm demo`/`train`, or a nanoVLM checkpoint)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="tokenizer directory (needed for nanoVLM checkpoints)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when this text appears (repeatable)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--weights", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                        help="how the weights are stored for generation. auto: bf16 on CUDA, "
                        "fp32 on CPU. bf16 and int8 (weight-only) read fewer bytes per token: "
                        "on a CPU with AVX512-BF16 they answer 1.5-1.8x sooner and decode "
                        "1.5-3x faster (see `tilevlm bench`), with slightly different numbers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", default=[], metavar="IMG",
                        help="image file (repeatable; placed where <image> appears in the prompt, "
                        "else before it)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    add_sampling_arguments(parser)


def store_weights(model, args: argparse.Namespace):
    """The model with its weights stored as `--weights` asks (inference.quantize.inference_weights)."""
    from tilevlm.inference.quantize import inference_weights

    return model if args.weights == "auto" else inference_weights(model, args.weights)


def sampling_params(args: argparse.Namespace):
    from tilevlm.inference.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty)


def prepare_batch(processor, messages, images, max_new_tokens: int) -> dict:
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


def stream_batch(model, processor, batch, args, out=None) -> str:
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


def stream_answer(model, processor, messages, images, args, out=None) -> str:
    """`prepare_batch` then `stream_batch`."""
    batch = prepare_batch(processor, messages, images, args.max_new_tokens)
    return stream_batch(model, processor, batch, args, out)


def run(args: argparse.Namespace) -> int:
    from tilevlm.inference.loading import load_model, load_processor
    from tilevlm.device import resolve_device

    sampling_params(args)  # bad options, model directory, images and prompt all fail
    if args.max_new_tokens < 1:  # before the weights load or the vision encoder runs
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    resolve_device(args.device)
    processor = load_processor(args.model, args.tokenizer)
    messages = [{"role": "user", "content": args.prompt}]
    batch = prepare_batch(processor, messages, args.image, args.max_new_tokens)
    model = store_weights(load_model(args.model, processor, args.device, args.tokenizer), args)
    stream_batch(model, processor, batch, args)
    return 0
