"""Infrastructure faults with real processes: the API killed under load, Redis killed under
load, results past their TTL and Redis memory over a long-ish run.

Redis persistence (what a crash of redis-server can lose): with ``appendonly yes`` and
``appendfsync always`` every write is fsynced to the AOF before Redis answers it, so an
accepted job (its 202 was sent after the submit script returned) survives SIGKILL or
power loss. With ``everysec`` (Redis's default, and RedisServer's) the AOF is fsynced once
a second, in the background: a crash of the *machine* (or kernel) can lose up to about
one second of acknowledged writes — jobs answered 202, progress and results written in that
second. A crash of only the redis-server process usually loses nothing under
``everysec``, since Redis write()s the AOF buffer to the kernel before answering; but when
the disk is slow and the previous background fsync has not finished, Redis postpones that
write for up to 2 s, and a process crash then loses what it held. ``no`` leaves flushing to
the OS (~30 s on Linux). The deployment (deploy/redis.conf) chooses; ``always`` costs one
fsync per write. These tests use ``always``, the no-loss setting, and SIGKILL; the Redis
restart is repeated with a redis-server started from deploy/redis.conf itself (``everysec``),
where a process crash must lose nothing either (a machine crash, which it could, is not
something a test can do).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fault_scenarios as fs
from tests.deploy_files import REDIS_CONF
from tests.processes import Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("faults-infra"), workers=1,
              env={"FAULT_SLOW_STEP_S": "0.2"})  # fmt: skip
    with s:
        yield s


def test_api_killed_and_restarted_under_load(stack: Stack) -> None:
    """16 jobs submitted one every 0.1 s; the API is SIGKILLed after a third were accepted
    and restarted on its port. Every 202-accepted job succeeds once with a complete,
    decodable image set of the right size, and retried POSTs (same Idempotency-Key) created no extra job."""
    fs.api_restart(stack, seed=11, n=16).assert_nothing_lost()


def test_redis_killed_and_restarted_under_load(stack: Stack) -> None:
    """redis-server (AOF, appendfsync always) is SIGKILLed while jobs run and come in.
    While it is away: POST /v1/jobs and GET /v1/jobs/{id} answer 503 with Retry-After,
    /readyz 503, /healthz 200. It restarts on the same port and data dir after 3 s; API and
    worker (same pids) reconnect by themselves and every accepted job succeeds once."""
    fs.redis_restart(stack, seed=12, n=12).assert_nothing_lost()


def test_redis_restart_with_the_shipped_config(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same Redis SIGKILL + restart, with redis-server run from deploy/redis.conf (its
    appendfsync, everysec; only the address and data dir changed): nothing accepted more than
    the fsync interval (1 s) before the crash is lost."""
    root: Path = tmp_path_factory.mktemp("faults-shipped-redis")
    s = Stack(root, workers=1, redis_config=REDIS_CONF, env={"FAULT_SLOW_STEP_S": "0.2"})
    try:
        s.start()
        assert s.redis.appendfsync == "everysec"
        result = fs.redis_restart(s, seed=14, n=12, fsync_window_s=1.5)
    finally:
        s.close()
    result.assert_nothing_lost()


def test_results_expire_to_410_and_memory_stays_bounded(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Result TTL 2 s, record grace 3 s: an image answers 200, then 410 (never 5xx) while
    the job record lives, then the job 404s. Then 200 tiny jobs: the stream is empty and
    nothing pending at the end, every job/idempotency key has a TTL and is gone after it,
    and used_memory ends within 256 kB of where it started (200 results kept without a TTL
    would hold ~2 MB; an untrimmed stream fails the length check)."""
    root: Path = tmp_path_factory.mktemp("faults-ttl")
    env = {"LDMSERVE_RESULT_TTL_S": "2", "LDMSERVE_JOB_TTL_GRACE_S": "3"}
    s = Stack(root, workers=1, env=env)
    try:
        s.start()
        result = fs.ttl_and_memory(s, seed=13, n=200)
    finally:
        s.close()
    result.assert_nothing_lost()
