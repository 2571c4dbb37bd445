"""`tilevlm merge`: fold a LoRA adapter into its base model, giving a plain model directory.

    tilevlm merge --model runs/vlm-448 --adapter runs/lora --out runs/merged
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tilevlm.commands.options import (add_model_argument, add_new_out_arguments,
                                      add_threads_argument, check_new_out, check_outputs,
                                      model_source, write_new_out)

HELP = "merge a LoRA adapter (from `tilevlm train --lora`) into its base model"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, help="the base model the adapter was trained on (any --model "
                       "form: a model directory, a checkpoint, a run folder)")
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="an adapter directory (adapter.safetensors + adapter_config.json), "
                        "or the run folder of a LoRA run (its adapter/)")
    add_new_out_arguments(parser)
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from tilevlm.training.lora import load_adapter, merge_lora, read_adapter_config
    from tilevlm.weights.loading import load_model, load_processor
    from tilevlm.weights.native import save_pretrained

    check_new_out(args)
    adapter = _adapter_dir(Path(args.adapter))
    read_adapter_config(adapter)  # a bad adapter config fails before the base weights load
    base = model_source(args)
    check_outputs({"--out": args.out}, {"--model": base.directory, "--adapter": adapter})
    processor = load_processor(base)
    model = load_model(base, processor, "cpu", torch.float32)
    merge_lora(load_adapter(model, adapter))
    write_new_out(args.out, lambda tmp: save_pretrained(model, tmp, tokenizer=processor.tokenizer))
    log.info("merged %s into %s: wrote %s (%s parameters)", adapter, base.directory, args.out,
             f"{model.num_parameters():,}")
    return 0


def _adapter_dir(path: Path) -> Path:
    from tilevlm.training.lora import ADAPTER_CONFIG, ADAPTER_DIR

    for candidate in (path, path / ADAPTER_DIR):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise ValueError(f"--adapter {path}: no {ADAPTER_CONFIG} here or in {ADAPTER_DIR}/; give the "
                     "adapter directory or the run folder of `tilevlm train --lora`")
