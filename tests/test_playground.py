"""The playground at ``/`` in a real headless Chromium (Debian's ``chromium``, driven by
playwright through ``executable_path``; ``playwright install`` is never run) against real
processes: redis-server, ``ldmserve api``, a demo worker (``slow:`` prompts take 0.25 s per
step so that progress and cancel can be watched). .ci/run installs the browser."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import LIVE_KEYS

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
KEY = LIVE_KEYS["browser"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), (
        "chromium missing: apt-get install -y chromium (scripts/install_browser.sh)"
    )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, live_stack: Any) -> Iterator[Any]:
    # Playwright's string predicates are eval'd in the page, which the page's CSP forbids.
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    page.requests = []  # type: ignore[attr-defined]
    page.on("request", lambda r: page.requests.append(r.url))  # type: ignore[attr-defined]
    page.goto(live_stack.base + "/")
    try:
        yield page
    finally:
        context.close()


def sign_in(page: Any) -> None:
    page.fill("#api-key", KEY)
    page.locator("#api-key").dispatch_event("change")
    page.wait_for_function("document.querySelector('#model').options.length > 0")


def fill(page: Any, prompt: str, steps: int) -> None:
    page.fill("#prompt", prompt)
    for field, value in (("#width", "64"), ("#height", "64"), ("#guidance", "1")):
        page.fill(field, value)
    page.fill("#steps", str(steps))


def test_txt2img_shows_progress_then_the_image(page: Any, live_stack: Any, tmp_path: Path) -> None:
    page.wait_for_function("document.querySelector('#status').textContent.length > 0")
    assert "API key" in page.text_content("#status")  # auth is on: the page asks for the key
    sign_in(page)
    assert page.eval_on_selector("#model", "s => s.value") == "demo"
    assert "euler_a" in page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)")
    fill(page, "slow: a lighthouse", steps=6)
    page.fill("#seed", "11")
    page.click("#generate")
    page.wait_for_selector("#images img", timeout=120_000)
    assert page.evaluate("window.ldmserve.progressEvents") >= 1
    assert page.evaluate("window.ldmserve.previewEvents") == 1  # after evaluation 5 of 6
    assert not page.is_visible("#preview")  # the final image replaces the live preview
    assert page.eval_on_selector("#progress", "p => p.value === p.max")
    page.wait_for_function("document.querySelector('#images img').naturalWidth > 0")
    sizes = page.eval_on_selector_all(
        "#images img", "is => is.map(i => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [[64, 64]]
    assert page.get_attribute("#images img", "data-seed") == "11"
    assert "succeeded" in page.text_content("#status")
    assert page.locator("#history li").count() == 1
    page.screenshot(path=str(tmp_path / "txt2img.png"))
    csp = httpx.get(live_stack.base + "/").headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'self'")
    assert all(url.startswith(live_stack.base) or url.startswith("blob:") for url in page.requests)


def test_cancel_stops_the_running_job(page: Any, live_stack: Any, tmp_path: Path) -> None:
    sign_in(page)
    fill(page, "slow: a castle", steps=60)
    page.click("#generate")
    page.wait_for_function("window.ldmserve.previewEvents >= 1", timeout=120_000)
    page.wait_for_function("document.querySelector('#preview').naturalWidth > 0")
    assert page.is_visible("#preview")
    assert page.eval_on_selector("#preview", "i => [i.naturalWidth, i.naturalHeight]") == [8, 8]
    page.screenshot(path=str(tmp_path / "live-preview.png"))
    job_id = page.evaluate("window.ldmserve.job.id")
    page.click("#cancel")
    page.wait_for_function(
        "document.querySelector('#status').textContent.includes('canceled')", timeout=60_000
    )
    assert page.locator("#images img").count() == 0
    r = httpx.get(f"{live_stack.base}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"})
    assert r.json()["status"] == "canceled"
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")


def test_inpainting_with_a_painted_mask(page: Any, live_stack: Any, tmp_path: Path) -> None:
    """Upload + brush appear when the server's JobRequest takes input images; the job then
    carries the picture and a mask painted white where the brush went."""
    sign_in(page)
    page.wait_for_function("window.ldmserve.imageInputChecked === true")
    assert page.locator("#image-input").is_visible()
    page.click("#image-input summary")
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "gray").save(picture)
    page.set_input_files("#init-image", str(picture))
    page.wait_for_function("document.querySelector('#mask-canvas').width === 64")
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + 4, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 4, box["y"] + box["height"] / 2, steps=40)
    page.mouse.up()
    assert page.evaluate("window.ldmserve.input.painted")
    page.screenshot(path=str(tmp_path / "inpaint.png"))
    fill(page, "a hat", steps=2)
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as req:
        page.click("#generate")
    body = json.loads(req.value.post_data or "{}")
    assert body["image"].startswith("data:image/png;base64,") and body["strength"] == 0.75
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].split(",", 1)[1]))).convert("L")
    # painted (repaint: >= 50% white, as the mask is binarised) / not painted
    assert mask.getpixel((8, 32)) >= 128 and mask.getpixel((60, 32)) == 0
    page.wait_for_selector("#images img", timeout=120_000)
    assert "succeeded" in page.text_content("#status")
