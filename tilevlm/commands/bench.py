"""`tilevlm bench`: preprocessing, training-step, prefill, decode and vision-encoder speed; with
`--peer transformers` or `--peer llama.cpp`, prefill and decode against that peer on the same
weights; with `--serve URL`, a bounded load on a running chat completions server instead."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tilevlm.commands.options import (add_device_argument, add_threads_argument,
                                      add_weights_argument, weights_format)

HELP = "measure preprocessing, training, prefill, decode and vision speed (random weights)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tilevlm.bench.bench_config import BENCH_PARTS, PEERS, BenchConfig
    from tilevlm.config import PRESETS

    d = BenchConfig()
    parser.add_argument("--preset", default=d.preset, choices=sorted(PRESETS),
                        help="the architecture measured (random weights); smolvlm_256m is "
                             "SmolVLM-256M-Instruct's (Idefics3 layout, 512-px tiles)")
    parser.add_argument("--max-img-size", type=int, default=None,
                        help="default: 2 x the preset's tile size (2x2 grid + global tile: for "
                             "smolvlm_256m 1024, 5 tiles, where the real model's 2048 makes "
                             "every image 4x4 + global = 17 tiles)")
    add_device_argument(parser, d.device)
    parser.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 on CUDA, fp32 on CPU; training uses autocast in bf16")
    add_weights_argument(parser, "prefill and decode", "the --dtype")
    parser.add_argument("--compile", action="store_true", default=d.compile,
                        help="torch.compile the decode step (reduce-overhead: CUDA graphs on GPU)")
    parser.add_argument("--compile-train", action="store_true", default=d.compile_train,
                        help="torch.compile every vision and decoder block for the training step")
    parser.add_argument("--baseline", action="store_true", default=d.baseline,
                        help="also time prefill and decode with fp32 weights and the eager step "
                             "in the same run, and print each speed-up beside it")
    parser.add_argument("--peer", choices=PEERS, default=d.peer,
                        help="compare with a peer on the same random weights (an Idefics3 "
                             "preset: smolvlm_256m), alternately, with the ratio per row. "
                             "transformers: its Idefics3ForConditionalGeneration.generate, time "
                             "to first token and decode, tilevlm with fp32, bf16 and int8 "
                             "weights (or the one --weights names) against transformers in fp32 "
                             "and bf16 (pip install transformers). llama.cpp: the weights "
                             "converted by llama.cpp's own converter, llama-bench's decode and "
                             "512-token prompt and llama-mtmd-cli's time to first token with an "
                             "image against tilevlm's, fp32/bf16/int8/int4 against "
                             "f32/bf16/q8_0/q4_0, each decode also as a share of the memory "
                             "bandwidth bound (needs --llama-cpp)")
    parser.add_argument("--llama-cpp", metavar="DIR", default=d.llama_cpp,
                        help="--peer llama.cpp: a llama.cpp source checkout you built (its "
                             "convert_hf_to_gguf.py and gguf-py are used, and the binaries "
                             "llama-bench, llama-mtmd-cli, llama-quantize)")
    parser.add_argument("--llama-cpp-bin", metavar="DIR", default=d.llama_cpp_bin,
                        help="where those binaries are (default: DIR/build/bin)")
    parser.add_argument("--train-loss", default=d.train_loss, choices=["labels", "full"],
                        help="labels: LM head only at label positions (forward with return_logits=False); "
                             "full: model(**batch).loss over every position")
    parser.add_argument("--bf16-mode", default=d.bf16_mode, choices=["autocast", "weights"],
                        help="the bf16 training step: autocast, or bf16 weights with fp32 master "
                             "weights in the optimizer (tilevlm train --bf16-mode)")
    add_threads_argument(parser)
    parser.add_argument("--preprocess-threads", type=int, default=d.preprocess_threads,
                        help="threads for the parallel preprocessing figure (default: the cores)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="timed runs (median)")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed runs first")
    parser.add_argument("--train-batch", type=int, default=d.train_batch,
                        help="samples in the timed training step")
    parser.add_argument("--decode-tokens", type=int, default=d.decode_tokens,
                        help="tokens generated in each timed decode")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=list(d.decode_batches),
                        help="the batch sizes decode is timed at")
    parser.add_argument("--parts", nargs="+", default=list(BENCH_PARTS), choices=BENCH_PARTS,
                        help="which measurements to run")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the results here")
    _add_serve_arguments(parser)


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from tilevlm.bench.serve_load import DEFAULT_LEVELS, LoadConfig

    d = LoadConfig(url="")
    load = parser.add_argument_group(
        "load on a server (--serve URL; the options above are then unused but --json)")
    load.add_argument("--serve", metavar="URL", default=None,
                      help="measure a running OpenAI-compatible server instead (tilevlm serve, "
                      "transformers serve, ...): requests/s, tokens/s and time to first token "
                      "at each --clients level, every request with an image")
    load.add_argument("--clients", type=int, nargs="+", default=list(DEFAULT_LEVELS),
                      metavar="N", help="concurrent clients, one level after another")
    load.add_argument("--requests-per-client", type=int, default=d.requests, metavar="N",
                      help="requests each client sends at each level, one after another")
    load.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="N",
                      help="max_tokens of every request (greedy)")
    load.add_argument("--image", metavar="IMG", default=None,
                      help="the image every request carries (default: a generated "
                      f"{d.image_size[0]}x{d.image_size[1]} JPEG per client)")
    load.add_argument("--prompt", default=d.prompt, help="the question every request asks")
    load.add_argument("--served-model", metavar="NAME", default=None,
                      help="the model id to ask for (default: the first /v1/models lists)")
    load.add_argument("--api-key", default=None, metavar="KEY", help="the server's API key")


def run(args: argparse.Namespace) -> int:
    if args.serve:
        return _run_load(args)
    from tilevlm.bench.bench_config import BenchConfig
    from tilevlm.bench.speed import format_table, run_bench

    bc = BenchConfig(preset=args.preset, max_img_size=args.max_img_size, device=args.device,
                     dtype=args.dtype, weights=weights_format(args), compile=args.compile,
                     compile_train=args.compile_train, train_loss=args.train_loss,
                     bf16_mode=args.bf16_mode,
                     baseline=args.baseline, peer=args.peer, llama_cpp=args.llama_cpp,
                     llama_cpp_bin=args.llama_cpp_bin,
                     threads=args.threads, preprocess_threads=args.preprocess_threads,
                     repeats=args.repeats, warmup=args.warmup,
                     train_batch=args.train_batch, decode_tokens=args.decode_tokens,
                     decode_batches=tuple(args.decode_batches), parts=tuple(args.parts))
    bc.validate()
    if bc.peer == "transformers":  # before any model is built: one line and exit 2 when absent
        from tilevlm.bench.peer_transformers import require_peer

        require_peer(bc.peer)
    elif bc.peer == "llama.cpp":  # the same: what to build when a binary is missing
        from tilevlm.bench.peer_llama_cpp import check_llama_cpp

        check_llama_cpp(bc.llama_cpp, bc.llama_cpp_bin)
    results = run_bench(bc)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        log.info("results written to %s", args.json)
    return 0


def _run_load(args: argparse.Namespace) -> int:
    import asyncio

    from tilevlm.bench.serve_load import LoadConfig, format_load, run_load

    config = LoadConfig(url=args.serve.rstrip("/"), levels=tuple(args.clients),
                        requests=args.requests_per_client, max_tokens=args.max_tokens,
                        image=Path(args.image) if args.image else None, prompt=args.prompt,
                        model=args.served_model, api_key=args.api_key)
    config.validate()
    try:
        results = asyncio.run(run_load(config))
    except ImportError as e:
        raise ValueError(f"--serve needs httpx ({e}): pip install 'tilevlm[serve]'") from None
    except Exception as e:  # httpx's connection errors: one line, not a traceback
        if type(e).__module__.startswith(("httpx", "httpcore")):
            raise OSError(f"{config.url}: {type(e).__name__}: {e}") from None
        raise
    print(format_load(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        log.info("results written to %s", args.json)
    return 0
