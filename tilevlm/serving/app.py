"""The HTTP layer, kept thin: authorize, read and check the request, hand it to the engine,
stream what the engine sends back. FastAPI on uvicorn (the ASGI stack vLLM and transformers
serve use): async request handling, so many open streams cost no threads, and server-sent
events as a plain async generator.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health` (503 while the model
loads), `POST /v1/tiles` (how an image is tiled: the page's preview, no model needed) and the
page at `/`. Every error is OpenAI's JSON error object with its status code.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tilevlm.files import parse_json
from tilevlm.preprocessing.processor import Processor
from tilevlm.serving.chat_request import parse_chat_request
from tilevlm.serving.completions import Completion, collect_events, stream_events
from tilevlm.serving.engine import Engine, QueueFull
from tilevlm.serving.errors import ApiError, bad_request, error_body
from tilevlm.serving.prompt import Prompt, load_request_image, prepare_prompt, tile_preview
from tilevlm.serving.request import Event
from tilevlm.serving.request import Request as EngineRequest
from tilevlm.serving.settings import ServeSettings
from tilevlm.serving.torch_thread import TorchThread

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share: the settings, the processor (ready at once), the thread that
    does torch work (the tiles too) and the engine (once the model has loaded)."""

    settings: ServeSettings
    processor: Processor
    torch_thread: TorchThread = field(default_factory=TorchThread)
    engine: Engine | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="tilevlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tilevlm = state
    _add_error_handlers(app)
    page = resources.files("tilevlm.serving").joinpath("static/index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            return JSONResponse({"status": "loading"}, 503, _retry(state))
        return JSONResponse({"status": "ok", **vars(state.engine.snapshot())})

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, state.settings)
        return {"object": "list", "data": [{"id": state.settings.model_name, "object": "model",
                                            "created": state.created, "owned_by": "tilevlm"}]}

    @app.post("/v1/tiles")
    async def tiles(request: Request) -> dict[str, Any]:
        _authorize(request, state.settings)
        body = await _read_json(request, state.settings.max_body_bytes)
        url = body.get("image_url") if isinstance(body, dict) else None
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise bad_request("expected {\"image_url\": {\"url\": \"data:image/...\"}}",
                              "image_url")
        image = await run_in_threadpool(load_request_image, url, "image_url", state.settings)
        return await state.torch_thread.call(tile_preview, state.processor, image)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _authorize(request, state.settings)
        engine = _ready(state)
        chat = parse_chat_request(await _read_json(request, state.settings.max_body_bytes),
                                  state.settings)
        try:
            engine.reserve()
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", type="server_busy",
                           code="queue_full", headers=_retry(state)) from None
        try:
            prompt = await state.torch_thread.call(prepare_prompt, state.processor, chat,
                                                   state.settings, engine.max_len)
        except BaseException:
            engine.release()
            raise
        completion = Completion(state.settings.model_name, prompt, chat.include_usage)
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = _submit(engine, completion.id, prompt, chat, events)
        if chat.stream:
            return StreamingResponse(stream_events(completion, job, events),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        answer = await collect_events(completion, job, events, _disconnected(request))
        return JSONResponse(answer or {})

    return app


def _submit(engine: Engine, request_id: str, prompt: Prompt, chat: Any,
            events: asyncio.Queue) -> EngineRequest:
    """Queue the request in the engine; its events come back on this event loop."""
    loop = asyncio.get_running_loop()

    def on_event(event: Event) -> None:  # on the torch thread (the engine's steps)
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is going down
            pass

    job = EngineRequest(request_id, prompt.input_ids, prompt.pixel_values, prompt.max_tokens,
                        chat.sampling, chat.stop, chat.seed, on_event)
    engine.submit(job)
    return job


def _retry(state: ServerState) -> dict[str, str]:
    return {"Retry-After": str(state.settings.retry_after)}


def _ready(state: ServerState) -> Engine:
    if state.engine is None:
        raise ApiError(503, "the model is still loading; retry shortly", type="server_busy",
                       code="loading", headers=_retry(state))
    return state.engine


def _authorize(request: Request, settings: ServeSettings) -> None:
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, key = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                             settings.api_key.encode()):
        raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)",
                       type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON: a 413 past `limit` bytes (from Content-Length, or counted as it
    arrives), a 400 when it is not JSON."""
    length = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than this server's limit of "
                         f"{limit} bytes", code="request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        return parse_json(b"".join(chunks), "the request body")
    except ValueError as e:
        raise bad_request(f"malformed JSON: {e}") from None


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), e.status, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), e.status_code, e.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(error_body("the server failed on this request", "server_error"), 500)
