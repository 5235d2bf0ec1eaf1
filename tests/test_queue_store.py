"""The shared store: one key layout for Python and Lua, scripts called by argument name."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from service.queue import (
    claim_scripts,
    outcome_scripts,
    request_scripts,
    run_scripts,
    webhook_scripts,
)
from service.queue.keys import LAYOUT, STREAM_ROLE, Keys
from service.queue.lua import Script
from service.queue.store import QueueStore
from service.settings import Settings

pytestmark = pytest.mark.anyio


def _python_name(keys: Keys, role: str, part: str) -> str:
    if role == "idem":  # Keys.idem(key, owner) hashes its input; the Lua side gets the digest
        return keys.idem("k", "o").rsplit(":", 1)[0] + ":" + part
    by_priority = {role: p for p, role in STREAM_ROLE.items()}
    if role in by_priority:
        return keys.stream(part, by_priority[role])
    attr = getattr(keys, role)
    return attr(part) if callable(attr) else attr


async def test_lua_key_names_equal_the_python_layout(redis_url: str) -> None:
    """Every role in LAYOUT names the same key in a script as in Python (custom prefix)."""
    client = Redis.from_url(redis_url)
    store = QueueStore(client, Settings(key_prefix="tenant-a"))
    body = (
        "local out = {}\n"
        + "".join(
            f"table.insert(out, type(K.{role}) == 'function' and K.{role}(part) or K.{role})\n"
            for role in LAYOUT
        )
        + "return out\n"
    )
    probe = Script("probe_keys", body=body, params=("part",))
    try:
        names = [n.decode() for n in await store.run(probe, part="x:1")]
    finally:
        await client.aclose()
    expected = [_python_name(Keys("tenant-a"), role, "x:1") for role in LAYOUT]
    assert names == expected
    assert names[0] == "tenant-a:job:x:1"


def test_every_layout_role_has_a_keys_accessor() -> None:
    keys = Keys("p")
    for role, name in LAYOUT.items():
        got = _python_name(keys, role, "v")
        assert got == "p:" + name.format("v")


def test_idempotency_key_is_hashed_with_the_owner() -> None:
    keys = Keys("p")
    assert keys.idem("k", "alice") != keys.idem("k", "bob")
    assert keys.idem("k", "alice").startswith("p:idem:") and "k" not in keys.idem("k", "alice")[7:9]


async def test_script_arguments_are_checked_by_name(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    store = QueueStore(client, Settings())
    try:
        with pytest.raises(TypeError, match=r"missing .*lease"):
            await store.run(outcome_scripts.RELEASE, job_id="j", worker="w", now="1")
        with pytest.raises(TypeError, match=r"unknown .*leese"):
            await store.run(
                outcome_scripts.RELEASE, job_id="j", worker="w", now="1", lease=1, leese=2
            )
        with pytest.raises(TypeError, match="no variable-length"):
            await store.run(
                outcome_scripts.RELEASE, job_id="j", worker="w", now="1", lease=1, rest=[1]
            )
        # Arguments arrive under their names, whatever order the caller wrote them in.
        echo = Script("echo", body="return {b, a, #tail}", params=("a", "b"), rest="tail")
        assert await store.run(echo, b="2", a="1", rest=["x", "y", "z"]) == [b"2", b"1", 3]
    finally:
        await client.aclose()


def test_every_script_compiles_to_distinct_source() -> None:
    stages = (request_scripts, claim_scripts, run_scripts, outcome_scripts, webhook_scripts)
    found = [v for m in stages for v in vars(m).values() if isinstance(v, Script)]
    assert len({s.name for s in found}) == len(found) >= 12
    for script in found:
        for param in script.params:
            assert f"local {param} = ARGV[" in script.source
