"""What the engine is given and gives back: requests, per-job handles, per-image samples.

Kept apart from the scheduler so the worker can build requests and read results without
knowing how batches are formed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from model.samplers import SampleState, Trajectory


@dataclass(frozen=True)
class GenerationRequest:
    """One job: a prompt expanded to `num_images` samples; defaults equal Pipeline.generate()."""

    id: str
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "euler_a"
    seed: int = 0
    num_images: int = 1

    @property
    def guided(self) -> bool:
        """Classifier-free guidance needs an unconditional row (as diffusers: scale > 1)."""
        return self.guidance_scale > 1.0

    @property
    def rows(self) -> int:
        """UNet rows this job occupies while denoising: CFG doubles each sample."""
        return self.num_images * (2 if self.guided else 1)


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


ProgressCallback = Callable[["JobHandle", Progress], None]
DoneCallback = Callable[["JobHandle"], None]


class JobHandle:
    """The caller's view of a submitted job: state, progress, images, waiting."""

    def __init__(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None = None,
        on_done: DoneCallback | None = None,
    ) -> None:
        self.request = request
        self.state = JobState.PENDING
        self.progress = Progress(0, 0, None)
        self.images: list[np.ndarray] = []  # (H, W, 3) uint8, image i from seed + i
        self.error: str | None = None
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._on_progress = on_progress
        self._on_done = on_done
        self._done = threading.Event()

    @property
    def id(self) -> str:
        return self.request.id

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (done, failed or canceled); False on timeout."""
        return self._done.wait(timeout)

    def _report(self, progress: Progress) -> None:
        self.progress = progress
        if self._on_progress is not None:
            self._on_progress(self, progress)

    def _finish(self, state: JobState, error: str | None = None) -> None:
        self.state = state
        self.error = error
        self.finished_at = time.monotonic()
        self._done.set()
        if self._on_done is not None:
            self._on_done(self)


@dataclass
class Sample:
    """One image of a job inside the engine: its trajectory, state and conditioning.

    The per-sample fields leave room for what comes next without restructuring:
    `concat` holds extra UNet input channels (inpainting's mask + masked-image latents, the
    LDM paper's concat conditioning); `added_cond` per-sample vectors for SDXL's time
    embedding; img2img starts a sample part-way down its trajectory (state.k > 0) from
    encoded image latents.
    """

    job: JobHandle
    index: int
    traj: Trajectory
    state: SampleState
    cond: torch.Tensor  # (1, 77, D) text embedding
    uncond: torch.Tensor | None  # (1, 77, D) or None when unguided
    concat: torch.Tensor | None = None  # (1, C_extra, h, w)
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def shape_key(self) -> tuple[int, ...]:
        """Samples can share a UNet call only if their latents have one shape."""
        return tuple(self.state.x.shape)

    @property
    def rows(self) -> int:
        return 1 if self.uncond is None else 2

    @property
    def finished(self) -> bool:
        return self.state.k >= self.traj.n_evals
