"""`tilevlm eval`: exact-match accuracy (overall and per question type) and mean loss of a saved
model on a data source; writes a JSON report.

    tilevlm eval --model runs/tiny --data synthetic --split test --n 200 --out report.json
    tilevlm eval --model runs/tiny --data synthetic --n 200 > report.json   # the report on stdout
"""

from __future__ import annotations

import argparse
import json
import logging

from tilevlm.commands.options import (LOADED_DTYPE, add_device_argument, add_model_argument,
                                      add_threads_argument, add_weights_argument, model_path,
                                      store_weights)

HELP = "evaluate a saved model: exact-match accuracy and loss, as a JSON report"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--data", required=True, help="data source: 'synthetic'")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"),
                        help="which split of the synthetic data (test: images never trained on)")
    parser.add_argument("--n", type=int, default=200, help="number of samples")
    parser.add_argument("--out", metavar="FILE", help="where the JSON report goes (default: "
                        "standard output; the model directory is never written to)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples answered together")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="the longest answer, in tokens (exact match compares whole answers)")
    add_device_argument(parser)
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer directory (only for a nanoVLM checkpoint)")
    add_weights_argument(parser, "evaluation, to see what bf16 or int8 weights cost in accuracy",
                         LOADED_DTYPE)
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from tilevlm.data.sources import named_dataset
    from tilevlm.tools.evaluation import evaluate, write_report
    from tilevlm.inference.loading import load_for_inference

    if args.n < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--n, --batch-size and --max-new-tokens must be >= 1")
    model_dir = model_path(args)
    model, processor = load_for_inference(model_dir, args.device, args.tokenizer)
    model = store_weights(model, args)
    samples = named_dataset(args.data, args.split, args.n, model.cfg)
    report = evaluate(model, processor, samples, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens)
    per_type = ", ".join(f"{q} {100 * v['accuracy']:.1f}%" for q, v in report.per_qtype.items())
    log.info("%s (%s weights) on %d %s samples: exact match %.1f%% (%s), loss %.4f", model_dir,
             args.weights, report.n, args.split, 100 * report.accuracy, per_type, report.loss)
    if args.out:
        log.info("report written to %s", write_report(report, args.out))
    else:
        print(json.dumps(report.to_dict(), indent=2))
    return 0

