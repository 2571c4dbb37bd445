"""The page at `/` in a real headless browser (Debian's chromium through chromium-driver and
Selenium; nothing is downloaded), driving the real server: pick an image, see its tiles, grid
labels and token count before anything runs, ask, and watch the streamed answer arrive; the
answer is the API's own for the same request."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import pytest

from helpers import make_photo, start_server
from tilevlm.preprocessing.processor import count_image_tokens
from tilevlm.weights.loading import load_processor

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Flags that keep Chromium off the network and out of the way here.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1100,1000"]
QUESTION = "What colour is the shape?"


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, DRIVER) if not shutil.which(p)]
    if missing and os.environ.get("CI"):  # CI installs them (.ci/run): missing is a failure
        pytest.fail(f"missing {missing}: apt-get install chromium chromium-driver")
    if missing:
        pytest.skip(f"missing {missing}: apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("page_log") / "serve.log"
    running = start_server(log, "--model", str(model_dir), "--threads", "1")
    yield running
    code, text = running.stop()
    assert code == 0 and "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _browser_or_skip()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never look anything up
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(browser, script: str, timeout: float = 60):
    """Wait until the JavaScript expression `script` is truthy; return its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script(f"return {script};"))


def test_the_page_shows_the_tiles_then_streams_the_answer(server, browser, model_dir,
                                                          tmp_path):
    image = tmp_path / "photo.png"
    make_photo(80, 50, seed=5).save(image)
    processor = load_processor(model_dir)
    tokens = count_image_tokens(80, 50, processor.config)

    browser.get(server.url + "/")
    _wait(browser, "document.getElementById('status').textContent.startsWith('ready')")
    browser.find_element("id", "image").send_keys(str(image))
    info = _wait(browser, "document.getElementById('tile-info').dataset.tiles && "
                          "document.getElementById('tile-info').textContent")
    assert info == f"grid 2 x 3 · 7 tiles · {tokens} image tokens"
    assert browser.execute_script("return document.getElementById('grid').width") > 0
    assert browser.execute_script("return document.getElementById('global').width") > 0
    assert "global tile" in browser.find_element("id", "global-caption").text
    browser.save_screenshot(str(tmp_path / "tiles.png"))

    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(QUESTION)
    max_tokens = browser.find_element("id", "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("10")
    browser.find_element("id", "ask").click()
    _wait(browser, "document.getElementById('answer').dataset.done === 'true'")
    shown = browser.execute_script("return document.getElementById('answer').textContent")
    assert "error" not in browser.execute_script(
        "return document.getElementById('answer').className")

    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    api = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": Path(model_dir).name, "max_tokens": 10, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": QUESTION}]}]}).json()
    assert shown == api["choices"][0]["message"]["content"]
    usage = browser.find_element("id", "usage").text
    assert f"({tokens} image, 7 tiles)" in usage
    assert f"answer {api['usage']['completion_tokens']} tokens" in usage


def test_the_page_shows_a_refused_image(server, browser, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    browser.get(server.url + "/")
    browser.find_element("id", "image").send_keys(str(bad))
    _wait(browser, "document.getElementById('tile-info').className === 'error'")
    assert browser.find_element("id", "tile-info").text
