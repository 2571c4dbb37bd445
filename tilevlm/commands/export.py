"""`tilevlm export --format idefics3 MODEL OUT`: a model directory as transformers' Idefics3
format (weights/export_idefics3.py), for transformers and the serving tools that read it."""

from __future__ import annotations

import argparse
import logging

from tilevlm.commands.options import add_force_argument

HELP = "write a model directory in another library's format (idefics3: transformers, vLLM)"
FORMATS = ("idefics3",)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model directory (ours or Idefics3 / "
                        "SmolVLM), a checkpoint, or a run folder")
    parser.add_argument("out", metavar="OUT", help="directory to write (a new or empty one)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the format to write")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="tokenizer directory (default: the model's)")
    add_force_argument(parser, "OUT")


def run(args: argparse.Namespace) -> int:
    from tilevlm.commands.options import (check_new_out, check_outputs, model_source,
                                          write_new_out)
    from tilevlm.weights.export_idefics3 import check_exportable, export_idefics3
    from tilevlm.weights.loading import load_model, load_processor
    from tilevlm.weights.safetensors_files import check_finite

    check_new_out(args, "OUT")
    source = model_source(args)  # a model directory, a checkpoint or a run folder
    check_outputs({"OUT": args.out}, {"MODEL": source.directory, "--tokenizer": args.tokenizer})
    check_exportable(source.config)  # before anything heavy
    processor = load_processor(source, args.tokenizer)
    model = load_model(source, processor, "cpu")
    check_finite(model.state_dict(), f"{source.directory}")  # never written out silently
    write_new_out(args.out, lambda tmp: export_idefics3(model, processor.tokenizer, tmp))
    print(f"wrote {args.out}: Idefics3ForConditionalGeneration, {model.num_parameters():,} "
          f"parameters, {processor.config.mp_image_token_length} tokens per tile")
    return 0
