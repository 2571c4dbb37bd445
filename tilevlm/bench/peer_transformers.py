"""`tilevlm bench --peer transformers`: tilevlm against what a user would run instead, on the same
random weights, image and prompt, in one process.

The peer is transformers' `Idefics3ForConditionalGeneration.generate` (its defaults: SDPA
attention, the dynamic KV cache; greedy, EOS off, inside `torch.inference_mode`), built in
memory from tilevlm's model through the export's own maps (`weights/export_idefics3.py`), so
both hold the same tensors. Both get the bench's synthetic batch (`workload.synthetic_batch`:
one full-grid image per row and random text ids), the transformers copy its tiles as
`[batch, tiles, 3, H, W]`.

Figures, each the median of the timed runs after the warm-up ones, with tilevlm's definitions
(`inference/generation.py`, GenerationStats): time to first token = from the call to the first
sampled token (batch 1); decode = rows x (new tokens - 1) / (total time - time to first token).
tilevlm runs with fp32, bf16 and int8 weights (`inference_weights`), transformers in fp32 and
bf16 (it has no int8 CPU path of its own), alternately, precision by precision, so a shared
machine's load hits both alike. The ratio is how many times faster tilevlm is; int8 is set
against transformers' better precision, and tilevlm's best against transformers' best.
A greedy-token check at fp32, batch 1, shows the two copies compute the same thing.

transformers stays optional: it is imported only here, when the peer is asked for.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import statistics
import time
from types import SimpleNamespace
from typing import Any, Callable

import torch

from tilevlm.bench.measure import bench_decode, bench_prefill, bench_step_fn
from tilevlm.bench.timing import spread, timed_part, timed_runs
from tilevlm.bench.workload import image_token_ids, synthetic_batch
from tilevlm.inference.generation import generate
from tilevlm.inference.quantize import inference_weights, weight_bytes
from tilevlm.special_tokens import SMOLVLM_BOS_ID, SMOLVLM_PAD_ID
from tilevlm.weights.export_idefics3 import (
    check_exportable,
    idefics3_config_json,
    idefics3_tensors,
)

TILEVLM_FORMATS = ("fp32", "bf16", "int8")  # what runs without --weights (int4: --weights int4)
PEER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # what transformers runs in
TARGETS = {"prefill": 1.5, "decode_b1": 2.0}  # issue 13: tilevlm's speed-up over transformers


# ----------------------------------------------------------------------------- the package

def require_peer(peer: str) -> None:
    """A ValueError naming the option and the install command when the peer's package cannot
    be imported (transformers stays an optional dependency)."""
    message = (f"--peer {peer} needs the {peer} package, which is not installed here "
               f"(pip install {peer})")
    if importlib.util.find_spec(peer) is None:
        raise ValueError(message)
    try:
        module = importlib.import_module(peer)
        getattr(module, "Idefics3ForConditionalGeneration")
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{message}: {e}") from None


# ----------------------------------------------------------------------------- the peer model

def transformers_model(model: Any) -> Any:
    """transformers' Idefics3ForConditionalGeneration holding `model`'s weights (fp32, eval),
    through the export's config and key maps; generation with EOS off."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    cfg = model.cfg
    check_exportable(cfg)
    ids = SimpleNamespace(eos_token_id=cfg.lm_vocab_size - 1, pad_token_id=SMOLVLM_PAD_ID,
                          bos_token_id=SMOLVLM_BOS_ID)
    config = Idefics3Config.from_dict(idefics3_config_json(cfg, ids))
    peer = Idefics3ForConditionalGeneration(config)
    missing, unexpected = peer.load_state_dict(idefics3_tensors(model.float()), strict=False)
    allowed = {"lm_head.weight"} if cfg.lm_tie_weights else set()
    if unexpected or set(missing) - allowed:
        raise RuntimeError(f"the export's tensors do not fit Idefics3ForConditionalGeneration: "
                           f"missing {sorted(set(missing) - allowed)}, unexpected {unexpected}")
    if cfg.lm_tie_weights:
        peer.tie_weights()
    peer.generation_config.eos_token_id = None  # a fixed number of new tokens, like tilevlm's
    peer.generation_config.pad_token_id = SMOLVLM_PAD_ID
    return peer.eval()


def transformers_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    """The bench batch as Idefics3 takes it: the tiles of each row as [rows, tiles, 3, H, W]."""
    rows = batch["input_ids"].shape[0]
    tiles = batch["pixel_values"]
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "pixel_values": tiles.view(rows, tiles.shape[0] // rows, *tiles.shape[1:]).to(dtype)}


class _Clock:
    """A transformers streamer that notes when the first new token arrives (its first `put` is
    the prompt, the second the first sampled token)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.puts = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def transformers_generate(peer: Any, inputs: dict[str, Any], new_tokens: int
                          ) -> tuple[torch.Tensor, float, float]:
    """(new token ids [rows, new_tokens], time to first token, total seconds) of one greedy
    `generate` call."""
    clock = _Clock()
    with torch.inference_mode():
        out = peer.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                            streamer=clock)
    total = time.perf_counter() - clock.start
    new = out[:, inputs["input_ids"].shape[1]:]
    if new.shape[1] != new_tokens or clock.first is None:
        raise RuntimeError(f"transformers generated {new.shape[1]} tokens, {new_tokens} asked for")
    return new, clock.first, total


def peer_prefill(peer: Any, batch: dict[str, torch.Tensor], dtype: torch.dtype, bc: Any,
                 device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """transformers' time to first token (one new token), as `measure.bench_prefill`."""
    inputs = transformers_inputs(batch, dtype)
    ttfts: list[float] = []
    timed_runs(lambda: ttfts.append(transformers_generate(peer, inputs, 1)[1]), bc.repeats,
               bc.warmup, device)
    timed = ttfts[bc.warmup:]
    return {"time_to_first_token_s": statistics.median(timed), "range": spread(timed),
            "prompt_tokens": batch["input_ids"].shape[1]}


def peer_decode(peer: Any, batch: dict[str, torch.Tensor], dtype: torch.dtype, bc: Any,
                tokens: list[torch.Tensor] | None = None,
                device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """transformers' decode throughput (`measure.bench_decode`'s definition); the first run's
    tokens go to `tokens` when given."""
    inputs = transformers_inputs(batch, dtype)
    rows, rates = batch["input_ids"].shape[0], []

    def run() -> None:
        new, first, total = transformers_generate(peer, inputs, bc.decode_tokens)
        if tokens is not None and not tokens:
            tokens.append(new)
        later = rows * (bc.decode_tokens - 1)
        rates.append(later / (total - first) if total > first else 0.0)

    timed_runs(run, bc.repeats, bc.warmup, device)
    total = statistics.median(rates[bc.warmup:])
    return {"tokens_per_s_total": total, "range": spread(rates[bc.warmup:]),
            "tokens_per_s_per_row": total / rows, "batch": rows, "new_tokens": bc.decode_tokens}


# ----------------------------------------------------------------------------- the run

def _formats(bc: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tilevlm's weight formats, transformers' precisions): every format, or the one --weights
    names (int8 then against both of transformers' precisions, to find its best)."""
    ours = (bc.weights,) if bc.weights else TILEVLM_FORMATS
    theirs = tuple(w for w in ours if w in PEER_DTYPES) or tuple(PEER_DTYPES)
    return ours, theirs


def run_peer(model: Any, bc: Any, device: torch.device,
             progress: Callable[[str], None]) -> dict[str, Any]:
    """Prefill and decode of tilevlm (each weight format) and the peer (each precision), on
    `model`'s weights (fp32, eval) and the bench's batches; the comparison rows included."""
    import transformers

    model = model.float().eval()
    ours_formats, peer_formats = _formats(bc)
    peer = transformers_model(model).to(device)
    batches = {b: synthetic_batch(model, b, bc.prompt_tokens, 0, device, bc.seed)
               for b in bc.decode_batches}
    prefill_batch = synthetic_batch(model, 1, bc.prompt_tokens, 0, device, bc.seed)
    ours: dict[str, dict[str, Any]] = {}
    theirs: dict[str, dict[str, Any]] = {}
    step_fn = bench_step_fn(bc, device)
    check: dict[str, Any] = {}
    peer_tokens: list[torch.Tensor] = []

    def time_ours(fmt: str) -> None:
        infer = inference_weights(copy.deepcopy(model), fmt)
        ours[fmt] = {"weight_mb": round(weight_bytes(infer) / 2**20, 1)}
        if fmt == "fp32" and 1 in batches and "decode" in bc.parts:
            out = generate(infer, batches[1], max_new_tokens=bc.decode_tokens, eos_token_ids=[])
            check["tilevlm"] = out.tokens[0]
        if "prefill" in bc.parts:
            timed_part(ours[fmt], "prefill", lambda: bench_prefill(infer, bc, device),
                        lambda m: progress(f"tilevlm {fmt} {m}"))
        if "decode" in bc.parts:
            for b in bc.decode_batches:
                timed_part(ours[fmt], f"decode_b{b}",
                            lambda: bench_decode(infer, bc, device, b, step_fn),
                            lambda m: progress(f"tilevlm {fmt} {m}"))

    def time_theirs(fmt: str) -> None:
        dtype = PEER_DTYPES[fmt]
        peer.to(dtype)
        theirs[fmt] = {}
        if "prefill" in bc.parts:
            timed_part(theirs[fmt], "prefill",
                        lambda: peer_prefill(peer, prefill_batch, dtype, bc, device),
                        lambda m: progress(f"transformers {fmt} {m}"))
        if "decode" in bc.parts:
            for b in bc.decode_batches:
                keep = peer_tokens if (fmt, b) == ("fp32", 1) else None
                timed_part(theirs[fmt], f"decode_b{b}",
                            lambda: peer_decode(peer, batches[b], dtype, bc, keep, device),
                            lambda m: progress(f"transformers {fmt} {m}"))

    for fmt in dict.fromkeys((*ours_formats, *peer_formats)):  # alternately, precision by precision
        if fmt in ours_formats:
            time_ours(fmt)
        if fmt in peer_formats:
            time_theirs(fmt)
    if "tilevlm" in check and peer_tokens:
        a, b = check["tilevlm"], peer_tokens[0][0].tolist()
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        check = {"precision": "fp32", "batch": 1, "tokens": len(a), "same_prefix": same}
    else:
        check = {}
    cfg = model.cfg
    side = cfg.max_img_size // cfg.vit_img_size
    result = {"peer": "transformers", "version": transformers.__version__,
              "attn_implementation": getattr(peer.config, "_attn_implementation", None),
              "call": "Idefics3ForConditionalGeneration.generate: greedy, eos off, its default "
                      "cache, under torch.inference_mode",
              "workload": {"grid": [side, side], "tiles_per_image": side * side + (side > 1),
                           "tile": cfg.vit_img_size,
                           "image_tokens": len(image_token_ids(model, (side, side))),
                           "prompt_tokens": prefill_batch["input_ids"].shape[1],
                           "decode_tokens": bc.decode_tokens,
                           "decode_batches": list(bc.decode_batches)},
              "tilevlm": ours, "transformers": theirs, "greedy_check": check}
    result["comparisons"] = comparisons(result)
    return result


# ----------------------------------------------------------------------------- the comparison

_METRICS = {"prefill": ("time_to_first_token_s", False), "decode": ("tokens_per_s_total", True)}


def _metric(key: str) -> tuple[str, bool]:
    return _METRICS["prefill" if key == "prefill" else "decode"]


def comparisons(peer: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per workload and pairing: equal precision (fp32, bf16), tilevlm int8 (or int4)
    against transformers' better precision, and the best of each; ratio = times faster tilevlm
    is."""
    ours, theirs, rows = peer["tilevlm"], peer["transformers"], []
    keys = [k for k in ("prefill", *(f"decode_b{b}" for b in peer["workload"]["decode_batches"]))
            if any(k in v for v in ours.values()) and any(k in v for v in theirs.values())]
    for key in keys:
        metric, higher = _metric(key)

        def value(side: dict[str, Any], fmt: str) -> float | None:
            return side.get(fmt, {}).get(key, {}).get(metric)

        def best(side: dict[str, Any]) -> str:
            present = [f for f in side if value(side, f) is not None]
            return (max if higher else min)(present, key=lambda f: value(side, f))

        pairs = [(f, f, f) for f in PEER_DTYPES if value(ours, f) and value(theirs, f)]
        for fmt in (f for f in ours if f not in PEER_DTYPES and value(ours, f) is not None):
            pairs.append((f"{fmt} vs their best", fmt, best(theirs)))  # int8, int4
        if len(ours) > 1:  # (with one format, int8 against their best is already that row)
            pairs.append(("best vs best", best(ours), best(theirs)))
        for label, a, b in pairs:
            x, y = value(ours, a), value(theirs, b)
            ratio = (x / y if higher else y / x) if x and y else 0.0
            target = TARGETS.get(key)
            rows.append({"workload": key, "pairing": label, "tilevlm": a, "transformers": b,
                         "tilevlm_value": x, "transformers_value": y, "ratio": ratio,
                         "target": target, "met": None if target is None else ratio >= target})
    return rows


def _workload_name(key: str) -> str:
    return "time to first token" if key == "prefill" else f"decode, batch {key[len('decode_b'):]}"


def _figure(key: str, value: float) -> str:
    return f"{value:.3f} s" if key == "prefill" else f"{value:.1f} tok/s"


def peer_table(results: dict[str, Any]) -> list[str]:
    """The comparison as table lines (for `speed.format_table`)."""
    peer = results["peer"]
    w = peer["workload"]
    grid = f"a {w['grid'][0]}x{w['grid'][1]} grid" + (
        " + the global tile" if w["tiles_per_image"] > 1 else "")
    lines = [f"tilevlm vs transformers {peer['version']} ({peer['call']}; "
             f"{peer['attn_implementation']} attention) on the same random weights and inputs: "
             f"one image per row, {grid} ({w['tiles_per_image']} "
             f"tile{'s' if w['tiles_per_image'] > 1 else ''} of {w['tile']} px, "
             f"{w['image_tokens']} image tokens), {w['prompt_tokens']} prompt tokens, "
             f"{w['decode_tokens']} new tokens in decode; ratio = how many times faster tilevlm "
             "is"]
    head = ("workload", "pairing", "tilevlm", "transformers", "ratio", "target")
    table = [head]
    for row in peer["comparisons"]:
        key = row["workload"]
        target = "" if row["target"] is None else (
            f">= {row['target']:g}x {'met' if row['met'] else 'not met'}")
        table.append((_workload_name(key), row["pairing"],
                      f"{_figure(key, row['tilevlm_value'])} ({row['tilevlm']})",
                      f"{_figure(key, row['transformers_value'])} ({row['transformers']})",
                      f"{row['ratio']:.2f}x", target))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines += ["  " + "  ".join(f"{c:<{n}}" for c, n in zip(r, widths)).rstrip() for r in table]
    check = peer.get("greedy_check")
    if check:
        verdict = ("the same" if check["same_prefix"] == check["tokens"]
                   else f"the same for the first {check['same_prefix']}")
        lines.append(f"  greedy tokens at {check['precision']}, batch {check['batch']}: "
                     f"{verdict} of {check['tokens']} (tilevlm and transformers on one copy of "
                     "the weights)")
    return lines
