"""What the engine is given and gives back: requests, per-job handles, per-image samples, steps.

Kept apart from the scheduler so the worker can build requests and read results without
knowing how batches are formed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from PIL import Image

from model.denoise import Row
from model.job_start import JobStart
from service.contract import GenerationParams


@dataclass(frozen=True)
class GenerationRequest:
    """One job: the contract's parameters, plus its input images already decoded."""

    id: str
    params: GenerationParams  # image / mask travel as PIL images below, not as base64 here
    image: Image.Image | None = None
    mask: Image.Image | None = None
    preview_every: int = 0  # live previews every this many evaluations (0: none)

    @classmethod
    def of(
        cls,
        id: str,
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        preview_every: int = 0,
        **fields: Any,
    ) -> GenerationRequest:
        """A request from generation fields named as the contract names them."""
        return cls(id, GenerationParams(**fields), image, mask, preview_every)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance needs an unconditional row (as diffusers: scale > 1)."""
        return self.params.guidance_scale > 1.0

    @property
    def rows(self) -> int:
        """UNet rows this job occupies while denoising: CFG doubles each sample."""
        return self.params.num_images * (2 if self.guided else 1)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keywords of `Pipeline.generate()` for the same job (the solo reference)."""
        kw = self.params.model_dump(exclude={"image", "mask"})
        kw["seed"] = kw["seed"] or 0
        return {**kw, "image": self.image, "mask": self.mask}


class JobState(str, Enum):
    PENDING = "pending"  # submitted, not yet admitted to a batch
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"


@dataclass(frozen=True)
class Progress:
    """Evaluations done / needed (UNet calls per image; heun counts both stages)."""

    step: int
    total: int
    eta_s: float | None


class JobHandle:
    """The caller's view of a submitted job: state, progress, images, waiting."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.state = JobState.PENDING
        self.progress = Progress(0, 0, None)
        self.images: list[np.ndarray] = []  # (H, W, 3) uint8, image i from seed + i
        self.error: str | None = None
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.start: JobStart | None = None  # set at admission (what decoding needs)
        self._done = threading.Event()

    @property
    def id(self) -> str:
        return self.request.id

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (done, failed or canceled); False on timeout."""
        return self._done.wait(timeout)

    def end(self, state: JobState, error: str | None = None) -> None:
        """Record the job's outcome (the engine calls this once)."""
        self.state = state
        self.error = error
        self.finished_at = time.monotonic()
        self._done.set()


@dataclass(frozen=True)
class Preview:
    """A live preview of a job's first image (model.preview) after evaluation `step`."""

    step: int
    total: int
    pixels: np.ndarray  # (h, w, 3) uint8 at latent resolution


@dataclass
class StepOutput:
    """What one `Engine.step()` did, returned by value for the caller to act on."""

    progress: list[tuple[JobHandle, Progress]] = field(default_factory=list)
    ended: list[JobHandle] = field(default_factory=list)  # done, failed or canceled
    calls: list[tuple[int, int]] = field(default_factory=list)  # (UNet rows, jobs) per call
    previews: list[tuple[JobHandle, Preview]] = field(default_factory=list)
    wait_s: float = 0.0  # > 0: admission is gathering jobs; step again after this long

    @property
    def worked(self) -> bool:
        return bool(self.progress or self.ended or self.calls)


@dataclass
class Sample:
    """One image of a job inside the engine: its denoising row (model.denoise.Row)."""

    job: JobHandle
    index: int
    row: Row
    waited: int = 0  # steps of its group it was left out of (CallPlanner.select's aging)

    @property
    def shape_key(self) -> tuple[int, ...]:
        """Samples share a UNet call only with equal latent shapes and conditioning kinds."""
        concat = self.row.cond.concat
        return (*self.row.state.x.shape, 0 if concat is None else concat.shape[1])

    @property
    def context_length(self) -> int:
        """Text positions (77 per prompt chunk): one UNet call holds one length."""
        return int(self.row.cond.crossattn.shape[1])

    @property
    def rows(self) -> int:
        return self.row.rows

    @property
    def finished(self) -> bool:
        return self.row.finished
