"""Both queue roles over one store, for tests that play the API and a worker at once."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from service.queue import ApiQueue, QueueStore, WorkerQueue
from service.queue.keys import Keys
from service.settings import Settings

# The keys of a deployment with the default prefix (the processes tests/processes.py starts).
DEFAULT_KEYS = Keys(Settings.model_fields["key_prefix"].default)


@dataclass(frozen=True)
class Queues:
    """The store, the API side and a worker side sharing one connection pool."""

    store: QueueStore
    api: ApiQueue
    worker: WorkerQueue

    @classmethod
    def over(cls, store: QueueStore) -> Queues:
        return cls(store, ApiQueue(store), WorkerQueue(store))

    @classmethod
    def on(cls, redis: Redis, settings: Settings) -> Queues:
        return cls.over(QueueStore(redis, settings))
