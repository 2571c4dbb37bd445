"""`tilevlm eval`: score a saved model.

    tilevlm eval --model runs/tiny --data synthetic --split test --n 200 --out report.json
    tilevlm eval --model runs/tiny --data synthetic --n 200 > report.json   # the report on stdout
    tilevlm eval --model runs/vlm --data ai2d/test.parquet --task ai2d --limit 500 --out ai2d.json
    tilevlm eval --model runs/vlm --data val.jsonl --image-root images/ --task textvqa --out r.json

On the built-in synthetic data: exact match (overall and per question type) and the mean loss.
On a local data set: a named task's metric (`tilevlm.evaluation.tasks`), overall and per
category, a JSON report and every prediction as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tilevlm.commands.options import (LOADED_DTYPE, add_device_argument, add_model_argument,
                                      add_threads_argument, add_weights_argument,
                                      check_max_new_tokens, check_output_file, check_outputs,
                                      model_source, store_weights)

HELP = "evaluate a saved model: the synthetic quiz, or a benchmark task on a local data set"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tilevlm.evaluation.tasks import TASKS
    from tilevlm.data.readers.dataset import FORMATS

    add_model_argument(parser)
    parser.add_argument("--data", required=True,
                        help="'synthetic', or a local data set: parquet file(s), a save_to_disk "
                        "directory, or a .json / .jsonl file")
    parser.add_argument("--task", choices=sorted(TASKS), default=None,
                        help="what to score on a local data set (default: exact_match, the "
                        "final assistant message of conversation data)")
    parser.add_argument("--data-format", choices=FORMATS, default=None,
                        help="the format of --data, when it cannot be told from the path")
    parser.add_argument("--image-root", metavar="DIR",
                        help="where image paths in the data are found (default: beside the data)")
    parser.add_argument("--split", default="test",
                        help="the split of the synthetic data (train, validation, test: images "
                        "never trained on), or of a saved DatasetDict")
    parser.add_argument("--n", type=int, default=200, help="synthetic samples to evaluate")
    parser.add_argument("--limit", type=int, default=None,
                        help="score at most this many samples of a local data set")
    parser.add_argument("--out", metavar="FILE", help="where the JSON report goes (default: "
                        "standard output; the model directory is never written to)")
    parser.add_argument("--predictions", metavar="FILE",
                        help="every prediction of a task as JSON lines (default: beside --out, "
                        "*.predictions.jsonl)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples answered together")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="the longest answer, in tokens (default: 16 on synthetic data, "
                        "else the task's)")
    add_device_argument(parser)
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer directory (only for a nanoVLM checkpoint)")
    add_weights_argument(parser, "evaluation, to see what bf16 or int8 weights cost in accuracy",
                         LOADED_DTYPE)
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from tilevlm.weights.loading import load_model, load_processor

    if args.n < 1 or args.batch_size < 1 or any(
            v is not None and v < 1 for v in (args.max_new_tokens, args.limit)):
        raise ValueError("--n, --limit, --batch-size and --max-new-tokens must be >= 1")
    source = model_source(args)
    model_dir = source.directory
    _check_outputs(args, model_dir)  # before any work: not after the whole evaluation ran
    processor = load_processor(source, args.tokenizer)
    if args.max_new_tokens is not None:
        check_max_new_tokens(args.max_new_tokens, processor.config)
    on_task = args.data != "synthetic" or args.task is not None
    data = _task_data(args, processor) if on_task else None  # checked before the weights load
    model = store_weights(load_model(source, processor, args.device), args)
    if data is not None:
        return _run_task(args, model, processor, model_dir, *data)
    return _run_synthetic(args, model, processor, model_dir)


def _predictions_path(args: argparse.Namespace) -> Path | None:
    """--predictions, else beside --out (*.predictions.jsonl), else None."""
    if args.predictions:
        return Path(args.predictions)
    return Path(args.out).with_suffix(".predictions.jsonl") if args.out else None


def _check_outputs(args: argparse.Namespace, model_dir: Path) -> None:
    """--out and the predictions file: files that can be written, none of them an input (the
    data, the model) or the other."""
    on_task = args.data != "synthetic" or args.task is not None
    predictions = _predictions_path(args) if on_task else None
    for name, path in (("--out", args.out), ("--predictions", predictions)):
        if path is not None:
            check_output_file(path, name)
    data = None if args.data == "synthetic" else args.data
    check_outputs({"--out": args.out, "--predictions": predictions},
                  {"--data": data, "--image-root": args.image_root, "--model": model_dir,
                   "--tokenizer": args.tokenizer})


def _run_synthetic(args: argparse.Namespace, model, processor, model_dir: Path) -> int:
    from tilevlm.data.sources import named_dataset
    from tilevlm.evaluation.quiz import evaluate

    samples = named_dataset(args.data, args.split, args.n, model.cfg)
    report = evaluate(model, processor, samples, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens or 16)
    per_type = ", ".join(f"{q} {100 * v['score']:.1f}%" for q, v in report.per_category.items())
    log.info("%s (%s weights) on %d %s samples: exact match %.1f%% (%s), loss %.4f", model_dir,
             args.weights, report.n, args.split, 100 * report.score, per_type, report.loss)
    return _hand_out(report, args.out)


def _task_data(args: argparse.Namespace, processor):
    """(task, samples, skips) of a local data set; a wrong path or missing column fails here."""
    from tilevlm.evaluation.task_run import task_samples
    from tilevlm.evaluation.tasks import get_task

    if args.data == "synthetic":
        raise ValueError("--task scores a local data set; give --data PATH (the synthetic "
                         "data is scored without --task)")
    task = get_task(args.task or "exact_match")
    samples, skips = task_samples(task, args.data, processor, args.data_format, args.image_root,
                                  split=args.split)
    return task, samples, skips


def _run_task(args: argparse.Namespace, model, processor, model_dir: Path, task, samples,
              skips) -> int:
    from tilevlm.evaluation.report import write_predictions
    from tilevlm.evaluation.task_run import run_task

    report, predictions = run_task(model, processor, samples, task, skips, args.batch_size,
                                   args.max_new_tokens, args.limit)
    report.model, report.data = str(model_dir), str(args.data)
    per_category = ", ".join(f"{c} {100 * v['score']:.1f}%" for c, v in report.per_category.items())
    aggregate = "" if report.aggregation == "mean" else (
        f" ({report.aggregation} over {task.group}; plain mean {100 * report.mean:.1f}%)")
    log.info("%s on %s (%s): %s %.1f%%%s over %d samples%s; skipped %s", model_dir, args.data,
             task.name, task.metric, 100 * report.score, aggregate, report.n,
             f" ({per_category})" if per_category else "", report.skipped or "none")
    log.info("prompts: %d tokens, of which %d image tokens", report.prompt_tokens,
             report.image_tokens)
    preds = _predictions_path(args)
    if preds:
        log.info("predictions written to %s", write_predictions(predictions, Path(preds)))
    else:
        log.info("predictions not written (give --out or --predictions)")
    return _hand_out(report, args.out)


def _hand_out(report, out: str | None) -> int:
    """The JSON report to `out`, or to standard output."""
    from tilevlm.evaluation.report import write_report

    if out:
        log.info("report written to %s", write_report(report, out))
    else:
        print(json.dumps(report.to_dict(), indent=2))
    return 0
