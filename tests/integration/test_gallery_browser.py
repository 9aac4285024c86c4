"""The ``maskray show --results`` gallery in a real browser: headless Chromium (OS package
``chromium``; skipped where there is none) opens ``file://.../index.html``; every ``<img>`` must
have decoded (``naturalWidth > 0``) and the console must show no error (Chrome DevTools protocol
over aiohttp's websocket client: console errors, uncaught exceptions, failed loads). A screenshot
from ``chromium --screenshot`` must be a real PNG."""

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.instances import encode_masks
from pipeline.results import RESULT_SCHEMA
from pipeline.show.gallery import build_gallery

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium on PATH (apt-get install -y chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--hide-scrollbars"]
IMAGES_JS = ("Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete, "
             "width: i.naturalWidth}))")


def _png(width, height, seed):
    pixels = np.full((height, width, 3), 40 + 30 * seed, np.uint8)
    pixels[height // 4: height // 2, width // 4: width // 2] = 230
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A gallery of a raw-files run: 3 images drawn, one image missing, one error row."""
    root = tmp_path_factory.mktemp("gallery")
    images = root / "images"
    images.mkdir()
    rows = []
    for k, name in enumerate(["a.png", "b.png", "c.png", "gone.png"]):
        if name != "gone.png":
            (images / name).write_bytes(_png(96, 64, k))
        mask = np.zeros((1, 64, 96), bool)
        mask[0, 16:32, 24:48] = True
        rle = encode_masks(mask)[0]
        rows.append({"image_id": k, "file_name": str(images / name), "error": None, "model": "m", "instances": [
            {"category_id": 1, "score": 0.9, "bbox": [24, 16, 24, 16],
             "segmentation": {"size": rle["size"], "counts": rle["counts"].encode()}}]})
    rows.append({"image_id": 9, "file_name": str(images / "bad.png"), "error": "decode failed: junk", "model": "m",
                 "instances": []})
    results = root / "results"
    results.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), results / "files-0000000-0000005.parquet")
    (results / "provenance.json").write_text(json.dumps({
        "format": "maskray-results/2", "model": "sha256:0", "input": {"uri": str(images), "kind": "files"},
        "options": {"category_ids": [1]}, "categories": [{"id": 1, "name": "box"}]}))
    summary = build_gallery(str(results), str(root / "out"), long_side=200)
    assert summary.shown == 4 and summary.missing == 1
    return Path(summary.page)


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM to the browser's whole session, then SIGKILL after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


def _remove_profile(path: str, timeout: float = 10.0) -> None:
    """Remove the browser's profile folder; a helper process still exiting may write one last file
    into it (``Directory not empty: 'Default'``), so retry for ``timeout`` seconds, then raise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _devtools_load(url: str, timeout: float = 60.0) -> tuple[list[dict], list[str]]:
    """Open ``url`` in a fresh headless Chromium; returns ``(every <img>'s src/complete/naturalWidth,
    error lines: console errors, uncaught exceptions, log entries of level error)``."""
    aiohttp = pytest.importorskip("aiohttp")
    profile = tempfile.mkdtemp(prefix="maskray-chromium-")
    # its own session: the browser's helper processes (renderer, GPU, crashpad) are stopped with it
    proc = subprocess.Popen([BROWSER, *FLAGS, "--remote-debugging-port=0", "--remote-allow-origins=*",
                             f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start its DevTools"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")

        async def session():
            async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
                events, counter = [], iter(range(1, 10**6))

                async def call(method, **params):
                    number = next(counter)
                    await ws.send_json({"id": number, "method": method, "params": params})
                    while True:
                        message = await ws.receive_json()
                        if message.get("id") == number:
                            assert "error" not in message, message
                            return message.get("result", {})
                        events.append(message)

                for method in ("Page.enable", "Runtime.enable", "Log.enable"):
                    await call(method)
                await call("Page.navigate", url=url)
                while not any(e.get("method") == "Page.loadEventFired" for e in events):
                    events.append(await ws.receive_json())
                await asyncio.sleep(0.3)  # late console messages
                images = await call("Runtime.evaluate", expression=IMAGES_JS, returnByValue=True)
                return images["result"]["value"], events

        images, events = asyncio.run(asyncio.wait_for(session(), timeout))
    finally:
        _stop_session(proc)
        _remove_profile(profile)
    errors = []
    for e in events:
        params = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif e.get("method") == "Runtime.exceptionThrown":
            errors.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif e.get("method") == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    return images, errors


def test_every_image_renders_and_the_console_is_clean(page):
    images, errors = _devtools_load(page.as_uri())
    assert len(images) == 3  # the missing image is a marked entry, not a broken <img>
    assert all(i["complete"] and i["width"] > 0 for i in images), images
    assert errors == []


def test_the_check_catches_a_broken_image_and_a_console_error(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="nope.jpg"><script>console.error("boom")</script>'
                   "</body></html>")
    images, errors = _devtools_load(bad.as_uri())
    assert images[0]["width"] == 0
    assert any("boom" in e for e in errors) and any("nope.jpg" in e or "ERR_FILE_NOT_FOUND" in e for e in errors)


def test_screenshot_is_a_png(page, tmp_path):
    shot = tmp_path / "page.png"
    profile = tempfile.mkdtemp(prefix="maskray-chromium-")
    try:
        subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                        "--window-size=1200,1600", page.as_uri()], check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        _remove_profile(profile)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[:2] == (1600, 1200) and picture.std() > 5  # drawn, not a blank page
