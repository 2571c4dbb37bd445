"""Where a decode step's time goes: torch.profiler over decode steps of the bench's model, per op,
per category and (eager) per decoder block.

    python scripts/decode_profile.py [--preset smolvlm_256m] [--weights fp32|bf16|int8|int4]
        [--batch 1] [--prompt 8] [--steps 32] [--compile [--freeze]] [--threads N]

The model is the preset's with random weights (as `tilevlm bench`), stored as --weights; a text
prompt of --prompt tokens, then --steps decode steps are profiled (after an unprofiled warm-up
generation, which also compiles). Categories, from the ops' self CPU time:
  weights      the matrix products that read the weights (mm, addmm, linear, the int8 / int4
               weight-only kernels), the LM head (its output width is the vocabulary) apart
  attention    scaled_dot_product_attention over the KV cache
  cache write  the KV cache's index_copy_
  sampling     argmax / isin / scatter after the logits (greedy here)
  other ops    every other op: norms, RoPE, SwiGLU, casts, views, allocation
  python       the step's wall time minus every op's self time: the interpreter and dispatch
               (a compiled step's own fused kernels count as its "CompiledFxGraph" op)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from contextlib import ExitStack

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from tilevlm.bench.bandwidth import decode_weight_bytes, memory_bandwidth
from tilevlm.bench.bench_config import BenchConfig
from tilevlm.host_memory import keep_freed_memory
from tilevlm.inference.generation import compiled_decode_step, generate, generate_ids
from tilevlm.inference.quantize import inference_weights
from tilevlm.model.vlm import VisionLanguageModel

WEIGHT_OPS = ("aten::mm", "aten::addmm", "aten::linear", "aten::_weight_int8pack_mm",
              "aten::_weight_int4pack_mm_for_cpu", "mkldnn::_linear_pointwise", "mkl::_mkl_linear")
CATEGORY_OPS = {"attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
                "cache write": ("aten::index_copy",),
                "sampling": ("aten::argmax", "aten::isin", "aten::scatter")}


def category(key: str, shapes: str, vocab: int) -> str:
    if key in WEIGHT_OPS:
        return "LM head" if str(vocab) in shapes else "weights"
    for name, prefixes in CATEGORY_OPS.items():
        if key.startswith(prefixes):
            return name
    return "other ops"


def block_ranges(model: VisionLanguageModel, stack: ExitStack) -> None:
    """A profiler range around every decoder block (eager only), from outside the model."""
    for i, block in enumerate(model.decoder.blocks):
        def enter(module, args, i=i):  # noqa: ANN001, ANN202
            module._range = record_function(f"block {i}")
            module._range.__enter__()

        def leave(module, args, out):  # noqa: ANN001, ANN202
            module._range.__exit__(None, None, None)

        stack.callback(block.register_forward_pre_hook(enter).remove)
        stack.callback(block.register_forward_hook(leave).remove)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smolvlm_256m")
    parser.add_argument("--weights", default="fp32", choices=("fp32", "bf16", "int8", "int4"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--freeze", action="store_true", help="with --compile: freeze_weights")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = BenchConfig(preset=args.preset).model_config()
    model = inference_weights(VisionLanguageModel(cfg).eval(), args.weights)
    ids = torch.randint(3, cfg.lm_base_vocab_size, (args.batch, args.prompt))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    step_fn = compiled_decode_step(freeze_weights=args.freeze) if args.compile else None
    start = time.perf_counter()
    generate(model, batch, max_new_tokens=args.steps + 1, eos_token_ids=[], step_fn=step_fn)
    print(f"warm-up generation {time.perf_counter() - start:.1f} s (compiles with --compile)")
    rates = [generate(model, batch, max_new_tokens=args.steps + 1, eos_token_ids=[],
                      step_fn=step_fn).stats.tokens_per_second for _ in range(3)]
    gbps = memory_bandwidth(torch.device("cpu"))
    step_bytes = decode_weight_bytes(model)
    print(f"{args.preset} decoder, {args.weights} weights, batch {args.batch}, "
          f"{'compiled' + (' frozen' if args.freeze else '') if args.compile else 'eager'} step, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}: "
          f"{statistics.median(rates):.1f} tok/s (runs {min(rates):.1f}-{max(rates):.1f}); "
          f"{step_bytes / 1e6:.1f} MB of weights a step, {gbps:.1f} GB/s copy bandwidth: bound "
          f"{gbps * 1e9 / step_bytes * args.batch:.1f} tok/s")
    with ExitStack() as stack:
        if not args.compile:
            block_ranges(model, stack)
        steps = generate_ids(model, batch, args.steps + 1, eos_token_ids=[], step_fn=step_fn)
        next(steps)  # the prefill and the first token stay out of the profile
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            for tokens, _ in steps:
                tokens.tolist()  # what generate does each step: the host reads the tokens
            wall = (time.perf_counter() - start) / args.steps
    report(prof, wall, args.steps, cfg.lm_vocab_size, args.top)


def report(prof: profile, wall: float, steps: int, vocab: int, top: int) -> None:
    events = prof.key_averages(group_by_input_shape=True)
    per_category: dict[str, float] = defaultdict(float)
    ops = [e for e in events if not e.key.startswith("block ")]
    for e in ops:
        per_category[category(e.key, str(e.input_shapes), vocab)] += e.self_cpu_time_total
    ms = {k: v / 1e3 / steps for k, v in per_category.items()}
    python = wall * 1e3 - sum(ms.values())
    print(f"one step: {wall * 1e3:.2f} ms wall")
    for name, value in sorted({**ms, "python": python}.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<12} {value:7.2f} ms  {value / (wall * 1e3):5.1%}")
    blocks = [e.cpu_time_total / 1e3 / steps for e in events if e.key.startswith("block ")]
    if blocks:
        print(f"per block (total CPU time): mean {statistics.mean(blocks):.3f} ms, "
              f"min {min(blocks):.3f}, max {max(blocks):.3f}, {len(blocks)} blocks")
    print(f"top ops by self time ({'calls/step':>10}, ms/step):")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"  {e.key[:44]:<44} {str(e.input_shapes)[:50]:<50} {e.count / steps:6.1f} "
              f"{e.self_cpu_time_total / 1e3 / steps:8.3f}")


if __name__ == "__main__":
    main()
