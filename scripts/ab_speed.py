"""A/B speed check on a shared machine: baseline and fast path, alternated in one process.

    python scripts/ab_speed.py preprocess|ttft|decode|train [--rounds 3] [--ref HEAD~1]

Each round times every variant once, in turn, so load from other processes hits all of them
alike; every figure is printed with the 1-minute load average when it was taken. The preprocess
baseline is `tilevlm/preprocessing/image.py` (`tilevlm/image.py` before the move) as of --ref (git show), the others are in-tree options.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from tilevlm.inference.generation import compiled_decode_step
from tilevlm.inference.quantize import inference_weights
from tilevlm.bench.bench_config import BenchConfig
from tilevlm.bench.workload import preprocess_files, synthetic_batch
from tilevlm.inference.generation import generate
from tilevlm.model.vlm import VisionLanguageModel


def _alternate(variants: dict[str, Callable[[], float]], rounds: int, unit: str) -> None:
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            value = fn()
            results[name].append(value)
            print(f"round {r} {name:<28} {value:9.3f} {unit}  load {os.getloadavg()[0]:.2f}",
                  flush=True)
    for name, values in results.items():
        print(f"median {name:<27} {statistics.median(values):9.3f} {unit}")


def _old_image_module(ref: str):
    for where in ("tilevlm/preprocessing/image.py", "tilevlm/image.py"):  # after / before the move
        shown = subprocess.run(["git", "show", f"{ref}:{where}"], capture_output=True, text=True)
        if shown.returncode == 0:
            break
    shown.check_returncode()
    source = shown.stdout
    path = Path(tempfile.mkdtemp()) / "image_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("image_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preprocess(args: argparse.Namespace) -> None:
    from tilevlm.preprocessing.image import ImageTransform

    old = _old_image_module(args.ref)
    cfg = BenchConfig().model_config()
    new_t, old_t = ImageTransform(cfg), old.ImageTransform(cfg)
    paths = preprocess_files(Path(tempfile.mkdtemp()), 40, 0)

    def rate(fn: Callable[[Path], object]) -> float:
        start = time.perf_counter()
        for p in paths:
            fn(p)
        return len(paths) / (time.perf_counter() - start)

    _alternate({f"before ({args.ref})": lambda: rate(lambda p: old_t(old.load_image(p))),
                "after (transform.load)": lambda: rate(new_t.load)}, args.rounds, "images/s")


def _models() -> dict[str, VisionLanguageModel]:
    torch.manual_seed(0)
    fp32 = VisionLanguageModel(BenchConfig().model_config()).eval()
    return {"fp32": fp32, "bf16": inference_weights(copy.deepcopy(fp32), "bf16"),
            "int8": inference_weights(copy.deepcopy(fp32), "int8")}


def ttft(args: argparse.Namespace) -> None:
    models = _models()
    batch = synthetic_batch(models["fp32"], 1, 24, 0, "cpu", 0)

    def one(model: VisionLanguageModel) -> float:
        return generate(model, batch, max_new_tokens=1, eos_token_ids=[]).stats.time_to_first_token

    _alternate({f"{k} weights": (lambda m=m: one(m)) for k, m in models.items()}, args.rounds, "s")


def decode(args: argparse.Namespace) -> None:
    models = _models()
    variants = {}
    for b in args.batches:
        batch = synthetic_batch(models["fp32"], b, 24, 0, "cpu", 0)
        for name in args.weights:
            step = compiled_decode_step() if args.compile else None
            run = (lambda m=models[name], bt=batch, s=step: generate(
                m, bt, max_new_tokens=args.tokens, eos_token_ids=[], step_fn=s
            ).stats.tokens_per_second)
            if step is not None:
                start = time.perf_counter()
                run()  # compile
                print(f"compiled {name} b{b} in {time.perf_counter() - start:.0f} s", flush=True)
            variants[f"b{b} {name}{' compiled' if args.compile else ''}"] = run
    _alternate(variants, args.rounds, "tok/s")


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = VisionLanguageModel(BenchConfig().model_config()).train()
    batch = synthetic_batch(model, 4, 24, 64, "cpu", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    losses = {"full": lambda: model(**batch).loss, "labels": lambda: model(**batch, return_logits=False).loss}

    def step(loss_name: str, bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = losses[loss_name]()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step("labels", False)  # warm-up
    variants = {f"{'bf16' if bf16 else 'fp32'} {name} loss": (lambda n=name, b=bf16: step(n, b))
                for bf16 in args.precisions for name in ("full", "labels")}
    _alternate(variants, args.rounds, "s/step")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["preprocess", "ttft", "decode", "train"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ref", default="HEAD", help="git ref of the baseline image.py")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--weights", nargs="+", default=["fp32", "bf16", "int8"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--precisions", type=lambda s: s == "bf16", nargs="+",
                        default=[False, True], help="fp32 and/or bf16 (autocast)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load "
          f"{os.getloadavg()}", flush=True)
    {"preprocess": preprocess, "ttft": ttft, "decode": decode, "train": train}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
