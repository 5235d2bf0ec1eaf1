"""OpenAI Images compatibility, driven by the real ``openai`` SDK against real processes
(redis-server, ``ldmserve api`` under uvicorn, a demo worker), plus error shapes that need
settings of their own, checked over ASGI against a real Redis."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.apps import AppClientFactory
from tests.conftest import LIVE_KEYS
from tests.tiny import demo_solo, max_pixel_diff

SMALL = {"steps": 2, "guidance_scale": 1.0}


@pytest.fixture
def client(live_stack: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_stack.base}/v1", api_key=LIVE_KEYS["openai"])


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.slow
def test_b64_json_with_n_images_and_native_extras(client: openai.OpenAI) -> None:
    result = client.images.generate(
        prompt="a lighthouse at dusk",
        model="gpt-image-1",  # an OpenAI model name means this server's default model
        n=2,
        size="64x96",
        extra_body={**SMALL, "seed": 5, "negative_prompt": "fog", "sampler": "dpmpp_2m_karras"},
    )
    assert result.size == "64x96" and result.output_format == "png"
    assert result.data is not None and len(result.data) == 2
    images = [png(base64.b64decode(d.b64_json or "")) for d in result.data]
    assert [im.size for im in images] == [(64, 96), (64, 96)]
    assert result.data[0].revised_prompt == "a lighthouse at dusk"
    params = [im.info["parameters"] for im in images]  # A1111's PNG text chunk
    assert params[0].startswith("a lighthouse at dusk\nNegative prompt: fog\nSteps: 2, ")
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in params[0]
    assert "Seed: 5," in params[0] and "Seed: 6," in params[1] and "Size: 64x96" in params[1]
    expected = demo_solo(prompt="a lighthouse at dusk", negative_prompt="fog", seed=5,
                         num_images=2, width=64, height=96, sampler="dpmpp_2m_karras", **SMALL)  # fmt: skip
    assert max_pixel_diff(images, expected) <= 2  # the native pipeline's pixels


@pytest.mark.slow
def test_url_response_links_the_jobs_image(client: openai.OpenAI, live_stack: Any) -> None:
    result = client.images.generate(
        prompt="a red fox",
        size="64x64",
        response_format="url",
        output_format="jpeg",
        extra_body=SMALL,
    )
    assert result.data is not None and result.output_format == "jpeg"
    url = result.data[0].url or ""
    assert url.startswith(f"{live_stack.base}/v1/jobs/") and url.endswith("/images/0")
    r = httpx.get(url, headers={"Authorization": f"Bearer {LIVE_KEYS['openai']}"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert png(r.content).size == (64, 64)
    assert httpx.get(url).status_code == 401  # the link needs the caller's key


@pytest.mark.slow
def test_streaming_sends_completed_events(client: openai.OpenAI) -> None:
    stream = client.images.generate(
        prompt="rain on glass", size="64x64", stream=True, n=2, extra_body=SMALL
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert all(png(base64.b64decode(e.b64_json)).size == (64, 64) for e in events)


@pytest.mark.slow
def test_streaming_partial_images_are_the_live_previews(client: openai.OpenAI) -> None:
    # A slow: prompt takes 0.25 s per step (tests/fault_worker.py); previews come after
    # evaluations 5 and 10 of 12; two partial images are due at 1/3 and 2/3 of the run.
    stream = client.images.generate(
        prompt="slow: rain on glass", size="64x96", stream=True, partial_images=2,
        extra_body={"steps": 12, "guidance_scale": 1.0},
    )  # fmt: skip
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert [e.partial_image_index for e in partial] == [0, 1]
    assert all(png(base64.b64decode(e.b64_json)).size == (8, 12) for e in partial)
    assert partial[0].size == "8x12" and partial[0].b64_json != partial[1].b64_json
    assert png(base64.b64decode(events[-1].b64_json)).size == (64, 96)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "64"}, "size"),
        ({"size": "60x64"}, "size"),  # not a multiple of 8
        ({"size": "64x99999"}, "size"),
        ({"n": 11}, "n"),
        ({"n": 9}, "n"),  # within OpenAI's 1-10, beyond LDMSERVE_MAX_NUM_IMAGES (8)
        ({"extra_body": {"guidance": 3}}, "guidance"),  # unknown: refused, not ignored
        ({"extra_body": {"steps": 0}}, "steps"),
        ({"output_format": "gif"}, "output_format"),
    ],
)
def test_invalid_requests_raise_bad_request(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a fox", **kwargs)
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    assert body["type"] == "invalid_request_error" and "num_images" not in body["message"]


@pytest.mark.slow
def test_unknown_model_and_bad_key(client: openai.OpenAI, live_stack: Any) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.images.generate(prompt="a fox", model="sdxl-nonexistent", size="64x64")
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "model_not_found"
    bad = openai.OpenAI(base_url=f"{live_stack.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="a fox", size="64x64")


def _png_bytes(image: Image.Image | None = None) -> bytes:
    buf = io.BytesIO()
    (image or Image.new("RGB", (64, 64), "gray")).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_edits_with_a_mask(client: openai.OpenAI) -> None:
    """Inpainting through the SDK's multipart upload (transparent mask pixels = repaint)."""
    mask_image = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask_image.paste((0, 0, 0, 0), (0, 0, 32, 64))  # transparent left half: repaint it
    image = ("in.png", _png_bytes(), "image/png")
    mask = ("mask.png", _png_bytes(mask_image), "image/png")
    result = client.images.edit(
        image=image, mask=mask, prompt="a hat", size="64x64", n=2,
        extra_body={"steps": 2, "strength": 0.5, "seed": 3},
    )  # fmt: skip
    assert result.data is not None and len(result.data) == 2
    images = [png(base64.b64decode(d.b64_json or "")) for d in result.data]
    assert all(im.size == (64, 64) for im in images)
    assert "Denoising strength: 0.5" in images[0].info["parameters"]
    repaint = Image.new("L", (64, 64), 0)
    repaint.paste(255, (0, 0, 32, 64))  # the native mask: white = repaint
    expected = demo_solo(prompt="a hat", image=Image.new("RGB", (64, 64), "gray"), mask=repaint,
                         width=64, height=64, num_images=2, steps=2, strength=0.5, seed=3)  # fmt: skip
    assert max_pixel_diff(images, expected) <= 2
    with pytest.raises(openai.BadRequestError) as err:  # OpenAI masks need alpha
        client.images.edit(image=image, mask=("m.png", _png_bytes(), "image/png"), prompt="x")
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "mask"


@pytest.mark.anyio
async def test_wait_bound_names_the_job_and_429_has_retry_after(
    app_client_factory: AppClientFactory,
) -> None:
    """No worker: the bounded wait ends in 504 naming the job, marked not to be retried
    (the SDK would queue the prompt again); then the rate limit answers in OpenAI's shape."""
    client, _ = await app_client_factory(
        compat_wait_s=0.3, rate_limit_per_min=1, rate_limit_burst=1
    )
    body = {"prompt": "a fox", "size": "64x64"}
    r = await client.post("/v1/images/generations", json=body)
    assert r.status_code == 504, r.text
    job_id = r.headers["X-Ldmserve-Job"]
    error = r.json()["error"]
    assert job_id in error["message"] and error["code"] == "timeout"
    assert r.headers["x-should-retry"] == "false"
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "queued"
    r = await client.post("/v1/images/generations", json=body)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = await client.post("/v1/images/generations", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = await client.post("/v1/images/generations", json={"size": "64x64"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
