"""The interface every external result store implements, and how objects are named."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ResultStoreError(OSError):
    """The store could not be reached or refused a request (the caller retries, as it does
    for a Redis outage)."""


def object_name(job_id: str, lease: int, index: int, fmt: str) -> str:
    """``{job}/{lease}-{index}.{fmt}``: one folder per job, one name per run of it."""
    return f"{job_id}/{lease}-{index}.{fmt}"


class ResultStore(ABC):
    """Encoded images by object name; every method is safe to call from the event loop."""

    @abstractmethod
    async def put(self, name: str, data: bytes, content_type: str) -> None:
        """Write one object (replacing any of that name)."""

    @abstractmethod
    async def get(self, name: str) -> bytes | None:
        """An object's bytes, None when it does not exist (expired or never written)."""

    @abstractmethod
    async def delete(self, names: Sequence[str]) -> None:
        """Remove objects; missing ones are fine."""

    @abstractmethod
    async def sweep(self, older_than_s: float) -> int:
        """Remove objects written more than ``older_than_s`` ago; returns how many."""

    def presigned_url(self, name: str, ttl_s: int) -> str | None:
        """A URL a client can GET the object from for ``ttl_s`` without a key (None: the
        store cannot make one; the API streams the bytes instead)."""
        return None
