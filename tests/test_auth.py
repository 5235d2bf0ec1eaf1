"""API keys, job ownership, job ids, CORS and request logging (issue 5, Security)."""

from __future__ import annotations

import base64
import hashlib
import logging
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.api import create_app, new_job_id
from service.auth import KeyEntry, KeyRing, bearer_token, hash_key, parse_entries
from service.settings import Settings
from tests.apps import AppClientFactory
from tests.queues import Queues

pytestmark = pytest.mark.anyio
Client = httpx.AsyncClient
KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key"}
API_KEYS = ",".join(f"{name}:{hash_key(key)}" for name, key in KEYS.items())


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture
def make_client(app_client_factory: AppClientFactory) -> AppClientFactory:
    async def make(**overrides: Any) -> tuple[Client, FastAPI]:
        return await app_client_factory(**{"api_keys": API_KEYS, **overrides})

    return make


@pytest.fixture
async def api(make_client: Any) -> tuple[Client, FastAPI]:
    return await make_client()


async def submit(client: Client, who: str, **body: Any) -> httpx.Response:
    return await client.post("/v1/jobs", json={"prompt": "a cat", **body}, headers=bearer(who))


# ------------------------------------------------------------------ configuration


def test_entries_parse_and_bad_ones_are_refused(tmp_path: Path) -> None:
    digest = hash_key("k")
    assert parse_entries(f" a:{digest} , b.c-d_1:{digest.upper()}:high ") == {
        "a": KeyEntry(bytes.fromhex(digest), "normal"),
        "b.c-d_1": KeyEntry(bytes.fromhex(digest), "high"),
    }
    for bad in ("a", f"a:{digest[:-1]}", f":{digest}", f"a b:{digest}", "a:zz" + digest[2:],
                f"anonymous:{digest}", f"a:{digest},a:{digest}", f"a:{digest}:urgent"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_entries(bad)
    # The error never echoes the hash part of a malformed entry.
    with pytest.raises(ValueError) as info:
        parse_entries("x:not-a-hash-but-maybe-a-pasted-key")
    assert "pasted" not in str(info.value)
    path = tmp_path / "keys"
    path.write_text(f"# ops keys\ncarol:{digest}  # on-call\n\n")
    ring = KeyRing.from_settings(f"dave:{hash_key('d')}", path)
    assert ring.identify("k") == "carol" and ring.identify("d") == "dave"
    assert ring.identify("nope") is None and ring.identify("") is None
    assert not KeyRing.from_settings("", None).enabled


def test_hash_helper_prints_the_sha256() -> None:
    run = [sys.executable, "-m", "service.auth"]
    out = subprocess.run([*run, "hash", "s3cret"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(b"s3cret").hexdigest()
    out = subprocess.run([*run, "hash", "-"], input="s3cret\n", capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert out.stdout.strip() == hashlib.sha256(b"s3cret").hexdigest()
    out = subprocess.run([*run, "new", "eve"], capture_output=True, text=True, check=True)
    key = out.stdout.split("key:")[1].split()[0]
    assert f"entry: eve:{hash_key(key)}" in out.stdout and len(key) > 40
    assert subprocess.run([*run, "bogus"], capture_output=True).returncode == 2


# ------------------------------------------------------------------ authentication


async def test_every_endpoint_but_healthz_needs_a_key(api: tuple[Client, FastAPI]) -> None:
    client, _ = api
    job = (await submit(client, "alice")).json()["id"]
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/openapi.json")).status_code == 200  # public: documented
    for method, path in (
        ("POST", "/v1/jobs"),
        ("GET", f"/v1/jobs/{job}"),
        ("GET", f"/v1/jobs/{job}/images/0"),
        ("GET", f"/v1/jobs/{job}/events"),
        ("DELETE", f"/v1/jobs/{job}"),
        ("GET", "/v1/models"),
        ("GET", "/v1/samplers"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/no/such/route"),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YTpi"},
                        {"Authorization": f"bearer{KEYS['alice']}"}):  # fmt: skip
            r = await client.request(method, path, json={"prompt": "a"}, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"].startswith('Bearer realm="ldmserve"')
            assert r.json()["error"]["code"] == "unauthorized"
    r = await client.get("/v1/samplers", headers={"Authorization": "Bearer wrong"})
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    r = await client.get("/v1/samplers", headers={"authorization": f"BEARER {KEYS['bob']}"})
    assert r.status_code == 200
    assert (await client.get(f"/v1/jobs/{job}", headers=bearer("alice"))).status_code == 200


async def test_metrics_can_be_public(make_client: Any) -> None:
    client, _ = await make_client(metrics_public=True)
    assert (await client.get("/metrics")).status_code == 200
    assert (await client.get("/metrics", headers=bearer("bob"))).status_code == 200
    assert (await client.get("/v1/models")).status_code == 401


async def test_metrics_only_for_admin_keys(make_client: Any) -> None:
    """Every tenant's numbers are in /metrics: a tenant's key gets 403, an admin key 200."""
    client, _ = await make_client(metrics_keys="alice")
    await client.post("/v1/jobs", json={"prompt": "a"}, headers=bearer("bob"))
    r = await client.get("/metrics", headers=bearer("bob"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert "ldmserve_" not in r.text
    r = await client.get("/metrics", headers=bearer("alice"))
    assert r.status_code == 200 and "ldmserve_jobs_submitted_total 1" in r.text.splitlines()
    assert (await client.get("/v1/samplers", headers=bearer("bob"))).status_code == 200


async def test_metrics_closed_to_every_key_by_default(make_client: Any) -> None:
    client, _ = await make_client()
    for name in KEYS:
        assert (await client.get("/metrics", headers=bearer(name))).status_code == 403
    assert (await client.get("/metrics")).status_code == 401


def test_metrics_keys_must_name_configured_keys(redis_url: str) -> None:
    with pytest.raises(ValueError, match="carol"):
        create_app(Settings(redis_url=redis_url, api_keys=API_KEYS, metrics_keys="alice,carol"))


@pytest.mark.parametrize(
    "content",
    [
        b'{"prompt": "a',  # malformed JSON
        b'{"prompt": 5, "bogus": 1}',  # invalid body
        b'{"prompt": "' + b"x" * 100_000 + b'"}',  # over the body limit
    ],
)
async def test_a_bad_key_never_reaches_validation(
    api: tuple[Client, FastAPI], content: bytes
) -> None:
    client, _ = api
    headers = {"content-type": "application/json", "Authorization": "Bearer guess"}
    r = await client.post("/v1/jobs", content=content, headers=headers)
    assert r.status_code == 401 and r.json()["error"] == {
        "code": "unauthorized",
        "message": "a valid API key is required (Authorization: Bearer <key>)",
        "field": None,
    }


async def test_keys_file_setting(make_client: Any, tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"carol:{hash_key('carol-key')}\n")
    client, _ = await make_client(api_keys="", api_keys_file=path)
    r = await client.get("/v1/samplers", headers={"Authorization": "Bearer carol-key"})
    assert r.status_code == 200
    assert (await client.get("/v1/samplers")).status_code == 401


async def test_auth_off_warns_when_not_on_loopback(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.api"):
        create_app(Settings(redis_url=redis_url, host="127.0.0.1"))
        create_app(Settings(redis_url=redis_url, host="0.0.0.0", api_keys=API_KEYS))
        assert not [r for r in caplog.records if "auth is OFF" in r.message]
        create_app(Settings(redis_url=redis_url, host="0.0.0.0"))
    assert [r for r in caplog.records if "auth is OFF" in r.getMessage()]


# ------------------------------------------------------------------ ownership


async def test_another_key_gets_404_for_everything_of_a_job(api: tuple[Client, FastAPI]) -> None:
    client, app = api
    job = (await submit(client, "alice")).json()["id"]
    unknown = (await client.get(f"/v1/jobs/{'0' * 32}", headers=bearer("bob"))).json()
    q = Queues.over(app.state.queue.store)
    (claim,) = await q.worker.claim("w1", "demo", 1)
    await q.worker.finish(claim, [b"png"], [claim.params["seed"]])
    for method, path in (
        ("GET", f"/v1/jobs/{job}"),
        ("GET", f"/v1/jobs/{job}/images/0"),
        ("GET", f"/v1/jobs/{job}/events"),
        ("DELETE", f"/v1/jobs/{job}"),
    ):
        r = await client.request(method, path, headers=bearer("bob"))
        assert r.status_code == 404 and r.json() == unknown, (method, path)
        assert (await client.request(method, path, headers=bearer("alice"))).status_code in (
            200,
            409,  # DELETE of a finished job
        )
    # A queued job of alice cannot be canceled by bob either.
    other = (await submit(client, "alice")).json()["id"]
    assert (await client.delete(f"/v1/jobs/{other}", headers=bearer("bob"))).status_code == 404
    view = (await client.get(f"/v1/jobs/{other}", headers=bearer("alice"))).json()
    assert view["status"] == "queued"


async def test_idempotency_keys_are_scoped_per_key(api: tuple[Client, FastAPI]) -> None:
    client, _ = api
    idem = {"Idempotency-Key": "order-1"}
    a = await client.post("/v1/jobs", json={"prompt": "a"}, headers=bearer("alice") | idem)
    b = await client.post("/v1/jobs", json={"prompt": "b"}, headers=bearer("bob") | idem)
    assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]
    again = await client.post("/v1/jobs", json={"prompt": "a"}, headers=bearer("alice") | idem)
    assert again.json()["id"] == a.json()["id"]


# ------------------------------------------------------------------ ids, CORS, logs


async def test_job_ids_carry_122_random_bits(make_client: Any) -> None:
    client, _ = await make_client(api_keys="")
    ids = [(await client.post("/v1/jobs", json={"prompt": "a"})).json()["id"] for _ in range(5)]
    for job_id in ids:
        parsed = uuid.UUID(hex=job_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and len(job_id) == 32
    # 128 bits - 4 (version) - 2 (variant) = 122 random ones: each varies across ids.
    many = [int(new_job_id(), 16) for _ in range(400)]
    fixed = {76, 77, 78, 79, 62, 63}  # version nibble and variant bits (from the LSB)
    for bit in range(128):
        ones = sum((n >> bit) & 1 for n in many)
        if bit in fixed:
            assert ones in (0, 400), bit
        else:
            assert 100 < ones < 300, (bit, ones)


async def test_cors_off_by_default_and_preflight_needs_no_key(make_client: Any) -> None:
    client, _ = await make_client()
    r = await client.get("/healthz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers
    client, _ = await make_client(cors_origins=["https://app.example"])
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    r = await client.options("/v1/jobs", headers=preflight)
    assert (
        r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    )
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = await client.get("/v1/samplers", headers={"Origin": "https://app.example"})
    assert (
        r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
    )
    r = await client.options("/v1/jobs", headers=preflight | {"Origin": "https://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"


async def test_logs_carry_ids_and_timings_but_prompts_only_when_asked(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = await make_client()
    with caplog.at_level(logging.INFO, logger="service.api"):
        job = (await submit(client, "alice", prompt="secret lighthouse")).json()["id"]
        await client.get(f"/v1/jobs/{job}", headers=bearer("alice"))
        await client.delete(f"/v1/jobs/{job}", headers=bearer("alice"))
    lines = [r.getMessage() for r in caplog.records if r.name == "service.api"]
    for verb in ("submit", "get", "cancel"):
        assert any(line.startswith(f"{verb} job={job}") and " ms" in line for line in lines), verb
    assert not any("secret lighthouse" in line for line in lines)
    assert not any(KEYS["alice"] in line for line in caplog.text.splitlines())

    caplog.clear()
    client, _ = await make_client(log_prompts=True)
    with caplog.at_level(logging.INFO, logger="service.api"):
        await submit(client, "alice", prompt="secret lighthouse")
    assert any("secret lighthouse" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("header", "basic", "key"),
    [
        (b"Bearer k1", False, "k1"),
        (b"bearer   k1 ", True, "k1"),
        (b"Basic " + base64.b64encode(b"user:k:2"), True, "k:2"),  # the password may hold ':'
        (b"Basic " + base64.b64encode(b"user:k1"), False, None),  # Basic only where allowed
        (b"Basic " + base64.b64encode(b"no-colon"), True, None),
        (b"Basic " + base64.b64encode(b"user:"), True, None),
        (b"Basic not*base64", True, None),
        (b"Basic " + base64.b64encode("ü:\xff".encode("latin-1")), True, None),  # not UTF-8
        (b"Digest abc", True, None),
    ],
)
def test_presented_key_bearer_and_basic(header: bytes, basic: bool, key: str | None) -> None:
    assert bearer_token([(b"authorization", header)], basic=basic) == key
