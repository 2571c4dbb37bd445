"""Running the server: bind the socket (a port in use is one line, before anything loads),
answer at once (`/health` says 503 while the model loads, the tile preview already works), load
the model on the server's torch thread (`torch_thread.py`), then start the engine. Uvicorn runs
the app until Ctrl-C or SIGTERM; the engine is stopped with it."""

from __future__ import annotations

import logging
import signal
import socket
from typing import Any, Callable

import uvicorn

from tilevlm.preprocessing.processor import Processor
from tilevlm.serving.app import ServerState, create_app
from tilevlm.serving.engine import Engine
from tilevlm.serving.settings import ServeSettings
from tilevlm.serving.torch_thread import TorchThread

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (an OSError, e.g. the port is in use, before any work)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: ServeSettings, processor: Processor, load_model: Callable[[], Any],
          max_len: int) -> None:
    """Serve until stopped; a failure to load the model ends the server and is raised here."""
    sock = bind(settings.host, settings.port)
    torch_thread = TorchThread()
    state = ServerState(settings, processor, torch_thread)
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def load() -> None:
        try:
            model = load_model()
            engine = Engine(model, processor.tokenizer, settings.max_batch, settings.max_queue,
                            max_len, max_prefill_tokens=settings.max_prefill_tokens,
                            torch_thread=torch_thread)
            engine.start()
            state.engine = engine
            log.info("ready: %s answers as %r (up to %d rows, %d waiting, %d positions each)",
                     f"http://{_url_host(settings.host)}:{sock.getsockname()[1]}",
                     settings.model_name, settings.max_batch, settings.max_queue, max_len)
        except BaseException as e:  # ValueError (a bad model), OSError, MemoryError, ...
            failure.append(e)
            server.should_exit = True

    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (loading the model; /health is 503 until it is ready)",
             _url_host(host), port)
    torch_thread.submit(load)
    # Uvicorn shuts down gracefully on SIGTERM, then raises the signal again: with this handler
    # in place the command then ends normally (exit code 0) instead of dying of the signal.
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run(sockets=[sock])
    except _Stopped:
        log.info("stopped (SIGTERM)")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if state.engine is not None:
            state.engine.stop()
        torch_thread.shutdown()
        sock.close()
    if failure:
        raise failure[0]


class _Stopped(Exception):
    """SIGTERM arrived: the server has shut down (or never started)."""


def _stopped(signum: int, frame: Any) -> None:
    raise _Stopped()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
