"""`tilevlm build`: make a tilevlm model directory from pretrained local weights.

Either a Hugging Face SigLIP directory + a Llama/SmolLM2 directory (with its tokenizer), a
nanoVLM checkpoint + its tokenizer, or an Idefics3 / SmolVLM directory (which also loads in place;
this writes tilevlm's own format, keeping its layout, image rule and token ids). The result loads
with `tilevlm generate/chat/eval/train`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tilevlm.commands.options import (add_new_out_arguments, check_new_out, check_outputs,
                                      write_new_out)

HELP = ("build a model directory from local HF SigLIP + SmolLM2 weights, a nanoVLM checkpoint "
        "or an Idefics3 / SmolVLM directory")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tilevlm.config import PRESETS

    parser.add_argument("--siglip", metavar="DIR", help="HF SiglipVisionModel or SiglipModel directory")
    parser.add_argument("--llm", metavar="DIR",
                        help="HF Llama / SmolLM2 directory (safetensors, config.json, tokenizer)")
    parser.add_argument("--nanovlm", metavar="DIR", help="nanoVLM checkpoint directory instead")
    parser.add_argument("--idefics3", metavar="DIR",
                        help="Idefics3 / SmolVLM directory (transformers) instead, with its tokenizer")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer directory (default: the --llm directory; required with --nanovlm)")
    parser.add_argument("--preset", default="split_448", choices=sorted(PRESETS),
                        help="image settings (max_img_size, global tile, lm_max_length) for an HF build")
    add_new_out_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tilevlm.weights.huggingface import build_from_hf
    from tilevlm.weights.nanovlm import load_nanovlm
    from tilevlm.weights.native import save_pretrained
    from tilevlm.config import preset
    from tilevlm.preprocessing.processor import Processor
    from tilevlm.preprocessing.tokenizer import load_tokenizer

    check_new_out(args)
    check_outputs({"--out": args.out}, {f"--{name}": getattr(args, name) for name in (
        "siglip", "llm", "nanovlm", "idefics3", "tokenizer")})
    if args.idefics3:
        if args.siglip or args.llm or args.nanovlm:
            raise ValueError("give --idefics3 DIR alone (not with --siglip, --llm or --nanovlm)")
        model, tokenizer = _idefics3(args.idefics3, args.tokenizer)
    elif args.nanovlm:
        if args.siglip or args.llm:
            raise ValueError("give either --nanovlm, or --siglip and --llm, not both")
        if not args.tokenizer:
            raise ValueError("--nanovlm needs --tokenizer DIR (nanoVLM checkpoints hold no tokenizer)")
        model = load_nanovlm(args.nanovlm, args.tokenizer)
        tokenizer = load_tokenizer(args.tokenizer, grid_side=model.cfg.grid_side)
    elif args.siglip and args.llm:
        base = preset(args.preset)
        tokenizer = load_tokenizer(args.tokenizer or args.llm, grid_side=base.grid_side)
        model = build_from_hf(args.siglip, args.llm, base, grid_side=base.grid_side,
                              tokenizer_base_vocab=tokenizer.base_vocab_size)
    else:
        raise ValueError("give --siglip DIR and --llm DIR (or --nanovlm DIR --tokenizer DIR)")
    Processor(model.cfg, tokenizer)  # model and tokenizer must agree before anything is written
    write_new_out(args.out, lambda tmp: save_pretrained(model, tmp, tokenizer=tokenizer))
    cfg = model.cfg
    log.info("token layout %s, image rule %s", cfg.image_token_layout, cfg.image_rule)
    print(f"wrote {args.out}: {model.num_parameters():,} parameters, tile {cfg.vit_img_size} px, "
          f"max_img_size {cfg.max_img_size}, {cfg.mp_image_token_length} tokens per tile, "
          f"vocabulary {cfg.lm_base_vocab_size} + {cfg.n_special_tokens} special tokens")
    return 0


def _idefics3(model_dir: str, tokenizer_dir: str | None) -> tuple[Any, Any]:
    """The model and tokenizer of an Idefics3 directory, checked before any weight is read."""
    from tilevlm.weights.loading import load_model, load_processor

    processor = load_processor(model_dir, tokenizer_dir)
    return load_model(model_dir, processor, "cpu"), processor.tokenizer
