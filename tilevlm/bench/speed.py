"""`tilevlm bench`: how fast tilevlm preprocesses, trains and generates, with random weights.

Workloads (the defaults follow the project's targets): a preset's architecture with a 2x2 split
(`max_img_size = 2 * tile`, so 4 tiles + 1 global thumbnail per image: 5 x 49 = 245 image
tokens for `original_small`), synthetic inputs (`workload.py`), no download. `run_bench` runs the
parts a BenchConfig names (`measure.py`), or with `peer` set the comparison with that peer on the
same weights; `format_table` prints the results.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Callable

import torch

from tilevlm.bench.bandwidth import decode_roofline, decode_weight_bytes, memory_bandwidth
from tilevlm.bench.bench_config import BenchConfig
from tilevlm.bench import peer_llama_cpp, peer_transformers
from tilevlm.bench.measure import (
    bench_decode,
    bench_prefill,
    bench_preprocess,
    bench_step_fn,
    bench_train,
    bench_vision,
)
from tilevlm.bench.roofline import PEAK_SIDE
from tilevlm.bench.timing import environment, timed_part
from tilevlm.device import resolve_device
from tilevlm.inference.quantize import inference_weights, weight_bytes
from tilevlm.model.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

PEER_MODULES = {"transformers": peer_transformers, "llama.cpp": peer_llama_cpp}  # run_peer, peer_table


def _plain_model(model: VisionLanguageModel, bc: BenchConfig) -> VisionLanguageModel:
    """`model` in eval mode, rebuilt from its weights if its blocks were compiled for training."""
    if bc.compile_train:
        state = model.state_dict()
        model = VisionLanguageModel(model.cfg).to(next(iter(state.values())).device)
        model.load_state_dict(state)
    return model.eval()


def _inference_model(model: VisionLanguageModel, bc: BenchConfig,
                     dtype: torch.dtype) -> VisionLanguageModel:
    if bc.weights is None:
        return model.to(dtype)  # inference runs in the chosen dtype itself
    return inference_weights(model, bc.weights)


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
    device = resolve_device(bc.device)
    dtype = bc.torch_dtype(device)
    cfg = bc.model_config()
    torch.manual_seed(bc.seed)
    results: dict[str, Any] = {"env": environment(device, dtype), "bench": asdict(bc),
                               "model": {"preset": bc.preset, "max_img_size": cfg.max_img_size}}
    if "preprocess" in bc.parts:
        timed_part(results, "preprocess", lambda: bench_preprocess(cfg, bc), progress)
    model = VisionLanguageModel(cfg).to(device)
    results["model"]["parameters"] = model.num_parameters()
    if "train" in bc.parts:  # fp32 master weights, bf16 autocast when asked
        timed_part(results, "train", lambda: bench_train(model, bc, device, dtype), progress)
    model.eval()
    if "vision" in bc.parts:
        timed_part(results, "vision", lambda: bench_vision(model, bc, device, dtype), progress)
    plain = _plain_model(model, bc)
    if bc.peer:  # prefill and decode: tilevlm's weight formats against the peer, in one table
        results["peer"] = PEER_MODULES[bc.peer].run_peer(plain, bc, device, progress)
        return results
    if bc.baseline:  # the reference for the fast paths: fp32 weights, eager decode step
        plain.float()
        if "prefill" in bc.parts:
            timed_part(results, "baseline_prefill", lambda: bench_prefill(plain, bc, device),
                        progress)
        if "decode" in bc.parts:
            for b in bc.decode_batches:
                timed_part(results, f"baseline_decode_b{b}",
                            lambda: bench_decode(plain, bc, device, b), progress)
    infer = _inference_model(plain, bc, dtype)
    results["model"]["inference_weights"] = bc.weights or str(dtype).replace("torch.", "")
    results["model"]["inference_weight_mb"] = round(weight_bytes(infer) / 2**20, 1)
    if "prefill" in bc.parts:
        timed_part(results, "prefill", lambda: bench_prefill(infer, bc, device), progress)
    step_fn = bench_step_fn(bc, device)
    if "decode" in bc.parts:
        gbps = measure_bandwidth(results, bc, device, progress)
        step_bytes = decode_weight_bytes(infer)
        for b in bc.decode_batches:
            timed_part(results, f"decode_b{b}", lambda: bench_decode(infer, bc, device, b, step_fn),
                        progress)
            part = results[f"decode_b{b}"]
            part.update(decode_roofline(part["tokens_per_s_total"], b, step_bytes, gbps))
    return results


def measure_bandwidth(results: dict[str, Any], bc: BenchConfig, device: torch.device,
                      progress: Callable[[str], None]) -> float:
    """results["bandwidth"]: the memory bandwidth the decode figures are set against (GB/s)."""
    timed_part(results, "bandwidth",
               lambda: {"gbps": memory_bandwidth(device, bc.bandwidth_mib),
                        "mib": bc.bandwidth_mib, "threads": torch.get_num_threads()}, progress)
    return results["bandwidth"]["gbps"]


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


def _bandwidth_row(results: dict[str, Any]) -> tuple[str, str, str]:
    bw = results["bandwidth"]
    decode = next((results[k] for k in results if k.startswith("decode_b")), None)
    bound = "" if decode is None or "weight_mb_per_step" not in decode else (
        f": a decode step reads {decode['weight_mb_per_step']:.1f} MB of weights, so no "
        f"decode beats {decode['bound_tokens_per_s'] / decode['batch']:.0f} steps/s")
    return ("memory bandwidth", f"{bw['gbps']:.1f} GB/s",
            f"copy of {bw['mib']} MiB, read + write counted, best of 5, {bw['threads']} threads"
            f"{bound}{_load(bw)}")


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
    if "bandwidth" in results:
        rows.append(_bandwidth_row(results))
    for key in sorted((k for k in results if k.startswith("decode_b")), key=lambda k: int(k[8:])):
        d = results[key]
        how = f"{weights} weights" + (", compiled step" if bench.get("compile") else "")
        bound = (f", {d['bound_fraction']:.0%} of the bandwidth bound "
                 f"({d['bound_tokens_per_s']:.0f} tok/s)" if "bound_fraction" in d else "")
        rows.append((f"decode, batch {d['batch']}", f"{d['tokens_per_s_total']:.1f} tokens/s total",
                     f"{d['tokens_per_s_per_row']:.1f} per row, {d['new_tokens']} new tokens, "
                     f"{how}{bound}"
                     f"{_vs_baseline(results, key, 'tokens_per_s_total', 'tok/s', 1, True)}"
                     f"{_load(d)}"))
    head = (f"tilevlm bench: {results['model']['preset']} ({results['model']['parameters']:,} params, "
            f"max_img_size {results['model']['max_img_size']}) on {env['device']} "
            f"[{env['device_name']}], {env['dtype']}, torch {env['torch']}, {env['threads']} threads; "
            f"median of {bench['repeats']} after {bench['warmup']} warm-up")
    width = max(len(r[0]) for r in rows) if rows else 0
    resw = max(len(r[1]) for r in rows) if rows else 0
    lines = [head] + [f"  {a:<{width}}  {b:<{resw}}  {c}" for a, b, c in rows]
    if "peer" in results:
        lines += PEER_MODULES[results["bench"]["peer"]].peer_table(results)
    return "\n".join(lines)
