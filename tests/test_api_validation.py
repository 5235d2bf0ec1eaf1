"""Input validation through the real FastAPI app: every bad request is a JSON 4xx naming the
field, never a 5xx; limits come from settings and are published in the OpenAPI schema."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.api import create_app
from service.settings import Settings
from tests.apps import AppClientFactory, post_job

pytestmark = pytest.mark.anyio
Client = httpx.AsyncClient


@pytest.fixture
async def api(app_client_factory: AppClientFactory) -> tuple[Client, FastAPI]:
    return await app_client_factory()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"width": 500}, "width"),
        ({"height": 4096}, "height"),
        ({"width": 32}, "width"),
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"guidance_scale": 31}, "guidance_scale"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"num_images": 9}, "num_images"),
        ({"num_images": 0}, "num_images"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "nul\x00byte"}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"sampler": "plms"}, "sampler"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"seed": 10**40}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"width": "512"}, "width"),
        ({"output_format": "gif"}, "output_format"),
        ({"model": "sdxl"}, "model"),
        ({"guidance": 7}, "guidance"),
        ({"steps": True}, "steps"),
    ],
)
async def test_validation_errors_name_the_field(
    api: tuple[Client, FastAPI], body: dict[str, Any], field: str
) -> None:
    client, _ = api
    r = await client.post("/v1/jobs", json={"prompt": "ok", **body})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and error["code"] and error["message"]


async def test_limits_come_from_settings(app_client_factory: AppClientFactory) -> None:
    client, _ = await app_client_factory(max_side=1024, max_steps=20, max_num_images=2)
    assert (await post_job(client, width=1536)).json()["error"]["field"] == "width"
    assert (await post_job(client, steps=25)).json()["error"]["field"] == "steps"
    assert (await post_job(client, num_images=3)).status_code == 422
    assert (await post_job(client, steps=20, num_images=2, width=1024)).status_code == 202


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"prompt": "a', {"content-type": "application/json"}),
        (b'{"prompt": "\xff\xfe"}', {"content-type": "application/json"}),
        (b'{"prompt": "a", "guidance_scale": NaN}', {"content-type": "application/json"}),
        (b'{"prompt": "a", "guidance_scale": Infinity}', {"content-type": "application/json"}),
        (b"[1, 2]", {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"prompt=a", {"content-type": "application/x-www-form-urlencoded"}),
    ],
)
async def test_malformed_bodies_are_4xx(
    api: tuple[Client, FastAPI], content: bytes, headers: dict[str, str]
) -> None:
    client, _ = api
    r = await client.post("/v1/jobs", content=content, headers=headers)
    # Invalid UTF-8 is malformed JSON too: the same documented 422 as bad syntax.
    assert r.status_code == 422, r.text
    assert set(r.json()["error"]) >= {"code", "message", "field"}


async def test_body_over_the_limit_is_413(api: tuple[Client, FastAPI]) -> None:
    client, _ = api
    r = await post_job(client, prompt="x" * 100_000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: streamed body
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = await client.post("/v1/jobs", content=chunks())
    assert r.status_code == 413, r.text


async def test_unknown_route_and_method_are_json(api: tuple[Client, FastAPI]) -> None:
    client, _ = api
    r = await client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.put("/v1/jobs")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDMSERVE_MAX_QUEUE", "5")
    monkeypatch.setenv("LDMSERVE_RECLAIM_AFTER_S", "12.5")
    monkeypatch.setenv("LDMSERVE_CORS_ORIGINS", '["https://a.example"]')
    monkeypatch.setenv("LDMSERVE_REDIS_URL", "redis://r:6379/1")
    s = Settings()
    assert (s.max_queue, s.reclaim_after_s, s.redis_url) == (5, 12.5, "redis://r:6379/1")
    assert s.cors_origins == ["https://a.example"]
    assert (Settings(max_queue=9).max_queue, Settings().max_attempts) == (9, 3)
    with pytest.raises(ValueError, match="min_side"):
        Settings(min_side=512, max_side=256)


_J = {"content-type": "application/json"}
# (name, raw body, expected status, expected error field or None): each answer is a JSON
# error, never a 5xx. Complements the field table above with the raw-bytes cases.
BAD_INPUT = [
    ("malformed_json", b'{"prompt": "a', 422, None),
    ("trailing_garbage", b'{"prompt": "a"} x', 422, None),
    ("body_is_array", b"[1, 2]", 422, None),
    ("body_is_string", b'"a cat"', 422, None),
    ("body_is_null", b"null", 422, None),
    ("empty_body", b"", 422, None),
    ("invalid_utf8", b'{"prompt": "\xff\xfe"}', 422, "body"),
    ("nan", b'{"prompt": "a", "guidance_scale": NaN}', 422, None),
    ("infinity", b'{"prompt": "a", "guidance_scale": Infinity}', 422, None),
    ("minus_infinity", b'{"prompt": "a", "guidance_scale": -Infinity}', 422, None),
    ("float_overflow", b'{"prompt": "a", "guidance_scale": 1e400}', 422, "guidance_scale"),
    ("huge_float", b'{"prompt": "a", "guidance_scale": 1e308}', 422, "guidance_scale"),
    ("huge_int_width", b'{"prompt": "a", "width": 1' + b"0" * 30 + b"}", 422, "width"),
    ("huge_int_steps", b'{"prompt": "a", "steps": 1' + b"0" * 100 + b"}", 422, "steps"),
    ("huge_int_images", b'{"prompt": "a", "num_images": 18446744073709551616}', 422, "num_images"),
    ("negative_size", b'{"prompt": "a", "height": -512}', 422, "height"),
    ("null_prompt", b'{"prompt": null}', 422, "prompt"),
    ("list_prompt", b'{"prompt": ["a"]}', 422, "prompt"),
    ("object_width", b'{"prompt": "a", "width": {"v": 512}}', 422, "width"),
    ("missing_prompt", b'{"steps": 20}', 422, "prompt"),
    ("empty_prompt", b'{"prompt": ""}', 422, "prompt"),
    ("escape_control", b'{"prompt": "a\\u001b[31m"}', 422, "prompt"),
    ("del_control", b'{"prompt": "a\\u007f"}', 422, "prompt"),
    ("c1_control", b'{"prompt": "a\\u0085"}', 422, "prompt"),
    ("lone_surrogate", b'{"prompt": "a\\ud800"}', 422, "prompt"),
    (
        "surrogate_negative",
        b'{"prompt": "a", "negative_prompt": "\\udfff"}',
        422,
        "negative_prompt",
    ),
    ("surrogate_model", b'{"prompt": "a", "model": "\\ud800"}', 422, "model"),
    ("unknown_field", b'{"prompt": "a", "cfg": 7}', 422, "cfg"),
    ("unsupported_sampler", b'{"prompt": "a", "sampler": "plms"}', 422, "sampler"),
    ("unsupported_model", b'{"prompt": "a", "model": "sdxl"}', 422, "model"),
    ("size_not_multiple_of_8", b'{"prompt": "a", "width": 513}', 422, "width"),
    ("size_beyond_limit", b'{"prompt": "a", "height": 8192}', 422, "height"),
    ("num_images_beyond_limit", b'{"prompt": "a", "num_images": 64}', 422, "num_images"),
    ("webhook_not_a_url", b'{"prompt": "a", "webhook_url": "not a url"}', 422, "webhook_url"),
    ("body_over_limit", b'{"prompt": "' + b"x" * 100_000 + b'"}', 413, None),
]


@pytest.mark.parametrize(("content", "status", "field"), [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])  # fmt: skip
async def test_bad_input_table(
    api: tuple[Client, FastAPI], content: bytes, status: int, field: str | None
) -> None:
    client, _ = api
    r = await client.post("/v1/jobs", content=content, headers=_J)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"code", "message", "field"} and error["code"] and error["message"]
    if field is not None:
        assert error["field"] == field


async def test_100kb_prompt_under_a_raised_body_limit_is_422(
    app_client_factory: AppClientFactory,
) -> None:
    client, _ = await app_client_factory(max_body_bytes=256_000)
    r = await post_job(client, prompt="x" * 100_000)
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompt"


async def test_bad_headers_are_4xx(api: tuple[Client, FastAPI]) -> None:
    client, _ = api
    r = await client.post("/v1/jobs", json={"prompt": "a"}, headers={"Idempotency-Key": "k" * 300})
    assert r.status_code == 422 and r.json()["error"]["field"] == "Idempotency-Key"
    r = await client.post("/v1/jobs", content=b'{"prompt": "a"}',
                          headers=_J | {"content-length": "x"})  # fmt: skip
    assert r.status_code == 400


def test_openapi_publishes_the_limits_in_force() -> None:
    """The schema says what the server accepts, with the deployment's own limits."""
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", max_side=1024, max_steps=50))
    props = app.openapi()["components"]["schemas"]["JobRequest"]["properties"]
    assert props["width"]["maximum"] == 1024 and props["width"]["multipleOf"] == 8
    assert props["steps"]["maximum"] == 50 and props["steps"]["minimum"] == 1
    assert props["prompt"]["maxLength"] == 2000
    assert props["num_images"]["maximum"] == 8
