"""What the Python client (:mod:`service.client`) hands its users: typed jobs, events and errors.

Kept apart from the transport (httpx, retries, SSE parsing) so the values can be used, and
matched on, without a client: only pydantic here.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TERMINAL = frozenset({"succeeded", "failed", "canceled"})

# ---------------------------------------------------------------------------- models


class _Model(BaseModel):
    # Newer servers may add fields: keep them rather than fail.
    model_config = ConfigDict(extra="allow")


class Progress(_Model):
    step: int
    total: int
    eta_s: float | None = None


class ImageRef(_Model):
    index: int
    seed: int
    url: str
    content_type: str


class JobErrorInfo(_Model):
    code: str
    message: str


class Job(_Model):
    """A job as the server last described it."""

    id: str
    status: str
    model: str | None = None
    queue_position: int | None = None
    progress: Progress | None = None
    seed: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: JobErrorInfo | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    images: list[ImageRef] = Field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class JobEvent(_Model):
    """The job's state: first on connect and on every status change."""

    type: Literal["job"] = "job"
    job: Job


class ProgressEvent(_Model):
    """One denoising step done."""

    type: Literal["progress"] = "progress"
    id: str
    step: int
    total: int
    eta_s: float | None = None


class PreviewEvent(_Model):
    """A live preview of the first image (jobs submitted with ``preview=True``): a PNG of its
    current latents at latent resolution."""

    type: Literal["preview"] = "preview"
    id: str
    step: int
    total: int
    width: int
    height: int
    image: str  # base64 PNG

    @property
    def png(self) -> bytes:
        return base64.b64decode(self.image)


class DoneEvent(_Model):
    """The job's final state; the stream ends after it."""

    type: Literal["done"] = "done"
    job: Job


Event = JobEvent | ProgressEvent | PreviewEvent | DoneEvent

# ---------------------------------------------------------------------------- errors


class LdmserveError(Exception):
    """Base of every error this client raises."""


class ApiError(LdmserveError):
    """The server answered an error (``{"error": {"code", "message", "field"}}``)."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None, retry_after: float | None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.field = status, code, message, field
        self.retry_after = retry_after


class InvalidRequest(ApiError):
    """400 / 413 / 422: the request was refused as it is."""


class AuthenticationError(ApiError):
    """401: missing or wrong API key."""


class NotFound(ApiError):
    """404: unknown job (or another key's)."""


class Conflict(ApiError):
    """409: e.g. images of a job that has not succeeded, or cancel of a finished job."""


class Gone(ApiError):
    """410: the job's images expired."""


class RateLimited(ApiError):
    """429: rate limit, per-key job cap or full queue (``retry_after`` seconds)."""


class Unavailable(ApiError):
    """503: the job store is unreachable, or no worker is ready."""


class JobFailed(LdmserveError):
    """The job ended failed or canceled; ``job`` says how."""

    def __init__(self, job: Job) -> None:
        detail = f": {job.error.code}: {job.error.message}" if job.error else ""
        super().__init__(f"job {job.id} {job.status}{detail}")
        self.job = job


class JobTimeout(LdmserveError, TimeoutError):
    """The job did not end within the wait; it keeps running (``job`` is its last state)."""

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(f"job {job.id} still {job.status} after {timeout:g} s")
        self.job = job


ERROR_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest, 413: InvalidRequest, 422: InvalidRequest, 401: AuthenticationError,
    404: NotFound, 409: Conflict, 410: Gone, 429: RateLimited, 503: Unavailable,
}  # fmt: skip
