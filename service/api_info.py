"""The native routes that describe the service: models, LoRA adapters and samplers on
offer, liveness and readiness probes, Prometheus metrics.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from service.api_deps import ERROR_RESPONSES, QueueDep, SettingsDep
from service.api_errors import ApiError
from service.contract import DEFAULT_SAMPLER, SAMPLER_NAMES
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.metrics import render as render_metrics
from service.metrics import snapshot as metrics_snapshot
from service.schemas import LoraInfo, LoraList, ModelInfo, ModelList, SamplerList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(queue: QueueDep, settings: SettingsDep) -> ModelList:
    """The default model and every model a live worker serves."""
    workers = await queue.live_workers()
    names = sorted({settings.model, *(w.model for w in workers)})
    models = []
    for name in names:
        serving = [w for w in workers if w.model == name]
        models.append(
            ModelInfo(
                id=name,
                default=name == settings.model,
                workers=len(serving),
                max_batch=sum(w.max_batch for w in serving),
                devices=sorted({w.device for w in serving}),
                queued=await queue.queue_depth(name),
                capabilities=await queue.capabilities(name),
            )
        )
    return ModelList(models=models)


@router.get("/v1/loras", response_model=LoraList, responses=ERROR_RESPONSES)
async def list_loras(queue: QueueDep, settings: SettingsDep) -> LoraList:
    """The LoRA adapters (`loras[].name`) the served models' workers last published."""
    names = sorted({settings.model, *(w.model for w in await queue.live_workers())})
    models: dict[str, list[str]] = {}
    for model in names:
        caps = await queue.capabilities(model) or {}
        for lora in caps.get("loras", []):
            models.setdefault(lora, []).append(model)
    return LoraList(loras=[LoraInfo(name=n, models=m) for n, m in sorted(models.items())])


@router.get("/v1/samplers", response_model=SamplerList)
async def list_samplers() -> SamplerList:
    """Sampler names accepted in ``sampler``."""
    return SamplerList(samplers=list(SAMPLER_NAMES), default=DEFAULT_SAMPLER)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (no dependency checked: for liveness probes)."""
    return {"status": "ok"}


@router.get("/readyz", responses=ERROR_RESPONSES)
async def readyz(queue: QueueDep, settings: SettingsDep) -> dict[str, Any]:
    """Ready when Redis answers and at least one worker heart-beats."""
    await queue.ping()
    workers = await queue.live_workers()
    if not workers:
        retry = {"Retry-After": str(settings.redis_retry_after_s)}
        raise ApiError(503, "no_workers", "no live worker is connected", headers=retry)
    return {"status": "ready", "workers": len(workers)}


@router.get("/metrics", response_class=Response)
async def metrics(queue: QueueDep) -> Response:
    """Prometheus text format."""
    return Response(render_metrics(await metrics_snapshot(queue)), media_type=METRICS_CONTENT_TYPE)
