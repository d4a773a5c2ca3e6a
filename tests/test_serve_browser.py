"""The search page in a real browser: Debian's chromium, headless, driven by Playwright.

No browser download: the system chromium (``/usr/bin/chromium``; ``make test`` installs it with
apt when missing) is launched directly. A real uvicorn server serves a small demo index on
127.0.0.1; the test uploads a demo query, draws its box on the photo, waits for the grids and
checks the first result and the rank changes, then saves a screenshot.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest
import uvicorn
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from locore.benchmarks.datasets.demo import DemoSpec, generate
from locore.core import config as cfg
from locore.engine.config import PipelineConfig
from locore.engine.evaluate import load_gnd
from locore.engine.pipeline import build_index
from locore.serve.app import create_app
from locore.serve.service import SearchService, ServeConfig

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SPEC = DemoSpec(easy=1, hard=1, junk=0, queries=1, train_views=1, distractors=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, collection) of a live server over a small demo index."""
    root = tmp_path_factory.mktemp("browser")
    collection = generate(root / "collection", SPEC)
    config = cfg.load(PipelineConfig, "demo", ["extractor.options.imsize=256"])
    build_index(collection / "jpg", root / "index", config)
    service = SearchService(root / "index", [], ServeConfig(reload_interval_s=60))
    service.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(service)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", collection
    uv.should_exit = True
    thread.join(30)
    service.close()


def test_page_searches_a_dropped_photo_with_a_box(server, tmp_path):
    url, collection = server
    gt = load_gnd(collection / "gnd_demo.pkl")
    name, box = gt["qimlist"][0], gt["gnd"][0]["bbx"]
    scene = name.removeprefix("query_")[:-1]
    query = collection / "queries" / f"{name}.jpg"
    with Image.open(query) as img:
        width, height = img.size
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            expect(page.locator("#stats")).to_contain_text("efficientnet_lite0")
            page.set_input_files("#file", str(query))
            canvas = page.locator("#canvas")
            expect(canvas).to_be_visible()
            # draw the query's box: image pixels -> page coordinates of the scaled canvas
            rect = canvas.bounding_box()
            sx, sy = rect["width"] / width, rect["height"] / height
            page.mouse.move(rect["x"] + box[0] * sx, rect["y"] + box[1] * sy)
            page.mouse.down()
            page.mouse.move(rect["x"] + box[2] * sx, rect["y"] + box[3] * sy, steps=5)
            page.mouse.up()
            drawn = [float(v) for v in page.inner_text("#box-text").split()[1].split(",")]
            assert drawn == pytest.approx(box, abs=2.0 / min(sx, sy) + 1)
            page.click("#go")
            first = page.locator("#after li").first
            expect(first).to_be_visible(timeout=60_000)
            assert page.locator("#after li").count() == page.locator("#before li").count() > 1
            assert first.locator(".name").inner_text().startswith(f"1. {scene}_")
            assert first.locator("a").get_attribute("href").startswith("/image/")
            # every re-ranked card shows its rank change; at least one image moved
            changes = page.locator("#after li .up, #after li .down, #after li .same")
            assert changes.count() == page.locator("#after li").count()
            assert page.locator("#after li .up").count() >= 1
            expect(page.locator("#status")).to_contain_text("ms")
            shot = page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
        finally:
            browser.close()
    with Image.open(tmp_path / "serve.png") as img:
        assert img.size[0] == 1280 and len(shot) > 10_000
