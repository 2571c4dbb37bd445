"""`tilevlm bench --peer llama.cpp --llama-cpp DIR`: tilevlm against llama.cpp, what a person
who wants a SmolVLM answered on a CPU picks, on the same random weights, alternated round by
round on one machine.

DIR is a llama.cpp checkout the user built (its convert_hf_to_gguf.py and gguf-py, and the
binaries llama-bench, llama-mtmd-cli and llama-quantize in DIR/build/bin or `--llama-cpp-bin`).
The bench's model goes through tilevlm's Idefics3 export and llama.cpp's own converter
(`gguf_files.py`), so both systems hold the same tensors; then, `repeats` rounds, each llama.cpp
first and tilevlm second:

- decode, batch 1: `llama-bench -p 0 -n N` (N new tokens from an empty cache) against tilevlm
  generating N tokens after an 8-token text prompt; tokens/s after the first token in both.
  Pairs: fp32 / f32, bf16 / bf16, int8 / q8_0, int4 / q4_0 (llama.cpp's default q4_0 recipe,
  which keeps the output matrix in q6_K as tilevlm's int4 keeps its LM head in int8).
  tilevlm's larger `decode_batches` are timed too (llama-bench has no batched decode).
- prompt: `llama-bench -p 512 -n 0` against one tilevlm prefill of 512 text tokens (its time to
  first token), tokens/s.
- time to first token with an image: `llama-mtmd-cli -n 1` on one PNG (its llama_perf "prompt
  eval time": image encoding and the prompt's decode, model load excluded) against tilevlm's
  `generate(max_new_tokens=1)` on the same PNG through its processor (preprocessing excluded
  in both). Pairs: fp32 / f32 + mmproj f32, bf16 / bf16 + mmproj f16.

Each decode figure is also set against the bandwidth bound (`bandwidth.py`): the bytes of
weights a step reads (tilevlm: `decode_weight_bytes`; llama.cpp: the GGUF's tensors, its input
embedding left out when the output matrix is its own) over the memory bandwidth, measured at the
start of every round (the best of them: what the machine did at least once).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from tilevlm.bench.bandwidth import decode_weight_bytes, memory_bandwidth
from tilevlm.bench.gguf_files import GGUFFiles, run_tool, tensor_bytes, write_gguf_files
from tilevlm.bench.measure import bench_step_fn
from tilevlm.inference.generation import generate
from tilevlm.inference.quantize import inference_weights
from tilevlm.weights.loading import load_processor

BINARIES = ("llama-bench", "llama-mtmd-cli", "llama-quantize")
CONVERTER_NEEDS = ("transformers", "sentencepiece", "numpy")  # its requirements we do not have
GGUF_TYPE = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}  # tilevlm -> GGUF
IMAGE_PAIRS = {"fp32": ("f32", "f32"), "bf16": ("bf16", "f16")}  # tilevlm -> (text, mmproj)
PROMPT_TOKENS = 512  # llama-bench's pp512
DECODE_PROMPT_TOKENS = 8
IMAGE_PROMPT = "Describe this image."
MTMD_TIMEOUT_S = 600


# ----------------------------------------------------------------------------- the build

def build_hint(source: Path) -> str:
    return (f"cmake -S {source} -B {source}/build -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release "
            f"&& cmake --build {source}/build -j --target {' '.join(BINARIES)}")


def bin_dir(source: Path, binaries: str | Path | None) -> Path:
    return Path(binaries) if binaries else source / "build" / "bin"


def check_llama_cpp(source: str | Path, binaries: str | Path | None = None) -> None:
    """A ValueError (one line: what is missing and what to build or install) unless `source`
    is a llama.cpp checkout with its converter and the built binaries the comparison runs."""
    source = Path(source)
    if not (source / "convert_hf_to_gguf.py").is_file() or not (source / "gguf-py").is_dir():
        raise ValueError(f"--llama-cpp {source}: not a llama.cpp source checkout (no "
                         "convert_hf_to_gguf.py and gguf-py/ in it)")
    where = bin_dir(source, binaries)
    missing = [name for name in BINARIES if not (where / name).is_file()]
    if missing:
        raise ValueError(f"--llama-cpp {source}: no {', '.join(missing)} in {where}; build "
                         f"them: {build_hint(source)}")
    absent = [m for m in CONVERTER_NEEDS if importlib.util.find_spec(m) is None]
    if absent:
        raise ValueError(f"llama.cpp's convert_hf_to_gguf.py needs {', '.join(absent)} (pip "
                         f"install {' '.join(absent)}; its list: {source}/requirements/"
                         "requirements-convert_hf_to_gguf.txt, torch aside)")


# ----------------------------------------------------------------------------- llama.cpp

def llama_bench_command(binaries: Path, models: list[Path], threads: int, prompt: int,
                        new_tokens: int) -> list[str]:
    """One llama-bench run over `models`: a prompt test (-p) and a generation test (-n) each,
    one repetition (the bench alternates rounds itself), JSON out."""
    command = [str(binaries / "llama-bench")]
    for model in models:
        command += ["-m", str(model)]
    return command + ["-p", str(prompt), "-n", str(new_tokens), "-t", str(threads), "-r", "1",
                      "-o", "json"]


def parse_llama_bench(stdout: str) -> list[dict[str, Any]]:
    """llama-bench's JSON -> one row per test: model file name, test ("prompt" | "decode"),
    tokens, tokens/s, and the build."""
    try:
        rows = json.loads(stdout)
    except json.JSONDecodeError:
        raise ChildProcessError("llama-bench printed no JSON (is it llama-bench?)") from None
    out = []
    for row in rows:
        prompt = int(row.get("n_prompt", 0))
        out.append({"model": Path(row["model_filename"]).name,
                    "test": "prompt" if prompt else "decode",
                    "tokens": prompt or int(row.get("n_gen", 0)),
                    "tokens_per_s": float(row["avg_ts"]),
                    "build": f"{row.get('build_commit', '?')} (build {row.get('build_number', '?')})",
                    "threads": row.get("n_threads")})
    return out


def mtmd_command(binaries: Path, text: Path, mmproj: Path, image: Path, threads: int) -> list[str]:
    """llama-mtmd-cli answering one image with one token, greedy, SmolVLM's chat template; -lv 4
    prints libllama's timings."""
    return [str(binaries / "llama-mtmd-cli"), "-m", str(text), "--mmproj", str(mmproj),
            "--image", str(image), "-p", IMAGE_PROMPT, "-n", "1", "-t", str(threads),
            "--temp", "0", "-c", "4096", "--chat-template", "smolvlm", "--no-jinja", "-lv", "4",
            "--perf"]


def parse_mtmd(log_text: str) -> dict[str, Any]:
    """llama-mtmd-cli's log -> its time to first token and what went into it.

    libllama's "prompt eval time" runs from the prompt's first decode to the next synchronise;
    mtmd encodes the image slices between its decodes without one, so it spans the whole prompt
    phase, image encoding included. A build that synchronises in between would report the
    decodes only: then the encoding is added."""
    encode = sum(int(m) for m in re.findall(r"mtmd batch encoding done in (\d+) ms", log_text))
    encode = encode or sum(int(m) for m in re.findall(r"image slice encoded in (\d+) ms", log_text))
    decode = sum(int(m) for m in re.findall(r"image decoded \(batch \d+/\d+\) in (\d+) ms",
                                            log_text))
    prompt = re.search(r"prompt eval time =\s+([\d.]+) ms /\s+(\d+) tokens", log_text)
    if not encode or prompt is None:
        raise ChildProcessError("could not read llama-mtmd-cli's timings (no 'prompt eval time' "
                                "or image encoding lines in its log)")
    prompt_ms = float(prompt.group(1))
    ttft_ms = prompt_ms if prompt_ms >= encode + decode else encode + prompt_ms
    return {"time_to_first_token_s": ttft_ms / 1000, "prompt_tokens": int(prompt.group(2)),
            "image_encode_ms": encode, "image_decode_ms": decode}


def gguf_step_bytes(sizes: dict[str, int]) -> int:
    """Bytes a decode step reads from a language model GGUF: every tensor, but the input
    embedding when the output matrix is its own (it reads one row of it)."""
    untied = "output.weight" in sizes
    return sum(n for name, n in sizes.items() if not (untied and name == "token_embd.weight"))


# ----------------------------------------------------------------------------- tilevlm

def _text_batch(cfg: Any, rows: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.lm_base_vocab_size, (rows, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def tilevlm_decode(model: Any, rows: int, new_tokens: int, step_fn: Any) -> float:
    out = generate(model, _text_batch(model.cfg, rows, DECODE_PROMPT_TOKENS, 1),
                   max_new_tokens=new_tokens, eos_token_ids=[], step_fn=step_fn)
    return out.stats.tokens_per_second


def tilevlm_prompt(model: Any) -> float:
    out = generate(model, _text_batch(model.cfg, 1, PROMPT_TOKENS, 2), max_new_tokens=1,
                   eos_token_ids=[])
    return PROMPT_TOKENS / out.stats.time_to_first_token


def tilevlm_ttft(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    dtype = next(model.vision_encoder.parameters()).dtype
    batch = {**batch, "pixel_values": batch["pixel_values"].to(dtype)}
    out = generate(model, batch, max_new_tokens=1, eos_token_ids=[])
    return out.stats.time_to_first_token, out.stats.prompt_tokens


def image_batch(files: GGUFFiles) -> dict[str, torch.Tensor]:
    """The image prompt as SmolVLM's chat template writes it, through tilevlm's processor."""
    processor = load_processor(files.hf_dir)
    text = f"<|im_start|>User:<image>{IMAGE_PROMPT}<end_of_utterance>\nAssistant:"
    batch = processor.encode_texts([text], [[str(files.image)]], padding_side="left")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


# ----------------------------------------------------------------------------- the rounds

class _Figures:
    """Every timed figure by (system, workload, format), in the order the rounds gave them."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str, str], list[float]] = {}

    def add(self, system: str, workload: str, fmt: str, value: float) -> None:
        self.runs.setdefault((system, workload, fmt), []).append(value)

    def summary(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        out: dict[str, Any] = {}
        for (system, workload, fmt), values in self.runs.items():
            out.setdefault(system, {}).setdefault(fmt, {})[workload] = {
                "median": statistics.median(values), "range": [min(values), max(values)],
                "runs": values}
        return out


class _Comparison:
    """What one run of the comparison holds: the files, both sides' models and settings."""

    def __init__(self, model: Any, bc: Any, files: GGUFFiles, binaries: Path) -> None:
        self.bc, self.files, self.binaries = bc, files, binaries
        self.threads = torch.get_num_threads()
        self.formats = (bc.weights,) if bc.weights else tuple(GGUF_TYPE)
        self.models = {fmt: inference_weights(copy.deepcopy(model), fmt) for fmt in self.formats}
        self.steps = {fmt: bench_step_fn(bc, torch.device("cpu")) for fmt in self.formats}
        self.images = [f for f in self.formats if f in IMAGE_PAIRS and "prefill" in bc.parts]
        self.image = image_batch(files) if self.images else None
        self.figures = _Figures()
        self.notes: dict[str, Any] = {}

    def llama_round(self, timed: bool) -> None:
        models = [self.files.text[GGUF_TYPE[f]] for f in self.formats]
        prompt = PROMPT_TOKENS if "prefill" in self.bc.parts else 0
        new = self.bc.decode_tokens if "decode" in self.bc.parts else 0
        done = run_tool(llama_bench_command(self.binaries, models, self.threads, prompt, new),
                        "llama-bench")
        by_file = {self.files.text[GGUF_TYPE[f]].name: f for f in self.formats}
        for row in parse_llama_bench(done.stdout):
            self.notes["build"] = row["build"]
            if timed:
                workload = "prompt" if row["test"] == "prompt" else "decode_b1"
                self.figures.add("llama.cpp", workload, by_file[row["model"]], row["tokens_per_s"])
        for fmt in self.images:
            text, mmproj = IMAGE_PAIRS[fmt]
            done = run_tool(mtmd_command(self.binaries, self.files.text[text],
                                         self.files.mmproj[mmproj], self.files.image,
                                         self.threads), "llama-mtmd-cli", MTMD_TIMEOUT_S)
            parsed = parse_mtmd(done.stderr + done.stdout)
            self.notes["llama_cpp_image_prompt_tokens"] = parsed["prompt_tokens"]
            if timed:
                self.figures.add("llama.cpp", "image_ttft", fmt, parsed["time_to_first_token_s"])

    def tilevlm_round(self, timed: bool) -> None:
        for fmt in self.formats:
            model = self.models[fmt]
            if "decode" in self.bc.parts:
                for b in self.bc.decode_batches:
                    rate = tilevlm_decode(model, b, self.bc.decode_tokens, self.steps[fmt])
                    if timed:
                        self.figures.add("tilevlm", f"decode_b{b}", fmt, rate)
            if "prefill" in self.bc.parts:
                rate = tilevlm_prompt(model)
                if timed:
                    self.figures.add("tilevlm", "prompt", fmt, rate)
            if fmt in self.images:
                seconds, tokens = tilevlm_ttft(model, self.image)
                self.notes["tilevlm_image_prompt_tokens"] = tokens
                if timed:
                    self.figures.add("tilevlm", "image_ttft", fmt, seconds)


def run_peer(model: Any, bc: Any, device: torch.device,
             progress: Callable[[str], None]) -> dict[str, Any]:
    """The comparison (module docstring) on `model`'s weights; the rows included."""
    if device.type != "cpu":
        raise ValueError("--peer llama.cpp compares CPU inference: use --device cpu")
    source = Path(bc.llama_cpp)
    binaries = bin_dir(source, bc.llama_cpp_bin)
    check_llama_cpp(source, bc.llama_cpp_bin)
    with tempfile.TemporaryDirectory(prefix="tilevlm-llama-cpp-") as work:
        progress("writing the weights as GGUF files (tilevlm's export + llama.cpp's converter)")
        files = write_gguf_files(model.float().eval(), source, binaries, Path(work),
                                 torch.get_num_threads(), mmproj="prefill" in bc.parts)
        sizes = {t: gguf_step_bytes(tensor_bytes(source, p)) for t, p in files.text.items()}
        run = _Comparison(model, bc, files, binaries)
        bandwidths, loads = [], [os.getloadavg()[0]]
        for r in range(bc.warmup + bc.repeats):
            timed = r >= bc.warmup
            progress(f"round {r + 1} of {bc.warmup + bc.repeats}"
                     f"{'' if timed else ' (warm-up)'}: memory bandwidth, llama.cpp, tilevlm")
            bandwidths.append(memory_bandwidth(device, bc.bandwidth_mib))
            run.llama_round(timed)
            run.tilevlm_round(timed)
            loads.append(os.getloadavg()[0])
    result = _result(run, sizes, bandwidths, loads)
    result["comparisons"] = comparisons(result)
    return result


def _result(run: _Comparison, sizes: dict[str, int], bandwidths: list[float],
            loads: list[float]) -> dict[str, Any]:
    bc = run.bc
    return {"peer": "llama.cpp", "build": run.notes.get("build"), "threads": run.threads,
            "bandwidth_gbps": max(bandwidths),  # what the machine did at least once: the bound
            "bandwidth_rounds_gbps": bandwidths, "bandwidth_mib": bc.bandwidth_mib,
            "rounds": bc.repeats, "warmup_rounds": bc.warmup, "decode_tokens": bc.decode_tokens,
            "prompt_tokens": PROMPT_TOKENS,
            "image_prompt_tokens": {"tilevlm": run.notes.get("tilevlm_image_prompt_tokens"),
                                    "llama.cpp": run.notes.get("llama_cpp_image_prompt_tokens")},
            "step_bytes": {"tilevlm": {f: decode_weight_bytes(m) for f, m in run.models.items()},
                           "llama.cpp": {f: sizes[GGUF_TYPE[f]] for f in run.formats}},
            "load_avg": [round(x, 2) for x in loads],  # 1 minute: at the start, each round's end
            "figures": run.figures.summary(), "compiled": bc.compile}


# ----------------------------------------------------------------------------- the table

_WORKLOADS = {"decode_b1": ("decode, batch 1", "tok/s", True),
              "prompt": (f"prompt, {PROMPT_TOKENS} tokens", "tok/s", True),
              "image_ttft": ("time to first token, one image", "s", False)}


def _bound_fraction(result: dict[str, Any], system: str, fmt: str, value: float) -> float:
    """A decode figure (batch 1) over the bandwidth bound of its weights."""
    return value / (result["bandwidth_gbps"] * 1e9 / result["step_bytes"][system][fmt])


def comparisons(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per workload and precision pair both systems ran; ratio = how many times faster
    tilevlm is (tokens/s over tokens/s; seconds the other way round), of the medians and of
    each system's best run (on a shared machine, what each does when left alone)."""
    figures, rows = result["figures"], []
    ours, theirs = figures.get("tilevlm", {}), figures.get("llama.cpp", {})
    for workload, (_, _, higher) in _WORKLOADS.items():
        for fmt in GGUF_TYPE:
            a = ours.get(fmt, {}).get(workload)
            b = theirs.get(fmt, {}).get(workload)
            if a is None or b is None:
                continue
            pick = max if higher else min
            best_a, best_b = pick(a["runs"]), pick(b["runs"])
            row = {"workload": workload, "tilevlm": fmt, "llama.cpp": _peer_name(workload, fmt),
                   "tilevlm_value": a["median"], "llama_cpp_value": b["median"],
                   "tilevlm_range": a["range"], "llama_cpp_range": b["range"],
                   "ratio": _ratio(a["median"], b["median"], higher),
                   "ratio_of_best_runs": _ratio(best_a, best_b, higher)}
            if workload == "decode_b1":
                row["tilevlm_bound_fraction"] = _bound_fraction(result, "tilevlm", fmt,
                                                                a["median"])
                row["llama_cpp_bound_fraction"] = _bound_fraction(result, "llama.cpp", fmt,
                                                                  b["median"])
            rows.append(row)
    return rows


def _ratio(ours: float, theirs: float, higher_is_better: bool) -> float:
    return ours / theirs if higher_is_better else theirs / ours


def _peer_name(workload: str, fmt: str) -> str:
    if workload == "image_ttft":
        text, mmproj = IMAGE_PAIRS[fmt]
        return f"{text} + mmproj {mmproj}"
    return GGUF_TYPE[fmt]


def _value(workload: str, value: float, spread: list[float], fmt: str) -> str:
    """'38.6 tok/s (fp32; 38.3-38.7)': the median, the format, the runs' range."""
    digits, unit = (3, " s") if _WORKLOADS[workload][1] == "s" else (1, " tok/s")
    return (f"{value:.{digits}f}{unit} ({fmt}; {spread[0]:.{digits}f}-{spread[1]:.{digits}f})")


def peer_table(results: dict[str, Any]) -> list[str]:
    """The comparison as table lines (for `speed.format_table`)."""
    peer = results["peer"]
    lines = [f"tilevlm vs llama.cpp {peer['build']} (llama-bench, llama-mtmd-cli; "
             f"{peer['threads']} threads) on the same random weights (tilevlm's Idefics3 export "
             f"through llama.cpp's convert_hf_to_gguf.py), medians of {peer['rounds']} "
             f"alternated rounds after {peer['warmup_rounds']} warm-up; ratio = how many times "
             f"faster tilevlm is{'; tilevlm with its compiled decode step' if peer['compiled'] else ''}"
             f"; load average {' -> '.join(f'{x:.1f}' for x in peer['load_avg'])}"]
    head = ("workload", "tilevlm (format; runs)", "llama.cpp (format; runs)", "ratio",
            "best runs", "of the bandwidth bound")
    table = [head]
    for row in peer["comparisons"]:
        w = row["workload"]
        bound = ("" if "tilevlm_bound_fraction" not in row else
                 f"{row['tilevlm_bound_fraction']:.0%} / {row['llama_cpp_bound_fraction']:.0%}")
        table.append((_WORKLOADS[w][0],
                      _value(w, row["tilevlm_value"], row["tilevlm_range"], row["tilevlm"]),
                      _value(w, row["llama_cpp_value"], row["llama_cpp_range"], row["llama.cpp"]),
                      f"{row['ratio']:.2f}x", f"{row['ratio_of_best_runs']:.2f}x", bound))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines += ["  " + "  ".join(f"{c:<{n}}" for c, n in zip(r, widths)).rstrip() for r in table]
    lines += _batched_lines(peer)
    steps = peer["step_bytes"]
    lines.append(f"  memory bandwidth {peer['bandwidth_gbps']:.1f} GB/s (copy of "
                 f"{peer['bandwidth_mib']} MiB, read + write, best of 5, the best of the rounds' "
                 f"{len(peer['bandwidth_rounds_gbps'])}); weights a decode step reads: "
                 + ", ".join(
                     f"{f} {steps['tilevlm'][f] / 1e6:.0f} / {GGUF_TYPE[f]} "
                     f"{steps['llama.cpp'][f] / 1e6:.0f} MB" for f in steps["tilevlm"]))
    tokens = peer["image_prompt_tokens"]
    if tokens.get("tilevlm") is not None:
        lines.append(f"  image prompt: {tokens['tilevlm']} tokens in tilevlm, "
                     f"{tokens['llama.cpp']} in llama.cpp")
    return lines


def _batched_lines(peer: dict[str, Any]) -> list[str]:
    """tilevlm's batched decode (llama-bench has none), as a multiple of its batch 1."""
    lines = []
    for fmt, work in peer["figures"].get("tilevlm", {}).items():
        one = work.get("decode_b1", {}).get("median")
        for key in sorted((k for k in work if k.startswith("decode_b") and k != "decode_b1"),
                          key=lambda k: int(k[len("decode_b"):])):
            value = work[key]["median"]
            times = f" = {value / one:.1f}x its batch 1" if one else ""
            lines.append(f"  tilevlm {fmt} decode, batch {key[len('decode_b'):]}: "
                         f"{value:.1f} tok/s total{times}")
    return lines
