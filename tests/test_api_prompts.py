"""Long prompts and clip_skip over HTTP: the field is validated at submit (bounds, and the
model's published text_layers); prompts over 75 tokens are accepted and run whole; the
native job, its PNG infotext and AUTOMATIC1111's `CLIP_stop_at_last_layers` override agree
with `generate()`."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model import load_pipeline
from service.compat.a1111_requests import txt2img_fields
from tests.apps import AppClientFactory, post_job
from tests.conftest import LIVE_KEYS
from tests.test_api_capabilities import DEMO_CAPS, queued_jobs, with_caps

LONG = ", ".join(f"(word{i}:1.2) tree" for i in range(30)) + " BREAK [misty] hills"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("clip_skip", "code"),
    [(0, "validation_error"), (13, "validation_error"), ("2", "validation_error"),
     (1.5, "validation_error"), (DEMO_CAPS.text_layers + 1, "unsupported")],
)  # fmt: skip
async def test_bad_clip_skip_is_a_422_naming_the_field(
    app_client_factory: AppClientFactory, clip_skip: Any, code: str
) -> None:
    client, app = await with_caps(app_client_factory)
    r = await post_job(client, clip_skip=clip_skip)
    assert r.status_code == 422, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["field"]) == (code, "clip_skip")
    assert await queued_jobs(app) == 0


@pytest.mark.anyio
async def test_long_prompt_and_clip_skip_are_accepted_and_kept(
    app_client_factory: AppClientFactory,
) -> None:
    client, _app = await with_caps(app_client_factory, max_prompt_chars=2000)
    assert len(LONG) > 75 * 4  # far more than one 77-token window
    r = await post_job(client, prompt=LONG, negative_prompt=LONG, clip_skip=2)
    assert r.status_code == 202, r.text
    params = (await client.get(r.json()["links"]["self"])).json()["parameters"]
    assert params["prompt"] == LONG and params["clip_skip"] == 2
    # The length limit stays a setting: characters, checked at submit.
    client, _app = await with_caps(app_client_factory, max_prompt_chars=100)
    r = await post_job(client, prompt=LONG)
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompt", r.text
    spec = (await client.get("/openapi.json")).json()
    field = spec["components"]["schemas"]["JobRequest"]["properties"]["clip_skip"]
    assert "penultimate" in field["description"]


@pytest.mark.anyio
async def test_a1111_override_maps_to_clip_skip() -> None:
    overrides = {"sd_model_checkpoint": "demo", "CLIP_stop_at_last_layers": 2, "eta_noise": 1}
    body = {"prompt": "x", "override_settings": overrides}
    fields, ignored = await txt2img_fields(None, body)  # type: ignore[arg-type]  # no Redis needed
    assert fields["clip_skip"] == 2 and fields["model"] == "demo"
    assert ignored == ["override_settings.eta_noise"]


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.slow
def test_long_prompt_with_clip_skip_over_http_equals_generate(live_stack: Any) -> None:
    headers = {"Authorization": f"Bearer {LIVE_KEYS['other']}", "Prefer": "wait=120"}
    body = {"prompt": LONG, "negative_prompt": "(blurry:1.3)", "width": 64, "height": 64,
            "steps": 4, "seed": 31, "clip_skip": 2}  # fmt: skip
    with httpx.Client(base_url=live_stack.base, headers=headers, timeout=150) as client:
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["status"] == "succeeded", view
        png = client.get(view["images"][0]["url"]).content
        a1111 = client.post("/sdapi/v1/txt2img", json={
            "prompt": LONG, "negative_prompt": "(blurry:1.3)", "width": 64, "height": 64,
            "steps": 4, "seed": 31, "cfg_scale": 7.5, "sampler_name": "Euler a",
            "override_settings": {"CLIP_stop_at_last_layers": 2},
        })  # fmt: skip
        assert a1111.status_code == 200, a1111.text
    assert "Clip skip: 2" in Image.open(io.BytesIO(png)).info["parameters"]
    expected = np.asarray(
        load_pipeline("demo", device="cpu").generate(
            LONG, negative_prompt="(blurry:1.3)", width=64, height=64, steps=4, seed=31,
            clip_skip=2,
        )[0]
    )  # fmt: skip
    got = png_pixels(png)
    assert int(np.abs(got.astype(int) - expected.astype(int)).max()) <= 2
    result = a1111.json()
    info = json.loads(result["info"])
    assert info["clip_skip"] == 2
    assert not any("CLIP_stop" in f for f in info["ldmserve_ignored_fields"])
    assert np.array_equal(png_pixels(base64.b64decode(result["images"][0])), got)
