"""`tilevlm train`: train a model (a preset, a config file, or a model directory such as one
`tilevlm build` wrote) on the synthetic data or a local dataset, in one process or under torchrun.

    tilevlm train --preset tiny --data synthetic --out runs/tiny --steps 300
    tilevlm train --resume runs/tiny --data synthetic --out runs/tiny --steps 600
    tilevlm train --model runs/vlm-448 --data the_cauldron/ai2d --pack 2048 --out runs/ai2d
    torchrun --nproc_per_node 4 -m tilevlm.cli train --model runs/vlm-448 --data data.json ...
    torchrun --nproc_per_node 8 -m tilevlm.cli train --model BIG --data ... --fsdp \
        --activation-checkpointing                    # sharded (FSDP2), activations recomputed

Every TrainConfig field is a flag (`--lr-decoder`, `--save-every`, `--pack`, ...) with
TrainConfig's default; `--out` is `out_dir`. See docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from typing import Any

from tilevlm.commands.options import add_model_argument, add_threads_argument, model_source

HELP = "train a model (or continue a run) on a data source"

log = logging.getLogger(__name__)

_SKIP_FIELDS = ("out_dir",)  # set by --out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tilevlm.config import PRESETS
    from tilevlm.training.train_config import TrainConfig

    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=sorted(PRESETS), help="model configuration by name")
    model.add_argument("--config", metavar="FILE", help="model configuration (VLMConfig JSON)")
    add_model_argument(model, required=False, help="start from this model (a model directory "
                       "such as `tilevlm build` writes, an Idefics3 / SmolVLM directory read in "
                       "place, a checkpoint, or a run folder: its final model, else its latest "
                       "checkpoint); its tokenizer comes with it")
    parser.add_argument("--resume", metavar="DIR", help="continue from a checkpoint or a run "
                        "directory (its latest checkpoint); the model comes from it")
    parser.add_argument("--data", required=True, help="'synthetic', or a dataset path: parquet "
                        "file/directory/glob, a save_to_disk directory, a LLaVA .json/.jsonl")
    parser.add_argument("--data-format", choices=("parquet", "hf", "llava"),
                        help="the format of --data (default: detected from the path)")
    parser.add_argument("--image-root", metavar="DIR", help="where image paths in the data are "
                        "looked up (default: the data file's directory)")
    parser.add_argument("--val-data", metavar="PATH", help="validation dataset path (same "
                        "format and image root as --data); default for real data: none")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory (a new "
                        "folder, or the run folder --resume continues); held by the run while "
                        "it writes there, so a second writer is refused")
    parser.add_argument("--overwrite", action="store_true", help="start a new run in a --out "
                        "that holds one: its checkpoints, latest, model/, adapter/ and metrics "
                        "are deleted before step 1 (other files are left alone)")
    parser.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer directory "
                        "(needed for real data unless --model/--resume bring one; default for "
                        "synthetic data: a BPE trained on its corpus)")
    parser.add_argument("--train-size", type=int, default=100_000,
                        help="synthetic training samples (the order repeats after this many)")
    parser.add_argument("--val-size", type=int, default=256, help="synthetic validation samples")
    add_threads_argument(parser)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _SKIP_FIELDS:
            _add_field(parser, f)
    # Not given: TrainConfig's default, but never more than a tenth of a shorter run, so
    # `--steps 30` alone trains with a decaying learning rate (a given value above --steps is
    # refused by TrainConfig).
    default_warmup = TrainConfig().warmup_steps
    parser.set_defaults(warmup_steps=None)
    for action in parser._actions:
        if action.dest == "warmup_steps":
            action.help = (f"linear warmup steps (default: {default_warmup}, or a tenth of "
                           "--steps when that is less)")


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    flag = "--" + f.name.replace("_", "-")
    if isinstance(f.default, bool):
        parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction,
                            help=f.metadata.get("help"))
    else:
        parser.add_argument(flag, type=type(f.default), default=f.default,
                            choices=f.metadata.get("choices"), help=f.metadata.get("help"))


def train_config(args: argparse.Namespace) -> Any:
    from tilevlm.training.train_config import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name not in _SKIP_FIELDS}
    if values["warmup_steps"] is None:
        values["warmup_steps"] = min(TrainConfig().warmup_steps, values["steps"] // 10)
    return TrainConfig(**values, out_dir=args.out)


def run(args: argparse.Namespace) -> int:
    from tilevlm.training import distributed
    from tilevlm.device import resolve_device

    cfg = train_config(args)
    device = distributed.rank_device(resolve_device(cfg.device))
    with distributed.process_group(device):
        if not distributed.is_main():  # one set of log lines: rank 0's (warnings from all)
            logging.getLogger().setLevel(logging.WARNING)
        return _train(args, cfg)


def _train(args: argparse.Namespace, cfg: Any) -> int:
    with _claim_out(args):  # before any work: a second writer or an old run refused here
        return _train_in(args, cfg)


def _claim_out(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """--out checked (not an input nor holding one, no run there unless resumed or
    overwritten) and locked by rank 0 for the whole run (`training/run_lock.py`)."""
    from tilevlm.commands.options import check_outputs
    from tilevlm.training import distributed
    from tilevlm.training.run_lock import claim_run_dir

    data = None if args.data == "synthetic" else args.data
    check_outputs({"--out": args.out}, {"--data": data, "--val-data": args.val_data,
                                        "--image-root": args.image_root, "--config": args.config,
                                        "--tokenizer": args.tokenizer, "--model": args.model})
    if distributed.env_rank_world()[0] != 0:  # rank 0 claims the folder for the whole job
        return contextlib.nullcontext()
    return claim_run_dir(args.out, args.resume, args.overwrite)


def _train_in(args: argparse.Namespace, cfg: Any) -> int:
    from tilevlm.data.sources import training_data
    from tilevlm.preprocessing.processor import Processor
    from tilevlm.training.loop import train

    ckpt = _resume_checkpoint(args)
    model, tokenizer = _model_and_tokenizer(args, cfg.seed, ckpt)
    processor = Processor(model.cfg, tokenizer)
    train_data = training_data(args.data, "train", args.train_size, model.cfg, args.data_format,
                               args.image_root)
    result = train(model, processor, train_data, _val_data(args, model.cfg, processor, cfg), cfg,
                   resume_from=ckpt, overwrite=args.overwrite)
    if result.interrupted:
        log.info("interrupted at step %d; to continue, run the same command with --resume %s",
                 result.step, args.out)
        return 130
    val = result.val or {}
    loss = "none (no step left to run)" if result.loss is None else f"{result.loss:.4f}"
    log.info("done: step %d, loss %s%s; checkpoint %s; model %s", result.step, loss,
             f", validation exact match {100 * val['val_accuracy']:.1f}%" if val else "",
             result.checkpoint, result.model_dir)
    return 0


def _val_data(args: argparse.Namespace, config: Any, processor: Any, cfg: Any) -> Any:
    """The synthetic validation split, the first samples of --val-data, or None."""
    from tilevlm.data.sources import DatasetSpec, named_dataset

    if args.val_data:
        spec = DatasetSpec(args.val_data, args.data_format, args.image_root)
        return spec.first_samples(cfg.eval_batches * cfg.batch_size, processor)
    if args.data == "synthetic" and args.data_format is None:
        return named_dataset(args.data, "validation", args.val_size, config)
    return None


def _resume_checkpoint(args: argparse.Namespace) -> Any:
    """The checkpoint --resume names (found once, so a fallback is reported once), or None."""
    from tilevlm.weights.run_folder import checkpoint_to_resume

    return checkpoint_to_resume(args.resume) if args.resume else None


def _model_and_tokenizer(args: argparse.Namespace, seed: int, ckpt: Any) -> tuple[Any, Any]:
    """A fresh model from --preset/--config, the model of --model or of the --resume
    checkpoint `ckpt`, and its tokenizer (--tokenizer overrides the one a model directory
    holds)."""
    import torch

    from tilevlm.weights.native import load_pretrained
    from tilevlm.config import VLMConfig, preset
    from tilevlm.model.vlm import VisionLanguageModel
    from tilevlm.preprocessing.tokenizer import load_tokenizer

    if ckpt is not None and not (args.preset or args.config or args.model):
        model = _resume_skeleton(ckpt, args.lora) or load_pretrained(ckpt).train()
        return model, load_tokenizer(args.tokenizer or ckpt, grid_side=model.cfg.grid_side,
                                     layout=model.cfg.image_token_layout)
    if args.model:  # our directory, or an Idefics3 / SmolVLM (or nanoVLM) one read in place
        from tilevlm.weights.loading import load_model, load_processor

        source = model_source(args)
        processor = load_processor(source, args.tokenizer)
        model = load_model(source, processor, "cpu", torch.float32)
        return model.train(), processor.tokenizer
    if not (args.preset or args.config):
        raise ValueError("give --preset NAME, --config FILE or --model DIR (or --resume DIR)")
    config = preset(args.preset) if args.preset else VLMConfig.from_json(args.config)
    tokenizer, config = _tokenizer_for(args, config)
    torch.manual_seed(seed)
    return VisionLanguageModel(config), tokenizer


def _resume_skeleton(ckpt: Any, lora: int) -> Any:
    """For a LoRA checkpoint (its adapters' tensors beside the base ones), a model of its config
    whose weights `train` loads after adding the adapters; None for any other checkpoint. A
    ValueError when --lora differs from the checkpoint's."""
    from tilevlm.files import read_json_object
    from tilevlm.model.vlm import VisionLanguageModel
    from tilevlm.weights.run_folder import TRAINER_STATE
    from tilevlm.weights.native import load_config

    saved = read_json_object(ckpt / TRAINER_STATE).get("train_config", {}).get("lora", 0)
    if saved != lora:
        raise ValueError(f"{ckpt} was trained with --lora {saved}; resume with --lora {saved} "
                         "(and its other --lora-* options)")
    return VisionLanguageModel(load_config(ckpt)).train() if saved else None


def _tokenizer_for(args: argparse.Namespace, config: Any) -> tuple[Any, Any]:
    """--tokenizer, or for synthetic data a BPE trained on its corpus; the config's base
    vocabulary follows the tokenizer."""
    from tilevlm.data.sources import synthetic_tokenizer

    if args.tokenizer:
        from tilevlm.preprocessing.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, grid_side=config.grid_side)
        if tokenizer.base_vocab_size != config.lm_base_vocab_size:
            log.info("lm_base_vocab_size %d -> %d (the tokenizer's)", config.lm_base_vocab_size,
                     tokenizer.base_vocab_size)
            config = config.replace(lm_base_vocab_size=tokenizer.base_vocab_size)
        return tokenizer, config
    if args.data != "synthetic":
        raise ValueError("--tokenizer DIR (or --model DIR) is needed for data other than "
                         "'synthetic'")
    return synthetic_tokenizer(config)

