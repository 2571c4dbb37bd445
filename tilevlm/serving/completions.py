"""OpenAI's chat completion objects, and turning the engine's events for one request into
them: one `chat.completion`, or server-sent `chat.completion.chunk` events ending in
`data: [DONE]` (with a usage chunk when `stream_options.include_usage`)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable

from tilevlm.serving.errors import ApiError, error_body
from tilevlm.serving.prompt import Prompt
from tilevlm.serving.request import Event, Request


class Completion:
    """One request's answer as it comes: its id, model name and counts for the usage object."""

    def __init__(self, model: str, prompt: Prompt, include_usage: bool = False) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompt = prompt
        self.include_usage = include_usage  # streaming: every chunk has `usage`, null but the last
        self.completion_tokens = 0

    def usage(self) -> dict[str, Any]:
        p = self.prompt
        return {"prompt_tokens": p.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": p.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": p.image_tokens},
                "image_tiles": p.tiles}

    def response(self, text: str, finish_reason: str) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": self.usage()}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
              usage: bool = False) -> dict[str, Any]:
        choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish_reason}]
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.model, "choices": choices}
        if self.include_usage:
            out["usage"] = self.usage() if usage else None
        return out


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def stream_events(completion: Completion, request: Request,
                        events: asyncio.Queue) -> AsyncIterator[bytes]:
    """The SSE body. When the client goes away the response task is cancelled here, and the
    request is cancelled in the engine (its row is freed before the next step)."""
    finished = False
    try:
        yield sse(completion.chunk({"role": "assistant", "content": ""}))
        while True:
            event: Event = await events.get()
            completion.completion_tokens = event.completion_tokens
            if event.finish_reason == "error":
                yield sse(error_body(event.error or "the server failed", "server_error"))
                break
            if event.text:
                yield sse(completion.chunk({"content": event.text}))
            if event.finish_reason:
                yield sse(completion.chunk({}, event.finish_reason))
                if completion.include_usage:
                    yield sse(completion.chunk({}, usage=True))
                break
        finished = True
        yield sse("[DONE]")
    finally:
        if not finished:
            request.cancel()


async def collect_events(completion: Completion, request: Request, events: asyncio.Queue,
                         disconnected: Awaitable[None]) -> dict[str, Any] | None:
    """The whole answer as one chat.completion; None when the client went away first (then the
    request is cancelled in the engine)."""
    watcher = asyncio.ensure_future(disconnected)
    pieces = []
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                request.cancel()
                return None
            event: Event = getter.result()
            completion.completion_tokens = event.completion_tokens
            if event.finish_reason == "error":
                raise ApiError(500, event.error or "the server failed", type="server_error")
            pieces.append(event.text)
            if event.finish_reason:
                return completion.response("".join(pieces), event.finish_reason)
    except asyncio.CancelledError:
        request.cancel()
        raise
    finally:
        watcher.cancel()
