"""`tilevlm bench`: how fast tilevlm preprocesses, trains and generates, with random weights.

Workloads (the defaults follow the project's targets): a preset's architecture with a 2x2 split
(`max_img_size = 2 * tile`, so 4 tiles + 1 global thumbnail per image: 5 x 49 = 245 image
tokens for `original_small`), synthetic inputs, no download. Every figure is the median of
`repeats` timed runs after `warmup` untimed ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tilevlm.config import VLMConfig, preset
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.special_tokens import image_tokens
from tilevlm.bench.roofline import PEAK_SIDE, count_flops, gemm_peak
from tilevlm.bench.timing import median_seconds, spread, timed_runs
from tilevlm.training.master_weights import MasterWeights

log = logging.getLogger(__name__)

PARTS = ("preprocess", "vision", "train", "prefill", "decode")


@dataclass
class BenchConfig:
    preset: str = "original_small"
    max_img_size: int | None = None  # None: 2 x the tile size (a 2x2 grid + global tile)
    device: str = "cpu"
    dtype: str = "auto"  # a `tilevlm.device.DTYPE_NAMES` name ("auto": that module's rule)
    weights: str | None = None  # a `quantize.WEIGHT_FORMATS` name for inference; None: the dtype
    compile: bool = False  # torch.compile the decode step (generation.compiled_decode_step)
    compile_train: bool = False  # torch.compile every block for the training step
    baseline: bool = False  # also time prefill and decode with fp32 weights, eager, same run
    train_loss: str = "labels"  # "labels": logits at label positions only; "full": model().loss
    bf16_mode: str = "autocast"  # a bf16 training step: "autocast" or "weights" (TrainConfig's)
    threads: int | None = None  # torch intra-op threads; None: torch's default (the cores)
    repeats: int = 3
    warmup: int = 1
    train_batch: int = 4
    prompt_tokens: int = 24
    answer_tokens: int = 64
    decode_tokens: int = 64
    decode_batches: tuple[int, ...] = (1, 8)
    vision_tiles: int = 20
    preprocess_images: int = 40
    preprocess_threads: int | None = None  # the parallel figure's threads; None: the cores (<= 4)
    parts: tuple[str, ...] = PARTS
    seed: int = 0
    peer: str | None = None  # "transformers": prefill and decode against it (tools/peer_bench.py)
    overrides: dict[str, Any] = field(default_factory=dict)  # VLMConfig fields over the preset's

    def model_config(self) -> VLMConfig:
        from tilevlm.special_tokens import get_layout

        base = preset(self.preset, **self.overrides)
        # a layout whose tokens are the tokenizer's own keeps the preset's vocabulary size
        keep = {} if get_layout(base.image_token_layout).appended else {
            "lm_vocab_size": base.lm_vocab_size}
        return base.replace(max_img_size=self.max_img_size or 2 * base.vit_img_size, **keep)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        from tilevlm.device import resolve_dtype

        return resolve_dtype(self.dtype, device)

    def validate(self) -> None:
        from tilevlm.inference.quantize import WEIGHT_FORMATS

        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, "
                             f"got {self.weights!r}")
        for name in ("threads", "preprocess_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        from tilevlm.training.train_config import BF16_MODES

        if self.bf16_mode not in BF16_MODES:
            raise ValueError(f"bf16_mode must be one of {', '.join(BF16_MODES)}, "
                             f"got {self.bf16_mode!r}")
        if self.train_loss not in ("labels", "full"):
            raise ValueError(f"train_loss must be 'labels' or 'full', got {self.train_loss!r}")
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown bench parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
        from tilevlm.bench.peer_transformers import check_peer

        check_peer(self)


# ----------------------------------------------------------------------------- inputs

def image_token_ids(model: VisionLanguageModel, grid: tuple[int, int]) -> list[int]:
    """The image string of one image as ids, in the model's token layout (an appended one: the
    presets')."""
    cfg = model.cfg
    ids = cfg.special_token_ids()
    if not ids:  # the tokenizer's own tokens (idefics3): SmolVLM's tokenizer layout
        from tilevlm.bench.peer_transformers import idefics3_token_ids

        ids = idefics3_token_ids(cfg)
    return [ids[token] for token in image_tokens(grid, cfg.mp_image_token_length,
                                                  cfg.use_global_tile, cfg.image_token_layout)]


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
    """Images/s one at a time (what nanoVLM's figure measures) and on a thread pool (what the
    Processor does with a batch's images: `ImageTransform.load_many`)."""
    from tilevlm.preprocessing.image import ImageTransform, default_image_threads

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
    from tilevlm.training.compile import compile_blocks
    from tilevlm.training.optim import adamw

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


def _generation_stats(model: VisionLanguageModel, batch: dict, new_tokens: int,
                      step_fn: Callable[..., torch.Tensor] | None = None):
    from tilevlm.inference.generation import generate

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


def _plain_model(model: VisionLanguageModel, bc: BenchConfig) -> VisionLanguageModel:
    """`model` in eval mode, rebuilt from its weights if its blocks were compiled for training."""
    if bc.compile_train:
        state = model.state_dict()
        model = VisionLanguageModel(model.cfg).to(next(iter(state.values())).device)
        model.load_state_dict(state)
    return model.eval()


def _inference_model(model: VisionLanguageModel, bc: BenchConfig,
                     dtype: torch.dtype) -> VisionLanguageModel:
    from tilevlm.inference.quantize import inference_weights

    if bc.weights is None:
        return model.to(dtype)  # inference runs in the chosen dtype itself
    return inference_weights(model, bc.weights)


def _timed_part(results: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]],
                progress: Callable[[str], None]) -> None:
    """results[key] = fn(), with the 1-minute load average before and after (shared machines)."""
    before = os.getloadavg()[0]
    progress(f"{key} ... (load average {before:.2f})")
    results[key] = {**fn(), "load_avg_before": round(before, 2),
                    "load_avg_after": round(os.getloadavg()[0], 2)}


def run_bench(bc: BenchConfig, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    bc.validate()
    threads = torch.get_num_threads()
    if bc.threads is not None:  # fewer threads than cores can win when the cores are shared
        torch.set_num_threads(bc.threads)
    try:
        return _run_parts(bc, progress)
    finally:
        torch.set_num_threads(threads)


def _run_parts(bc: BenchConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    from tilevlm.inference.generation import compiled_decode_step
    from tilevlm.inference.quantize import weight_bytes
    from tilevlm.device import resolve_device

    device = resolve_device(bc.device)
    dtype = bc.torch_dtype(device)
    cfg = bc.model_config()
    torch.manual_seed(bc.seed)
    results: dict[str, Any] = {"env": environment(device, dtype), "bench": asdict(bc),
                               "model": {"preset": bc.preset, "max_img_size": cfg.max_img_size}}
    if "preprocess" in bc.parts:
        _timed_part(results, "preprocess", lambda: bench_preprocess(cfg, bc), progress)
    model = VisionLanguageModel(cfg).to(device)
    results["model"]["parameters"] = model.num_parameters()
    if "train" in bc.parts:  # fp32 master weights, bf16 autocast when asked
        _timed_part(results, "train", lambda: bench_train(model, bc, device, dtype), progress)
    model.eval()
    if "vision" in bc.parts:
        _timed_part(results, "vision", lambda: bench_vision(model, bc, device, dtype), progress)
    plain = _plain_model(model, bc)
    if bc.peer:  # prefill and decode: tilevlm's weight formats against the peer, in one table
        from tilevlm.bench.peer_transformers import run_peer

        results["peer"] = run_peer(plain, bc, device, progress)
        return results
    if bc.baseline:  # the reference for the fast paths: fp32 weights, eager decode step
        plain.float()
        if "prefill" in bc.parts:
            _timed_part(results, "baseline_prefill", lambda: bench_prefill(plain, bc, device),
                        progress)
        if "decode" in bc.parts:
            for b in bc.decode_batches:
                _timed_part(results, f"baseline_decode_b{b}",
                            lambda: bench_decode(plain, bc, device, b), progress)
    infer = _inference_model(plain, bc, dtype)
    results["model"]["inference_weights"] = bc.weights or str(dtype).replace("torch.", "")
    results["model"]["inference_weight_mb"] = round(weight_bytes(infer) / 2**20, 1)
    if "prefill" in bc.parts:
        _timed_part(results, "prefill", lambda: bench_prefill(infer, bc, device), progress)
    step_fn = compiled_decode_step() if bc.compile else None
    if "decode" in bc.parts:
        for b in bc.decode_batches:
            _timed_part(results, f"decode_b{b}", lambda: bench_decode(infer, bc, device, b, step_fn),
                        progress)
    return results


def _load(part: dict[str, Any], key: str = "range", digits: int = 1,
          with_load: bool = True) -> str:
    """The runs' spread (`part[key]`) and the load average around the part, for the notes."""
    note = ""
    if key in part and part[key][0] != part[key][1]:
        lo, hi = part[key]
        note += f"; runs {lo:.{digits}f}-{hi:.{digits}f}"
    if with_load and "load_avg_before" in part:
        note += f"; load {part['load_avg_before']:.1f}->{part['load_avg_after']:.1f}"
    return note


def _vs_baseline(results: dict[str, Any], key: str, metric: str, unit: str, digits: int,
                 higher_is_better: bool) -> str:
    """'; baseline fp32 eager X unit: N.NNx' (the speed-up over it) when the run timed one."""
    base = results.get(f"baseline_{key}")
    if base is None:
        return ""
    ours, theirs = results[key][metric], base[metric]
    speedup = ours / theirs if higher_is_better else theirs / ours
    return f"; baseline fp32 eager {theirs:.{digits}f} {unit}: {speedup:.2f}x"


def format_table(results: dict[str, Any]) -> str:
    env, rows, bench = results["env"], [], results["bench"]
    if "preprocess" in results:
        p = results["preprocess"]
        rows.append(("preprocessing", f"{p['images_per_s']:.1f} images/s, {p['tiles_per_s']:.1f} tiles/s",
                     f"{p['images']} files, load + resize + tile + normalize, 1 thread{_load(p)}"))
        if "threads" in p:
            rows.append((f"preprocessing, {p['threads']} threads",
                         f"{p['images_per_s_threads']:.1f} images/s, "
                         f"{p['tiles_per_s_threads']:.1f} tiles/s",
                         "the same files through ImageTransform.load_many (the Processor's path)"
                         + _load(p, "range_threads", with_load=False)))
    if "vision" in results:
        v = results["vision"]
        rows.append(("vision encoder", f"{v['tiles_per_s']:.1f} tiles/s",
                     f"{v['tiles']} tiles per call{_load(v)}"))
    if "train" in results:
        t = results["train"]
        how = (f"{t.get('loss', 'full')} loss, {t.get('precision', env['dtype'])}"
               + (", compiled blocks" if t.get("compiled") else ""))
        rows.append(("training step", f"{t['seconds_per_step']:.3f} s/step, {t['samples_per_s']:.2f} samples/s",
                     f"batch {t['batch']}, seq {t['seq_len']}, {how}, peak {t['peak_memory_mb']:.0f} MiB "
                     f"({t['peak_memory_kind']}){_load(t, digits=3)}"))
        if "gflop" in t:
            rows.append(("training roofline", f"{t['peak_fraction']:.1%} of the GEMM peak",
                         f"{t['gflop']:.4g} GFLOP counted per step ({t['gflop_matmul']:.4g} matmul, "
                         f"{t['gflop_attention']:.3g} attention), {t['gemm_peak_dtype']} peak "
                         f"{t['gemm_peak_gflops']:.0f} GFLOP/s measured here ({PEAK_SIDE}^2 matmul): "
                         f"no step under {t['gemm_bound_s']:.3f} s"))
    weights = results["model"].get("inference_weights", env["dtype"])
    if "prefill" in results:
        p = results["prefill"]
        rows.append(("prefill", f"{p['time_to_first_token_s']:.3f} s to first token",
                     f"{p['prompt_tokens']} prompt tokens, {weights} weights"
                     f"{_vs_baseline(results, 'prefill', 'time_to_first_token_s', 's', 3, False)}"
                     f"{_load(p, digits=3)}"))
    for key in sorted((k for k in results if k.startswith("decode_b")), key=lambda k: int(k[8:])):
        d = results[key]
        how = f"{weights} weights" + (", compiled step" if bench.get("compile") else "")
        rows.append((f"decode, batch {d['batch']}", f"{d['tokens_per_s_total']:.1f} tokens/s total",
                     f"{d['tokens_per_s_per_row']:.1f} per row, {d['new_tokens']} new tokens, "
                     f"{how}{_vs_baseline(results, key, 'tokens_per_s_total', 'tok/s', 1, True)}"
                     f"{_load(d)}"))
    head = (f"tilevlm bench: {results['model']['preset']} ({results['model']['parameters']:,} params, "
            f"max_img_size {results['model']['max_img_size']}) on {env['device']} "
            f"[{env['device_name']}], {env['dtype']}, torch {env['torch']}, {env['threads']} threads; "
            f"median of {bench['repeats']} after {bench['warmup']} warm-up")
    width = max(len(r[0]) for r in rows) if rows else 0
    resw = max(len(r[1]) for r in rows) if rows else 0
    lines = [head] + [f"  {a:<{width}}  {b:<{resw}}  {c}" for a, b, c in rows]
    if "peer" in results:
        from tilevlm.bench.peer_transformers import peer_table

        lines += peer_table(results)
    return "\n".join(lines)
