"""The interface every external result store implements, and how objects are named."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ResultStoreError(OSError):
    """The store could not be reached or refused a request (the caller retries, as it does
    for a Redis outage)."""


INPUTS = "_inputs"  # the folder of img2img / inpainting input images (swept on their own TTL)


def object_name(job_id: str, lease: int, index: int, fmt: str) -> str:
    """``{job}/{lease}-{index}.{fmt}``: one folder per job, one name per run of it."""
    return f"{job_id}/{lease}-{index}.{fmt}"


def input_name(job_id: str, field: str) -> str:
    """``_inputs/{job}-{field}.png``: a job's input image (written once, at submit)."""
    return f"{INPUTS}/{job_id}-{field}.png"


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
    async def sweep(self, older_than_s: float, inputs_older_than_s: float | None = None) -> int:
        """Remove objects written more than ``older_than_s`` ago — input images (below
        :data:`INPUTS`) only past ``inputs_older_than_s`` (None: keep them); returns how many.

        Inputs have their own age: a job may wait in the queue longer than results live."""

    def presigned_url(self, name: str, ttl_s: int) -> str | None:
        """A URL a client can GET the object from for ``ttl_s`` without a key (None: the
        store cannot make one; the API streams the bytes instead)."""
        return None
