"""`tilevlm bench`: preprocessing, training-step, prefill, decode and vision-encoder speed."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

HELP = "measure preprocessing, training, prefill, decode and vision speed (random weights)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tilevlm.bench import PARTS, BenchConfig
    from tilevlm.config import PRESETS

    d = BenchConfig()
    parser.add_argument("--preset", default=d.preset, choices=sorted(PRESETS))
    parser.add_argument("--max-img-size", type=int, default=None,
                        help="default: 2 x the preset's tile size (2x2 grid + global tile)")
    parser.add_argument("--device", default=d.device, help="cpu, cuda or auto")
    parser.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 on CUDA, fp32 on CPU; training uses autocast in bf16")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="timed runs (median)")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed runs first")
    parser.add_argument("--train-batch", type=int, default=d.train_batch)
    parser.add_argument("--decode-tokens", type=int, default=d.decode_tokens)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=list(d.decode_batches))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="which measurements to run")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the results here")


def run(args: argparse.Namespace) -> int:
    from tilevlm.bench import BenchConfig, format_table, run_bench

    bc = BenchConfig(preset=args.preset, max_img_size=args.max_img_size, device=args.device,
                     dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
                     train_batch=args.train_batch, decode_tokens=args.decode_tokens,
                     decode_batches=tuple(args.decode_batches), parts=tuple(args.parts))
    if bc.repeats < 1 or bc.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    results = run_bench(bc)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        log.info("results written to %s", args.json)
    return 0
