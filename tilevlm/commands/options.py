"""Command-line options that several commands share, and what they become in the library.

Not a command itself: `generate` and `chat` take the generation options, and every command with
`--weights` (`generate`, `chat`, `eval`, `bench`) takes the one definition here.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy modules are imported when a command runs
    from torch import nn

    from tilevlm.inference.sampling import SamplingParams

AUTO_WEIGHTS = "auto"
LOADED_DTYPE = "bf16 on CUDA, fp32 on CPU"  # what `auto` keeps: the dtype the model loads in


def add_weights_argument(parser: argparse.ArgumentParser, purpose: str, auto: str) -> None:
    """`--weights`: how the weights are stored for `purpose`; `auto` keeps `auto` (in words)."""
    from tilevlm.inference.quantize import WEIGHT_FORMATS

    parser.add_argument("--weights", default=AUTO_WEIGHTS, choices=(AUTO_WEIGHTS, *WEIGHT_FORMATS),
                        help=f"how the weights are stored for {purpose}. {AUTO_WEIGHTS}: {auto}. "
                        "bf16 and int8 (weight-only) read fewer bytes per token, and a decode "
                        "step is bound by those bytes, so they generate faster, with slightly "
                        "different numbers (docs/performance.md has the figures)")


def weights_format(args: argparse.Namespace) -> str | None:
    """The format `--weights` names, or None for `auto`."""
    return None if args.weights == AUTO_WEIGHTS else args.weights


def store_weights(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The model with its weights stored as `--weights` asks (`inference_weights`)."""
    from tilevlm.inference.quantize import inference_weights

    weights = weights_format(args)
    return model if weights is None else inference_weights(model, weights)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, device, sampling and weight options of `generate` and `chat`."""
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory (from `tilevlm demo`/`train`, a nanoVLM checkpoint, or "
                        "an Idefics3 / SmolVLM directory as transformers saves it)")
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
    add_weights_argument(parser, "generation", LOADED_DTYPE)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling options as SamplingParams (a ValueError for a bad value)."""
    from tilevlm.inference.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty)
