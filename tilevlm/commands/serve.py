"""`tilevlm serve`: an OpenAI-compatible chat completions server with continuous batching, and
a page at / that shows how an image is tiled and streams the answer."""

from __future__ import annotations

import argparse
import os

from tilevlm.commands.options import (LOADED_DTYPE, add_device_argument, add_model_argument,
                                      add_threads_argument, add_weights_argument, model_source,
                                      store_weights)

HELP = "serve a model over HTTP: OpenAI's chat completions API (with images) and a web page"
API_KEY_ENV = "TILEVLM_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tilevlm.serving.settings import ServeSettings as S

    add_model_argument(parser)
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="tokenizer directory (needed for nanoVLM checkpoints)")
    add_device_argument(parser)
    add_weights_argument(parser, "serving", LOADED_DTYPE)
    add_threads_argument(parser)
    net = parser.add_argument_group("network")
    net.add_argument("--host", default=S.host, help="address to listen on; anything but "
                     "loopback exposes the server: give it an --api-key")
    net.add_argument("--port", type=int, default=S.port, help="port (0: any free port)")
    net.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                     help="require `Authorization: Bearer KEY` on /v1 (default: "
                     f"${API_KEY_ENV}; none: no key)")
    net.add_argument("--served-model-name", metavar="NAME", default=None,
                     help="the model id clients name (default: the model directory's name)")
    net.add_argument("--allowed-local-media-path", metavar="DIR", default=None,
                     help="also read images given as file:// URLs under DIR (default: none; "
                     "remote URLs are never fetched)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-batch", type=int, default=S.max_batch, metavar="N",
                        help="requests decoding together (rows of the batch)")
    limits.add_argument("--max-queue", type=int, default=S.max_queue, metavar="N",
                        help="requests waiting for a row; more are refused at once (429)")
    limits.add_argument("--max-prefill-tokens", type=int, default=S.max_prefill_tokens,
                        metavar="N", help="prompt tokens prefilled between two decode steps (at "
                        "least one request): fewer stall running answers less, more let a burst "
                        "of requests start sooner")
    limits.add_argument("--max-tokens", type=int, default=S.max_tokens, metavar="N",
                        help="the most new tokens one request may ask for")
    limits.add_argument("--default-max-tokens", type=int, default=S.default_max_tokens,
                        metavar="N", help="new tokens when a request names no max_tokens")
    limits.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="positions of one request, prompt + answer (default: the model's "
                        "lm_max_position_embeddings); the KV cache holds --max-batch x N")
    limits.add_argument("--max-body-bytes", type=int, default=S.max_body_bytes, metavar="N",
                        help="a request's body, images included (larger: 413)")
    limits.add_argument("--max-images", type=int, default=S.max_images, metavar="N",
                        help="images in one request")
    limits.add_argument("--max-image-pixels", type=int, default=S.max_image_pixels,
                        metavar="N", help="width x height of one image, read from its header")
    limits.add_argument("--retry-after", type=int, default=S.retry_after, metavar="S",
                        help="seconds a refused client is told to wait (Retry-After)")


def run(args: argparse.Namespace) -> int:
    import logging

    from tilevlm.device import resolve_device
    from tilevlm.serving.settings import ServeSettings
    from tilevlm.weights.loading import load_model, load_processor

    serve = _server()
    source = model_source(args)
    processor = load_processor(source, args.tokenizer)  # light: fails before the socket opens
    resolve_device(args.device)
    settings = ServeSettings(
        host=args.host, port=args.port, api_key=args.api_key,
        model_name=args.served_model_name or source.directory.name,
        max_batch=args.max_batch, max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens, max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens, max_context=args.max_context,
        max_body_bytes=args.max_body_bytes, max_images=args.max_images,
        max_image_pixels=args.max_image_pixels, retry_after=args.retry_after,
        allowed_local_media_path=_media_dir(args.allowed_local_media_path))
    positions = source.config.lm_max_position_embeddings
    if settings.max_context is not None and settings.max_context > positions:
        raise ValueError(f"--max-context {settings.max_context} is more than the model's "
                         f"{positions} positions")
    if settings.exposed and settings.api_key is None:
        logging.getLogger(__name__).warning(
            "listening on %s without --api-key: anyone who can reach it can use it", args.host)

    def load():
        return store_weights(load_model(source, processor, args.device), args)

    serve(settings, processor, load, settings.max_context or positions)
    return 0


def _media_dir(value: str | None):
    from pathlib import Path

    if value is None:
        return None
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"--allowed-local-media-path {value}: not a directory")
    return path.resolve()


def _server():
    """`serving.server.serve`, or a one-line error when the serve extra is not installed."""
    try:
        from tilevlm.serving.server import serve
    except ImportError as e:
        raise ValueError(f"tilevlm serve needs FastAPI and uvicorn ({e}); install them with "
                         "pip install 'tilevlm[serve]'") from None
    return serve
