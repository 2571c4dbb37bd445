"""`tilevlm bench`: how fast tilevlm preprocesses, trains and generates, with random weights.

Workloads (the defaults follow the project's targets): a preset's architecture with a 2x2 split
(`max_img_size = 2 * tile`, so 4 tiles + 1 global thumbnail per image: 5 x 49 = 245 image
tokens for `original_small`), synthetic inputs, no download. Every figure is the median of
`repeats` timed runs after `warmup` untimed ones.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tilevlm.config import VLMConfig, preset
from tilevlm.model.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

PARTS = ("preprocess", "vision", "train", "prefill", "decode")


@dataclass
class BenchConfig:
    preset: str = "original_small"
    max_img_size: int | None = None  # None: 2 x the tile size (a 2x2 grid + global tile)
    device: str = "cpu"
    dtype: str = "auto"  # "fp32" | "bf16" | "auto" (bf16 on CUDA, fp32 on CPU)
    repeats: int = 3
    warmup: int = 1
    train_batch: int = 4
    prompt_tokens: int = 24
    answer_tokens: int = 64
    decode_tokens: int = 64
    decode_batches: tuple[int, ...] = (1, 8)
    vision_tiles: int = 20
    preprocess_images: int = 40
    parts: tuple[str, ...] = PARTS
    seed: int = 0

    def model_config(self) -> VLMConfig:
        base = preset(self.preset)
        return base.replace(max_img_size=self.max_img_size or 2 * base.vit_img_size)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        name = self.dtype if self.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        if name not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32, bf16 or auto, got {self.dtype!r}")
        return torch.bfloat16 if name == "bf16" else torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of fn() over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- inputs

def image_token_ids(model: VisionLanguageModel, grid: tuple[int, int]) -> list[int]:
    """The image string of one image as ids: global thumbnail first, then the grid tiles."""
    n_img = model.cfg.mp_image_token_length
    ids = [model.global_image_token_id] + [model.image_token_id] * n_img if grid != (1, 1) else []
    for r in range(1, grid[0] + 1):
        for c in range(1, grid[1] + 1):
            ids += [model.grid_token_id(r, c)] + [model.image_token_id] * n_img
    return ids


def synthetic_batch(model: VisionLanguageModel, batch_size: int, prompt_tokens: int,
                    answer_tokens: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """batch_size samples of one image (full grid) + a prompt (+ an answer with labels)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    side = cfg.max_img_size // cfg.vit_img_size
    image = image_token_ids(model, (side, side))
    n_tiles = side * side + (1 if side > 1 and cfg.use_global_tile else 0)
    text = lambda n: torch.randint(0, cfg.lm_base_vocab_size, (n,), generator=g).tolist()  # noqa: E731
    rows, labels = [], []
    for _ in range(batch_size):
        prompt = text(4) + image + text(prompt_tokens)
        answer = text(answer_tokens)
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    tiles = torch.randn(batch_size * n_tiles, 3, cfg.vit_img_size, cfg.vit_img_size, generator=g)
    return {"input_ids": torch.tensor(rows, device=device),
            "labels": torch.tensor(labels, device=device),
            "attention_mask": torch.ones(len(rows), len(rows[0]), dtype=torch.long, device=device),
            "pixel_values": tiles.to(device)}


def preprocess_files(directory: Path, n: int, seed: int) -> list[Path]:
    """n JPEG/PNG files from 64x64 to 2000x1500, including a 100x1800 strip."""
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (2000, 1500), (100, 1800), (640, 480), (1024, 768), (300, 500), (224, 224),
             (1280, 720), (500, 300), (800, 800)]
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 255, size=(max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        from PIL import Image

        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        path = directory / f"img{i:02d}.{'jpg' if i % 2 else 'png'}"
        img.save(path, quality=90) if i % 2 else img.save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- measurements

def bench_preprocess(cfg: VLMConfig, bc: BenchConfig) -> dict[str, float]:
    from tilevlm.image import ImageTransform, load_image

    transform = ImageTransform(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        paths = preprocess_files(Path(tmp), bc.preprocess_images, bc.seed)
        n_tiles = 0

        def run() -> None:
            nonlocal n_tiles
            n_tiles = sum(transform(load_image(p))[0].shape[0] for p in paths)

        seconds = median_seconds(run, bc.repeats, bc.warmup, torch.device("cpu"))
    return {"images_per_s": len(paths) / seconds, "tiles_per_s": n_tiles / seconds,
            "seconds": seconds, "images": len(paths), "tiles": n_tiles}


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

    seconds = median_seconds(run, bc.repeats, bc.warmup, device)
    return {"tiles_per_s": bc.vision_tiles / seconds, "seconds": seconds, "tiles": bc.vision_tiles}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_train(model: VisionLanguageModel, bc: BenchConfig, device: torch.device,
                dtype: torch.dtype) -> dict[str, float]:
    batch = synthetic_batch(model, bc.train_batch, bc.prompt_tokens, bc.answer_tokens, device,
                            bc.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with _autocast(device, dtype):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = median_seconds(step, bc.repeats, bc.warmup, device)
    model.eval()
    del opt
    return {"seconds_per_step": seconds, "samples_per_s": bc.train_batch / seconds,
            "seq_len": batch["input_ids"].shape[1], "batch": bc.train_batch,
            "peak_memory_mb": _peak_memory_mb(device),
            "peak_memory_kind": "CUDA max allocated" if device.type == "cuda" else "process peak RSS"}


def _generation_stats(model: VisionLanguageModel, batch: dict, new_tokens: int):
    from tilevlm.generate import generate

    return generate(model, batch, max_new_tokens=new_tokens, eos_token_ids=[]).stats


def bench_prefill(model: VisionLanguageModel, bc: BenchConfig, device: torch.device) -> dict[str, float]:
    batch = synthetic_batch(model, 1, bc.prompt_tokens, 0, device, bc.seed)
    ttfts = []
    seconds = median_seconds(lambda: ttfts.append(_generation_stats(model, batch, 1).time_to_first_token),
                             bc.repeats, bc.warmup, device)
    timed = ttfts[bc.warmup:]
    return {"time_to_first_token_s": statistics.median(timed), "seconds": seconds,
            "prompt_tokens": batch["input_ids"].shape[1]}


def bench_decode(model: VisionLanguageModel, bc: BenchConfig, device: torch.device,
                 batch_size: int) -> dict[str, float]:
    batch = synthetic_batch(model, batch_size, bc.prompt_tokens, 0, device, bc.seed)
    rates = []
    median_seconds(lambda: rates.append(_generation_stats(model, batch, bc.decode_tokens).tokens_per_second),
                   bc.repeats, bc.warmup, device)
    total = statistics.median(rates[bc.warmup:])
    return {"tokens_per_s_total": total, "tokens_per_s_per_row": total / batch_size,
            "batch": batch_size, "new_tokens": bc.decode_tokens}


# ----------------------------------------------------------------------------- the run

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def run_bench(bc: BenchConfig, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    from tilevlm.inference import resolve_device

    unknown = set(bc.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown bench parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    device = resolve_device(bc.device)
    dtype = bc.torch_dtype(device)
    cfg = bc.model_config()
    torch.manual_seed(bc.seed)
    results: dict[str, Any] = {"env": environment(device, dtype), "bench": asdict(bc),
                               "model": {"preset": bc.preset, "max_img_size": cfg.max_img_size}}
    if "preprocess" in bc.parts:
        progress("preprocessing ...")
        results["preprocess"] = bench_preprocess(cfg, bc)
    model = VisionLanguageModel(cfg).to(device)
    results["model"]["parameters"] = model.num_parameters()
    if "train" in bc.parts:  # fp32 master weights, bf16 autocast when asked
        progress("training step ...")
        results["train"] = bench_train(model, bc, device, dtype)
    model.eval()
    if "vision" in bc.parts:
        progress("vision encoder ...")
        results["vision"] = bench_vision(model, bc, device, dtype)
    infer = model.to(dtype)  # inference runs in the chosen dtype itself
    if "prefill" in bc.parts:
        progress("prefill ...")
        results["prefill"] = bench_prefill(infer, bc, device)
    if "decode" in bc.parts:
        for b in bc.decode_batches:
            progress(f"decode, batch {b} ...")
            results[f"decode_b{b}"] = bench_decode(infer, bc, device, b)
    return results


def format_table(results: dict[str, Any]) -> str:
    env, rows = results["env"], []
    if "preprocess" in results:
        p = results["preprocess"]
        rows.append(("preprocessing", f"{p['images_per_s']:.1f} images/s, {p['tiles_per_s']:.1f} tiles/s",
                     f"{p['images']} files, load + resize + tile + normalize"))
    if "vision" in results:
        v = results["vision"]
        rows.append(("vision encoder", f"{v['tiles_per_s']:.1f} tiles/s", f"{v['tiles']} tiles per call"))
    if "train" in results:
        t = results["train"]
        rows.append(("training step", f"{t['seconds_per_step']:.3f} s/step, {t['samples_per_s']:.2f} samples/s",
                     f"batch {t['batch']}, seq {t['seq_len']}, peak {t['peak_memory_mb']:.0f} MiB "
                     f"({t['peak_memory_kind']})"))
    if "prefill" in results:
        p = results["prefill"]
        rows.append(("prefill", f"{p['time_to_first_token_s']:.3f} s to first token",
                     f"{p['prompt_tokens']} prompt tokens"))
    for key in sorted(k for k in results if k.startswith("decode_b")):
        d = results[key]
        rows.append((f"decode, batch {d['batch']}", f"{d['tokens_per_s_total']:.1f} tokens/s total",
                     f"{d['tokens_per_s_per_row']:.1f} per row, {d['new_tokens']} new tokens"))
    head = (f"tilevlm bench: {results['model']['preset']} ({results['model']['parameters']:,} params, "
            f"max_img_size {results['model']['max_img_size']}) on {env['device']} "
            f"[{env['device_name']}], {env['dtype']}, torch {env['torch']}, {env['threads']} threads; "
            f"median of {results['bench']['repeats']} after {results['bench']['warmup']} warm-up")
    width = max(len(r[0]) for r in rows) if rows else 0
    resw = max(len(r[1]) for r in rows) if rows else 0
    lines = [head] + [f"  {a:<{width}}  {b:<{resw}}  {c}" for a, b, c in rows]
    return "\n".join(lines)
