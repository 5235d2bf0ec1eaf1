"""The shared store under both queue roles: one Redis connection pool, the key layout,
and the Lua scripts called by name.

:class:`~service.queue.api_side.ApiQueue` and :class:`~service.queue.worker_side.WorkerQueue`
are each built over a ``QueueStore`` (an API process and a worker process each have one;
tests may put both sides over the same store).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript

from service.queue.keys import Keys
from service.queue.lua import Script
from service.results import ResultStore, open_result_store
from service.settings import Settings


class QueueStore:
    """Connection, keys, scripts and the result store shared by the API and worker sides.

    ``results`` is None when images live in Redis (``result_store = redis``).
    """

    def __init__(
        self, redis: Redis, settings: Settings, results: ResultStore | None = None
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys.for_settings(settings.key_prefix, settings.redis_cluster)
        self.results = results
        self._scripts: dict[str, AsyncScript] = {}

    @classmethod
    def connect(cls, settings: Settings) -> QueueStore:
        """A store on a new connection pool with fail-fast timeouts (nothing connects yet).

        A dropped connection is retried twice with a short backoff, so API and workers ride
        through a Redis restart; while Redis is away calls raise ConnectionError at once.
        """
        url = settings.redis_url or "redis://127.0.0.1:6379/0"
        options: dict[str, Any] = {
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": min(settings.redis_timeout_s, 2.0),
            "retry": Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
        }
        if settings.redis_cluster:
            # Any node's URL; the client learns the slot map and follows MOVED redirects.
            client: Any = RedisCluster.from_url(url, **options)
        else:
            client = Redis.from_url(url, health_check_interval=30, **options)
        return cls(client, settings, open_result_store(settings))

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.redis.aclose()

    @property
    def job_ttl(self) -> int:
        """Seconds a finished job's record lives (its images live ``result_ttl_s``)."""
        return self.settings.result_ttl_s + self.settings.job_ttl_grace_s

    async def run(
        self,
        script: Script,
        *,
        rest: Sequence[Any] = (),
        pipe: Pipeline | None = None,
        **args: Any,
    ) -> Any:
        """Call ``script`` with its named arguments (EVALSHA, loading it on first use);
        with ``pipe``, queue the call on that pipeline instead.

        ``KEYS[1]`` is the submit counter's key: every key lives in its slot on a Cluster
        (see :func:`service.queue.keys.key_prefix`), so it routes the call to the right node.
        """
        registered = self._scripts.get(script.name)
        if registered is None:
            registered = self.redis.register_script(script.source)
            if pipe is not None:  # a pipelined EVALSHA cannot fall back to loading it
                await self.redis.script_load(script.source)
            self._scripts[script.name] = registered
        argv = script.argv(self.keys.prefix, args, rest)
        return await registered(keys=[self.keys.seq], args=argv, client=pipe)
