"""The bench's measurements, each on a model and the bench's workload (`workload.py`): images
preprocessed per second, vision tiles per second, one training step against the GEMM roofline,
time to first token and decode tokens per second. Every figure is the median of `repeats` timed
runs after `warmup` untimed ones (`timing.py`); the peers' runs use the same definitions."""

from __future__ import annotations

import contextlib
import resource
import statistics
import tempfile
from pathlib import Path
from typing import Callable

import torch

from tilevlm.bench.bench_config import BenchConfig
from tilevlm.bench.roofline import count_flops, gemm_peak
from tilevlm.bench.timing import median_seconds, spread, timed_runs
from tilevlm.bench.workload import preprocess_files, synthetic_batch
from tilevlm.config import VLMConfig
from tilevlm.inference.generation import GenerationStats, compiled_decode_step, generate
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.image import ImageTransform, default_image_threads
from tilevlm.training.compile import compile_blocks
from tilevlm.training.master_weights import MasterWeights
from tilevlm.training.optim import adamw


def bench_preprocess(cfg: VLMConfig, bc: BenchConfig) -> dict[str, float]:
    """Images/s one at a time (what nanoVLM's figure measures) and on a thread pool (what the
    Processor does with a batch's images: `ImageTransform.load_many`)."""
    transform = ImageTransform(cfg)
    threads = bc.preprocess_threads or default_image_threads()
    with tempfile.TemporaryDirectory() as tmp:
        paths = preprocess_files(Path(tmp), bc.preprocess_images, bc.seed)
        n_tiles = sum(transform.load(p)[0].shape[0] for p in paths)
        ones = timed_runs(lambda: [transform.load(p) for p in paths], bc.repeats, bc.warmup,
                          torch.device("cpu"))
        manys = timed_runs(lambda: transform.load_many(paths, threads=threads), bc.repeats,
                           bc.warmup, torch.device("cpu"))
    one, many = statistics.median(ones), statistics.median(manys)
    return {"images_per_s": len(paths) / one, "tiles_per_s": n_tiles / one, "seconds": one,
            "range": spread([len(paths) / t for t in ones]),
            "threads": threads, "images_per_s_threads": len(paths) / many,
            "tiles_per_s_threads": n_tiles / many,
            "range_threads": spread([len(paths) / t for t in manys]),
            "images": len(paths), "tiles": n_tiles}


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def bench_vision(model: VisionLanguageModel, bc: BenchConfig, device: torch.device,
                 dtype: torch.dtype) -> dict[str, float]:
    cfg = model.cfg
    tiles = torch.randn(bc.vision_tiles, 3, cfg.vit_img_size, cfg.vit_img_size, device=device)

    def run() -> None:
        with torch.inference_mode(), _autocast(device, dtype):
            model.encode_images(tiles)

    times = timed_runs(run, bc.repeats, bc.warmup, device)
    seconds = statistics.median(times)
    return {"tiles_per_s": bc.vision_tiles / seconds, "seconds": seconds, "tiles": bc.vision_tiles,
            "range": spread([bc.vision_tiles / t for t in times])}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_train(model: VisionLanguageModel, bc: BenchConfig, device: torch.device,
                dtype: torch.dtype) -> dict[str, float]:
    batch = synthetic_batch(model, bc.train_batch, bc.prompt_tokens, bc.answer_tokens, device,
                            bc.seed)
    model.train()
    if bc.compile_train:
        compile_blocks(model)
    # What the trainer does with bf16_mode "weights": bf16 weights, fp32 masters stepped
    master = MasterWeights(model) if dtype == torch.bfloat16 and bc.bf16_mode == "weights" \
        else None
    opt = adamw(master.trainable() if master else model.parameters(), lr=1e-5, device=device)
    cast = contextlib.nullcontext() if master else _autocast(device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss_fn = ((lambda m, b: m(**b, return_logits=False).loss) if bc.train_loss == "labels"
               else (lambda m, b: m(**b).loss))

    def step() -> None:
        with cast:
            loss = loss_fn(model, batch)
        loss.backward()
        if master:
            master.grads_to_masters()
        opt.step()
        if master:
            master.masters_to_weights()
        opt.zero_grad(set_to_none=True)

    flops = count_flops(step)  # untimed: it stands for the first warm-up step
    times = timed_runs(step, bc.repeats, max(bc.warmup - 1, 0), device)
    seconds = statistics.median(times)
    model.eval()
    peak = gemm_peak(dtype, device)  # GFLOP/s; the step's matmuls run in this dtype
    bound = flops.total / (peak * 1e9)  # seconds
    if master:
        model.float()  # the later parts start from fp32 weights, as without it
    return {"seconds_per_step": seconds, "range": spread(times), "loss": bc.train_loss,
            "precision": "fp32" if dtype == torch.float32 else
            ("bf16 weights + fp32 masters" if master else "bf16 autocast"),
            "gflop": flops.total / 1e9, "gflop_matmul": flops.matmul / 1e9,
            "gflop_attention": flops.attention / 1e9, "gemm_peak_gflops": peak,
            "gemm_peak_dtype": str(dtype).replace("torch.", ""), "gemm_bound_s": bound,
            "peak_fraction": bound / seconds,
            "compiled": bc.compile_train, "samples_per_s": bc.train_batch / seconds,
            "seq_len": batch["input_ids"].shape[1], "batch": bc.train_batch,
            "peak_memory_mb": _peak_memory_mb(device),
            "peak_memory_kind": "CUDA max allocated" if device.type == "cuda" else "process peak RSS"}


def bench_step_fn(bc: BenchConfig, device: torch.device) -> Callable[..., torch.Tensor] | None:
    """The decode step the bench times: eager, or with --compile the compiled one, its weights
    frozen on a CPU (inductor lays bf16 weights out once for oneDNN: 1.3x the bf16 decode here,
    docs/performance.md)."""
    if not bc.compile:
        return None
    return compiled_decode_step(freeze_weights=device.type == "cpu")


def _generation_stats(model: VisionLanguageModel, batch: dict, new_tokens: int,
                      step_fn: Callable[..., torch.Tensor] | None = None) -> GenerationStats:
    return generate(model, batch, max_new_tokens=new_tokens, eos_token_ids=[],
                    step_fn=step_fn).stats


def bench_prefill(model: VisionLanguageModel, bc: BenchConfig, device: torch.device) -> dict[str, float]:
    batch = synthetic_batch(model, 1, bc.prompt_tokens, 0, device, bc.seed)
    ttfts = []
    seconds = median_seconds(lambda: ttfts.append(_generation_stats(model, batch, 1).time_to_first_token),
                             bc.repeats, bc.warmup, device)
    timed = ttfts[bc.warmup:]
    return {"time_to_first_token_s": statistics.median(timed), "seconds": seconds,
            "range": spread(timed),
            "prompt_tokens": batch["input_ids"].shape[1]}


def bench_decode(model: VisionLanguageModel, bc: BenchConfig, device: torch.device,
                 batch_size: int, step_fn: Callable[..., torch.Tensor] | None = None
                 ) -> dict[str, float]:
    """Decode throughput; with a compiled step_fn the warm-up runs (>= 1) absorb compilation."""
    batch = synthetic_batch(model, batch_size, bc.prompt_tokens, 0, device, bc.seed)
    rates = []
    warmup = max(bc.warmup, 1) if step_fn is not None else bc.warmup

    def run() -> None:
        rates.append(_generation_stats(model, batch, bc.decode_tokens, step_fn).tokens_per_second)

    timed_runs(run, bc.repeats, warmup, device)  # the rates come from the generation stats
    total = statistics.median(rates[warmup:])
    return {"tokens_per_s_total": total, "range": spread(rates[warmup:]),
            "tokens_per_s_per_row": total / batch_size, "batch": batch_size,
            "new_tokens": bc.decode_tokens}
