"""One settings object for every ldmserve process, read from ``LDMSERVE_*`` variables.

API, workers and the CLI share it so that a limit or TTL has a single name and default;
CLI flags override individual fields by constructing ``Settings(field=value)``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class PinnedCallCosts(BaseModel):
    """UNet call costs given rather than measured (``call_costs``): the shape of
    ``service.call_cost.CallCosts.to_dict``, which a worker logs after measuring, so an
    operator can pin a device's curve (reproducible call sizes, no measuring at each start).
    Its ``buckets`` are not read: they come from the worker's own compiled UNet."""

    pixels: PositiveInt  # latent pixels (h x w) of the calls the points describe
    points: list[tuple[PositiveFloat, PositiveFloat]] = Field(min_length=1)  # (rows, seconds)


class Settings(BaseSettings):
    """Service configuration; every field can be set as ``LDMSERVE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="LDMSERVE_", extra="ignore")

    # Where things run.
    redis_url: str | None = Field(
        default=None, description="Redis URL; None starts an embedded redis-server in data_dir."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path(".ldmserve")
    key_prefix: str = Field(default="ldmserve", min_length=1, max_length=64, pattern=r"^[^{}]+$")
    redis_cluster: bool = Field(
        default=False,
        description="redis_url names one node of a Redis Cluster (keys share one hash slot).",
    )

    # Model / worker.
    model: str = Field(default="demo", description="Model source the workers serve by default.")
    device: str | None = None
    max_batch: int = Field(default=16, ge=1, le=1024, description="UNet rows per worker step.")
    drain_timeout_s: float = Field(
        default=60.0, ge=0, description="On SIGTERM, running jobs get this long before hand-back."
    )
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    watchdog_stall_s: float = Field(
        default=300.0,
        ge=0,
        description="A worker whose engine makes no progress this long with jobs exits (0 = off).",
    )
    max_job_runtime_s: float = Field(
        default=0.0,
        ge=0,
        description="A job running longer fails (runtime_exceeded); 0 = no limit.",
    )
    worker_ttl_s: float = Field(
        default=10.0, gt=0, description="A worker without a heartbeat for this long is dead."
    )
    compile_unet: bool = Field(
        default=False,
        description="Run the UNet through torch.compile at bucketed batch sizes, compiled at "
        "warm-up for the native image size (model.compiled; ~2 minutes per bucket on a small "
        "CPU). Off by default: on CPU it measured no faster than eager (model/compiled.py).",
    )
    compile_sides: list[int] | None = Field(
        default=None,
        description="Square image sides the compiled UNet is warmed at (None: the model's "
        "native size); other sizes run eager rather than stall the batch while compiling.",
    )
    compile_mode: str | None = Field(
        default=None, description='torch.compile mode; None: "reduce-overhead" on CUDA.'
    )
    call_sizing: bool = Field(
        default=True,
        description="Measure UNet call costs at warm-up and split batches into the calls with "
        "the least estimated time (service.call_cost); off: calls as large as max_batch.",
    )
    call_sizing_side: int | None = Field(
        default=None, ge=8, description="Image side the costs are measured at (None: native)."
    )
    call_sizing_budget_s: float = Field(
        default=20.0, gt=0, description="Warm-up time the cost measurement may take."
    )
    call_costs: PinnedCallCosts | None = Field(
        default=None,
        description='Call costs to use instead of measuring them, as JSON: {"pixels": 64, '
        '"points": [[1, 0.012], [2, 0.013], ...]} (what a worker logs after measuring).',
    )
    admission_wait_s: float = Field(
        default=0.2,
        ge=0,
        description="An idle worker waits at most this long (and never longer than one UNet "
        "call of what is pending) for more jobs to start together.",
    )
    preview_every_steps: int = Field(
        default=5,
        ge=1,
        description="A job asking for live previews gets one every this many UNet evaluations.",
    )

    # Queue semantics.
    reclaim_after_s: float = Field(default=30.0, ge=0)
    max_attempts: int = Field(default=3, ge=1)
    result_ttl_s: int = Field(default=3600, ge=1)
    result_store: str = Field(
        default="redis",
        pattern=r"^(redis|file:///.*|s3://[^/]+(/.*)?)$",
        description="Where images live: redis | file:///path (shared volume) | s3://bucket/prefix.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint for a non-AWS store (MinIO, SeaweedFS, ...)."
    )
    result_redirect: bool = Field(
        default=False,
        description="With an s3:// store, answer image GETs with a 307 to a presigned URL.",
    )
    job_ttl_grace_s: int = Field(
        default=3600, ge=1, description="The job record outlives its images by this (→ 410)."
    )
    max_queue: int = Field(default=1000, ge=1, description="Queued jobs per model before 429.")
    max_running_per_key: int = Field(
        default=0,
        ge=0,
        description="Jobs one key may have running at once (fair share); 0 = no cap.",
    )
    queue_full_retry_after_s: int = Field(default=5, ge=1)
    redis_retry_after_s: int = Field(default=2, ge=1)
    redis_timeout_s: float = Field(default=5.0, gt=0)

    # Request limits (validated by the API so that they stay configurable).
    min_side: int = Field(default=64, ge=8)
    min_input_side: int = Field(default=32, ge=1)  # input images: an upscaler's are small
    max_side: int = Field(default=2048, ge=8)
    side_multiple: int = Field(default=8, ge=1)
    min_steps: int = Field(default=1, ge=1)
    max_steps: int = Field(default=150, ge=1)
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_num_images: int = Field(default=8, ge=1)
    max_loras_per_job: int = Field(default=4, ge=0, description="LoRA adapters one job may use.")
    lora_dir: Path | None = Field(
        default=None, description="Workers: the folder of <name>.safetensors LoRA adapters."
    )
    embeddings_dir: Path | None = Field(
        default=None,
        description="Workers: textual-inversion embeddings (<word>.pt / .safetensors) prompts may use.",
    )
    lora_cache_mb: int = Field(
        default=1024, ge=0, description="Workers: LoRA weights kept in memory (LRU beyond)."
    )
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_body_bytes: int = Field(default=65536, ge=1024)
    max_image_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Largest POST /v1/jobs body carrying image / mask (base64 grows 4/3).",
    )
    input_ttl_s: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="Input images of a job that never ends are dropped after this long.",
    )
    max_image_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, description="Largest input image file (→ 413)."
    )
    max_image_pixels: int = Field(
        default=4096 * 4096,
        ge=64,
        # Pillow's own bomb warning starts at 89_478_485 px; staying below it keeps our
        # check the one that decides (service.image_input).
        le=89_478_485,
        description="Largest input image width x height, read from the header (→ 422).",
    )

    # HTTP.
    cors_origins: list[str] = Field(default_factory=list, description="Empty: CORS off.")
    sse_poll_s: float = Field(
        default=5.0,
        gt=0,
        description=(
            "SSE re-reads the job this often in case a pub/sub message was lost (a safety net:"
            " progress and status changes arrive by message at once)."
        ),
    )
    sse_keepalive_s: float = Field(default=15.0, gt=0)
    log_prompts: bool = Field(default=False, description="Log prompts with job ids (privacy).")
    png_parameters: bool = Field(
        default=True,
        description="PNGs carry A1111's `parameters` text chunk (prompt, seed, sampler, ...).",
    )
    max_prefer_wait_s: float = Field(
        default=60.0, ge=0, description="Longest `Prefer: wait=N` honoured on POST /v1/jobs."
    )
    compat_wait_s: float = Field(
        default=300.0,
        gt=0,
        description="OpenAI / A1111 endpoints wait this long for their job, then answer an "
        "error naming the job id (it keeps running; fetch it from /v1/jobs/{id}).",
    )

    # Security (docs/ARCHITECTURE.md "Security"; service.auth, service.webhooks).
    api_keys: str = Field(
        default="",
        description="Comma-separated name:sha256hex entries; none (and no file): auth off.",
    )
    api_keys_file: Path | None = Field(default=None, description="One name:sha256hex per line.")
    metrics_public: bool = Field(default=False, description="Serve /metrics without a key.")
    metrics_keys: str = Field(
        default="",
        description="Comma-separated key names (admin keys) that may read /metrics; others: 403.",
    )
    rate_limit_per_min: float = Field(
        default=300.0, ge=0, description="Submits per key per minute (GCRA in Redis); 0 = off."
    )
    rate_limit_burst: int | None = Field(
        default=None, ge=1, description="Submits a key may make at once; None = one minute's worth."
    )
    max_queued_per_key: int = Field(
        default=500, ge=0, description="Unfinished (queued + running) jobs per key; 0 = no cap."
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="HMAC key for webhook signatures; unset: webhook_url refused."
    )
    webhook_allow: str = Field(
        default="", description="Comma-separated CIDRs / hostnames exempt from the SSRF policy."
    )
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    webhook_max_attempts: int = Field(default=5, ge=1)
    webhook_backoff_s: float = Field(
        default=4.0, gt=0, description="Delay before retry n is backoff * 2**(n-1) (+-20% jitter)."
    )
    webhook_claim_idle_s: float = Field(
        default=30.0, gt=0, description="A delivery in flight this long is taken over (XAUTOCLAIM)."
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> Settings:
        """Refuse contradictory limits at start rather than at the first request."""
        if self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must not exceed max_steps")
        if self.worker_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("worker_ttl_s must exceed heartbeat_interval_s")
        if self.min_guidance > self.max_guidance:
            raise ValueError("min_guidance must not exceed max_guidance")
        if self.max_image_body_bytes < self.max_body_bytes:
            raise ValueError("max_image_body_bytes must not be below max_body_bytes")
        if self.webhook_claim_idle_s <= 2 * self.webhook_timeout_s:
            raise ValueError("webhook_claim_idle_s must exceed twice webhook_timeout_s")
        return self
