"""`tilevlm bench --serve URL`: a bounded load generator for an OpenAI-compatible chat
completions server (`tilevlm serve`, `transformers serve`, vLLM, llama-server).

At each concurrency level, that many clients each send `requests` streaming chat completions
one after another, every one with an image of its own (a data: URL) and greedy decoding, and
the level reports requests per second, generated tokens per second (all clients together, over
the level's wall time), decode tokens per second (`decode_rate`: the tokens after each first
one, over the time some request was decoding) and time to first token p50 / p95 (from sending
the request to the first chunk with text). Refused requests (429, 503) are counted, not
retried. Everything is bounded: clients x requests per level, and a timeout per request.
Traffic goes only to the URL given.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tilevlm.bench.timing import cpu_name

DEFAULT_LEVELS = (1, 4, 8, 16)


@dataclass(frozen=True)
class LoadConfig:
    url: str  # the server's base URL, e.g. http://127.0.0.1:8000
    levels: tuple[int, ...] = DEFAULT_LEVELS  # concurrent clients, one level after another
    requests: int = 2  # per client and level
    max_tokens: int = 64
    image: Path | None = None  # None: a generated photo-like image per client
    image_size: tuple[int, int] = (640, 480)
    prompt: str = "Describe the image in detail."
    model: str | None = None  # None: the first model /v1/models lists
    api_key: str | None = None
    timeout: float = 600.0  # seconds, one request

    def validate(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--serve must be a server's http:// URL, got {self.url!r}")
        if not self.levels or min(self.levels) < 1:
            raise ValueError(f"--clients must be numbers >= 1, got {list(self.levels)}")
        if self.requests < 1 or self.max_tokens < 1:
            raise ValueError("--requests-per-client and --max-tokens must be >= 1")
        if self.image is not None and not self.image.is_file():
            raise ValueError(f"--image {self.image}: not a file")


@dataclass(frozen=True)
class Outcome:
    status: int
    start: float = 0.0  # perf_counter() when it was sent
    ttft: float = 0.0  # seconds to the first text
    seconds: float = 0.0  # the whole request
    tokens: int = 0


def image_url(config: LoadConfig, client: int) -> str:
    """A JPEG data: URL: the given image, or smooth noise seeded by the client's number."""
    if config.image is not None:
        data = config.image.read_bytes()
        mime = Image.open(io.BytesIO(data)).get_format_mimetype() or "image/png"
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"
    width, height = config.image_size
    rng = np.random.default_rng(client)
    small = rng.integers(0, 255, size=(max(height // 32, 1), max(width // 32, 1), 3),
                         dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return f"data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}"


def request_body(config: LoadConfig, model: str, url: str) -> dict[str, Any]:
    return {"model": model, "max_tokens": config.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": config.prompt}]}]}


async def one_request(http: Any, url: str, body: dict[str, Any]) -> Outcome:
    start = time.perf_counter()
    ttft, tokens, chunks = 0.0, None, 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return Outcome(response.status_code, start, 0.0, time.perf_counter() - start)
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    ttft = ttft or time.perf_counter() - start
    seconds = time.perf_counter() - start
    return Outcome(200, start, ttft or seconds, seconds, chunks if tokens is None else tokens)


async def run_level(http: Any, config: LoadConfig, model: str, clients: int
                    ) -> dict[str, Any]:
    # Every client's request is made before the clock starts: encoding images in the event
    # loop would delay reading the answers that already stream.
    bodies = [request_body(config, model, image_url(config, k)) for k in range(clients)]

    async def client(k: int) -> list[Outcome]:
        return [await one_request(http, config.url, bodies[k]) for _ in range(config.requests)]

    start = time.perf_counter()
    results = await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    return summarize([o for per_client in results for o in per_client], clients, wall)


def summarize(outcomes: list[Outcome], clients: int, wall: float) -> dict[str, Any]:
    done = [o for o in outcomes if o.status == 200]
    ttft = [o.ttft for o in done]
    tokens = sum(o.tokens for o in done)
    origin = min((o.start for o in outcomes), default=0.0)
    return {"clients": clients, "requests": len(outcomes), "completed": len(done),
            "refused": sum(o.status in (429, 503) for o in outcomes),
            "failed": sum(o.status not in (200, 429, 503) for o in outcomes),
            "seconds": round(wall, 3), "requests_per_s": round(len(done) / wall, 3),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "decode_tokens_per_s": decode_rate(done),
            "ttft_p50_s": _percentile(ttft, 50), "ttft_p95_s": _percentile(ttft, 95),
            "latency_p50_s": _percentile([o.seconds for o in done], 50),
            "refused_latency_max_s": max((round(o.seconds, 3) for o in outcomes
                                          if o.status in (429, 503)), default=None),
            "each": [[round(o.start - origin, 3), o.status, round(o.ttft, 3),
                      round(o.seconds, 3), o.tokens] for o in outcomes]}


def decode_rate(done: list[Outcome]) -> float | None:
    """Tokens after each request's first, per second of the time some request was past its
    first token (the union of those intervals): the aggregate decode speed, without the
    stretches where every request still waited for its prefill."""
    spans = sorted((o.start + o.ttft, o.start + o.seconds) for o in done if o.tokens > 1)
    busy, end = 0.0, float("-inf")
    for lo, hi in spans:
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    later = sum(o.tokens - 1 for o in done if o.tokens > 1)
    return round(later / busy, 2) if busy > 0 else None


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


async def run_load(config: LoadConfig) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=max(config.levels) + 4)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    async with httpx.AsyncClient(headers=headers, timeout=config.timeout,
                                 limits=limits) as http:
        await _wait_ready(http, config.url, config.timeout)
        model = config.model or await _first_model(http, config.url)
        warm = await one_request(http, config.url,
                                 request_body(config, model, image_url(config, 999)))
        if warm.status != 200:
            raise ValueError(f"{config.url}: the warm-up request got HTTP {warm.status}")
        levels = [await run_level(http, config, model, n) for n in config.levels]
    return {"url": config.url, "model": model, "cpu": cpu_name(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "max_tokens": config.max_tokens, "requests_per_client": config.requests,
            "image": str(config.image) if config.image else
            f"generated {config.image_size[0]}x{config.image_size[1]} JPEG per client",
            "levels": levels}


async def _wait_ready(http: Any, url: str, timeout: float) -> None:
    """Until /health answers 200 (a server still loading its model says 503, one still
    starting refuses the connection)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await http.get(f"{url}/health")).status_code == 200:
                return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise ValueError(f"{url}/health: not ready within {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def _first_model(http: Any, url: str) -> str:
    response = await http.get(f"{url}/v1/models")
    if response.status_code != 200:
        raise ValueError(f"{url}/v1/models: HTTP {response.status_code}")
    data = response.json().get("data") or []
    if not data:
        raise ValueError(f"{url}/v1/models lists no model; name one with --served-model")
    return data[0]["id"]


def format_load(results: dict[str, Any]) -> str:
    lines = [f"{results['url']} ({results['model']}), {results['max_tokens']} new tokens at "
             f"most, {results['requests_per_client']} requests per client, "
             f"{results['image']}; CPU {results['cpu']}, load average "
             f"{' '.join(map(str, results['load_average']))}",
             "| clients | done | refused | failed | req/s | tokens/s | decode tokens/s "
             "| TTFT p50 s | TTFT p95 s | latency p50 s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["levels"]:
        lines.append(f"| {r['clients']} | {r['completed']} | {r['refused']} | {r['failed']} "
                     f"| {r['requests_per_s']} | {r['tokens_per_s']} "
                     f"| {r['decode_tokens_per_s']} | {r['ttft_p50_s']} "
                     f"| {r['ttft_p95_s']} | {r['latency_p50_s']} |")
    return "\n".join(lines)
