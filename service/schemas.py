"""The HTTP contract: request and response models (pydantic v2).

Request bodies are strict JSON: unknown fields are **rejected** with 422 naming the field
(a misspelt ``guidance`` must not silently fall back to a default and produce a different
image), numbers must be JSON numbers (``"512"`` is refused), NaN/Infinity are refused.
Configurable limits (sizes, steps, guidance, image count, prompt length) are checked by the
API against :class:`service.settings.Settings`, not here, so that they can change per
deployment; the ranges below are the fixed ones.

This module must not import torch or ``model``: the API process runs without them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from service.contract import GenerationParams
from service.queue.keys import Priority

if TYPE_CHECKING:
    from service.queue.records import JobRecord

OutputFormat = Literal["png", "jpeg", "webp"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class JobRequest(GenerationParams):
    """Body of ``POST /v1/jobs``: the generation contract plus transport fields.

    Unknown fields are rejected (422). ``seed`` omitted → the server draws one and returns
    it; image ``i`` of the job uses seed ``seed + i``. ``image`` / ``mask`` are stored beside
    the job, not in its ``parameters``.
    """

    output_format: OutputFormat = "png"
    model: str | None = Field(default=None, min_length=1, max_length=512)
    webhook_url: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="http(s) URL POSTed a signed JSON body when the job ends (succeeded, "
        "failed or canceled); must resolve to public addresses (see README, Security).",
    )
    priority: Priority = Field(
        default="normal",
        description="Workers take higher priorities first; the highest a key may use is part "
        "of its configuration (403 priority_not_allowed above it).",
    )
    preview: bool = Field(
        default=False,
        description="Stream live previews: SSE `preview` events with a small PNG of the first "
        "image's current latents every `preview_every_steps` UNet evaluations.",
    )


TRANSPORT_FIELDS: tuple[str, ...] = tuple(
    name for name in JobRequest.model_fields if name not in GenerationParams.model_fields
)


class Links(BaseModel):
    """Where to find the job and its event stream."""

    self: str
    events: str


class SubmitResponse(BaseModel):
    """202 answer to a submit: enough to poll or stream at once."""

    id: str
    status: JobStatus
    queue_position: int | None = Field(
        description="Jobs ahead of this one (0 = next); null once it is not queued."
    )
    seed: int
    links: Links


class Progress(BaseModel):
    """Denoising progress of a running job."""

    step: int
    total: int
    eta_s: float | None = None


class ImageLink(BaseModel):
    """One result image and the seed that reproduces it alone."""

    index: int
    seed: int
    url: str
    content_type: str


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str


class JobView(BaseModel):
    """Everything a client may know about a job (``GET /v1/jobs/{id}``)."""

    id: str
    status: JobStatus
    model: str
    queue_position: int | None = Field(
        default=None, description="Jobs ahead of this one (0 = next); null unless queued."
    )
    progress: Progress | None = None
    attempt: int = 0
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: JobError | None = None
    parameters: dict[str, Any]
    images: list[ImageLink] = Field(default_factory=list)
    images_expire_at: str | None = None
    links: Links

    @classmethod
    def from_record(cls, record: JobRecord) -> JobView:
        """Public view of a job record: links are relative to the API root."""
        base = f"/v1/jobs/{record.id}"
        progress = None
        if record.status == "running" and record.total:
            progress = Progress(step=record.step or 0, total=record.total, eta_s=record.eta_s)
        error = None
        if record.status == "failed":
            error = JobError(code=record.error_code or "failed", message=record.error or "")
        images = []
        if record.status == "succeeded":
            content_type = CONTENT_TYPES.get(record.format or "png", "application/octet-stream")
            images = [
                ImageLink(index=i, seed=seed, url=f"{base}/images/{i}", content_type=content_type)
                for i, seed in enumerate(_seeds(record))
            ]
        return cls(
            id=record.id,
            status=record.status,  # type: ignore[arg-type]
            model=record.model,
            queue_position=record.queue_position,
            progress=progress,
            attempt=record.attempt,
            created_at=iso(record.created_at) or "",
            started_at=iso(record.started_at),
            finished_at=iso(record.finished_at),
            error=error,
            parameters=record.params,
            images=images,
            images_expire_at=iso(record.expires_at),
            links=Links(self=base, events=f"{base}/events"),
        )


def _seeds(record: JobRecord) -> list[int]:
    """The seed of each image: what the worker reported, else the noise convention's s + i."""
    if len(record.seeds) >= record.image_count:
        return record.seeds[: record.image_count]
    first = int(record.params.get("seed", 0))
    return [first + i for i in range(record.image_count)]


def iso(timestamp: float | None) -> str | None:
    """Unix seconds → ISO 8601 UTC (what clients parse without guessing)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


class JobList(BaseModel):
    """``GET /v1/jobs``: the caller's jobs, newest first."""

    jobs: list[JobView]
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null on the last."
    )


class ModelInfo(BaseModel):
    """A model this deployment serves and the live workers that serve it."""

    id: str
    default: bool
    workers: int
    max_batch: int = Field(description="Sum of the live workers' batch rows.")
    devices: list[str]
    queued: int = Field(description="Jobs waiting for this model.")
    capabilities: dict[str, Any] | None = Field(
        default=None,
        description="What the model runs (family, modes, latent_factor, native_size, "
        "max_steps per sampler, ...), as its workers last published; null until one has "
        "registered (requests are then checked against the deployment's limits only).",
    )


class ModelList(BaseModel):
    """``GET /v1/models``."""

    models: list[ModelInfo]


class SamplerList(BaseModel):
    """``GET /v1/samplers``."""

    samplers: list[str]
    default: str


class ErrorDetail(BaseModel):
    """The one error shape every endpoint uses."""

    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {"code", "message", "field"}}``."""

    error: ErrorDetail
