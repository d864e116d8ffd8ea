"""The triage page in Debian's headless Chromium, against a real server on 127.0.0.1.

Set ``PNEUMOSCAN_SCREENSHOT=/some/file.png`` to also keep the page's screenshot there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pneumoscan.constants import DEFAULT_ONNX_PATH
from pneumoscan.inference.scorer import read_onnx_metadata
from pneumoscan.serve.app import Engine, create_app

from conftest import CHROMIUM, CHROMIUM_ARGS, fixture_images

if TYPE_CHECKING:
    from playwright.sync_api import Page


pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}"),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="needs the playwright package (pip install -e '.[test]')",
    ),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """uvicorn serving the app on a free loopback port, in a thread; its base URL."""
    import uvicorn

    engine = Engine.load()
    port = free_port()
    config = uvicorn.Config(
        create_app(engine=engine), host="127.0.0.1", port=port, log_level="warning"
    )
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)
    engine.close()


def test_page_triages_two_xrays_with_bars_and_heatmaps(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    normal, pneumonia = fixture_images("NORMAL")[0], fixture_images("PNEUMONIA")[0]
    requested: list[str] = []
    screenshot = tmp_path / "serve_page.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(server + "/")
            page.wait_for_selector("#model:has-text('threshold')")
            # The normal X-ray goes first; the worklist must still put the pneumonia first.
            page.set_input_files("#files", [str(normal), str(pneumonia)])
            page.wait_for_selector("#worklist > li.result >> nth=1", timeout=60_000)
            items = page.locator("#worklist > li.result")
            names = items.locator(".filename").all_inner_texts()
            decisions = items.locator(".decision").all_inner_texts()
            widths = page.eval_on_selector_all(
                "#worklist .fill", "els => els.map(e => e.getBoundingClientRect().width)"
            )
            marks = page.eval_on_selector_all(
                "#worklist .threshold-mark", "els => els.map(e => e.style.left)"
            )
            meters = items.locator("[role=meter]")
            values = [float(meters.nth(i).get_attribute("aria-valuenow") or "nan") for i in (0, 1)]
            toggles = items.locator(".heatmap-toggle")
            assert toggles.count() == 2 and toggles.nth(0).is_visible()
            picture = items.nth(0).locator(".picture")
            before = picture.get_attribute("src")
            toggles.nth(0).check()
            after = picture.get_attribute("src")
            page.wait_for_function(
                "() => document.querySelector('#worklist .picture').naturalWidth > 0"
            )
            page.screenshot(path=str(screenshot), full_page=True)
            docs_title = _docs_title(page, server)
        finally:
            browser.close()
    keep = os.environ.get("PNEUMOSCAN_SCREENSHOT")
    if keep:
        shutil.copyfile(screenshot, keep)
    print(f"screenshot: {screenshot}" + (f" (copied to {keep})" if keep else ""))
    assert names == [pneumonia.name, normal.name]
    assert decisions == ["Pneumonia suspected — review first", "No pneumonia detected"]
    assert values[0] > 0.5 > values[1]
    # Each bar is marked at the threshold of the model that scored it: the service, like
    # `pneumoscan predict`, scores on the shipped model's int8 export.
    threshold = 100 * read_onnx_metadata(DEFAULT_ONNX_PATH)["threshold"]
    assert widths[0] > 0
    assert [float(m.rstrip("%")) for m in marks] == pytest.approx([threshold] * 2, abs=0.01)
    assert before != after and after is not None and after.startswith("data:image/png;base64,")
    assert "pneumoscan" in docs_title
    # Everything came from this server (or was inline data): no CDN, no outside fonts.
    outside = [u for u in requested if not u.startswith((server, "data:"))]
    assert outside == []
    assert screenshot.stat().st_size > 10_000


def _docs_title(page: Page, server: str) -> str:
    """Open /docs in the same browser and return the rendered Swagger UI title."""
    page.goto(server + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    return page.inner_text(".swagger-ui .info .title")
