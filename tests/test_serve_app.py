"""The HTTP layer in this process (no socket, no model): while the model loads, /health and
chat completions say 503 with Retry-After, and the page and its tile preview already work
(the processor alone knows the tiles and tokens)."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest

from helpers import png
from tilevlm import preset
from tilevlm.preprocessing.processor import Processor, count_image_tokens
from tilevlm.serving.app import ServerState, create_app
from tilevlm.serving.settings import ServeSettings


@pytest.fixture
def loading_app(tiny_tokenizer):
    cfg = preset("tiny", lm_base_vocab_size=tiny_tokenizer.base_vocab_size)
    state = ServerState(ServeSettings(model_name="m", retry_after=3),
                        Processor(cfg, tiny_tokenizer))
    return create_app(state), state


def _run(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


def test_while_loading_health_and_completions_are_503_with_retry_after(loading_app):
    app, _ = loading_app
    health = _run(app, "GET", "/health")
    assert health.status_code == 503 and health.json() == {"status": "loading"}
    assert health.headers["Retry-After"] == "3"
    chat = _run(app, "POST", "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 503 and chat.headers["Retry-After"] == "3"
    assert chat.json()["error"]["code"] == "loading"


def test_the_page_and_the_tile_preview_work_before_the_model(loading_app):
    app, state = loading_app
    page = _run(app, "GET", "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="tile-info"' in page.text
    url = "data:image/png;base64," + base64.b64encode(png(80, 50)).decode()
    tiles = _run(app, "POST", "/v1/tiles", json={"image_url": {"url": url}})
    assert tiles.status_code == 200, tiles.text
    body = tiles.json()
    assert body["grid"] == [2, 3] and body["tiles"] == 7 and body["resized"] == [96, 64]
    assert body["labels"][1][2] == "<row_2_col_3>" and body["global_tile"] == "<|global_image|>"
    assert body["image_tokens"] == count_image_tokens(80, 50, state.processor.config) == 7 * 4
    bad = _run(app, "POST", "/v1/tiles", json={"image_url": {"url": "https://example.com/a.png"}})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "remote_url_refused"


@pytest.mark.parametrize("field, value", [("max_batch", 0), ("max_queue", -1), ("port", 70000),
                                          ("max_context", 1), ("api_key", " ")])
def test_settings_refuse_impossible_limits(field, value):
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        ServeSettings(**{field: value})
