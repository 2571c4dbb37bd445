"""`tilevlm eval`: exact-match accuracy (overall and per question type) and mean loss of a saved
model on a data source; writes a JSON report.

    tilevlm eval --model runs/tiny --data synthetic --split test --n 200 --out report.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tilevlm.commands.options import LOADED_DTYPE, add_weights_argument, store_weights

HELP = "evaluate a saved model: exact-match accuracy and loss, as a JSON report"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a saved model, a training checkpoint, or a run directory (its "
                        "latest checkpoint)")
    parser.add_argument("--data", required=True, help="data source: 'synthetic'")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--n", type=int, default=200, help="number of samples")
    parser.add_argument("--out", metavar="FILE", help="report path (default: "
                        "MODEL/eval-SPLIT.json)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer directory (only for a nanoVLM checkpoint)")
    add_weights_argument(parser, "evaluation, to see what bf16 or int8 weights cost in accuracy",
                         LOADED_DTYPE)


def run(args: argparse.Namespace) -> int:
    from tilevlm.data.sources import named_dataset
    from tilevlm.tools.evaluation import evaluate, write_report
    from tilevlm.inference.loading import load_for_inference

    if args.n < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--n, --batch-size and --max-new-tokens must be >= 1")
    model_dir = resolve_model_dir(Path(args.model))
    model, processor = load_for_inference(model_dir, args.device, args.tokenizer)
    model = store_weights(model, args)
    samples = named_dataset(args.data, args.split, args.n, model.cfg)
    report = evaluate(model, processor, samples, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens)
    out = write_report(report, args.out or model_dir / f"eval-{args.split}.json")
    per_type = ", ".join(f"{q} {100 * v['accuracy']:.1f}%" for q, v in report.per_qtype.items())
    log.info("%s (%s weights) on %d %s samples: exact match %.1f%% (%s), loss %.4f", model_dir,
             args.weights, report.n, args.split, 100 * report.accuracy, per_type, report.loss)
    log.info("report written to %s", out)
    return 0


def resolve_model_dir(path: Path) -> Path:
    """A directory with config.json, or the latest checkpoint of a run directory."""
    from tilevlm.training.checkpoints import find_latest

    if (path / "config.json").is_file():
        return path
    ckpt = find_latest(path)
    if ckpt is None:
        raise ValueError(f"{path}: neither a saved model (config.json) nor a run directory "
                         "with checkpoints")
    return ckpt
