"""Admitted jobs into started pipeline rows: adapters installed, prompts embedded (one batch
for all new jobs, through the engine's prompt cache), images prepared (`Pipeline.begin`).

Anything failing here (an adapter file, the text encoder, the VAE encoder, a bad image) fails
only the jobs it concerns, with a message saying what failed; the engine then releases their
rows, so no job is left holding rows unfinished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from model.lora_files import LoraError
from model.lora_library import PendingAdapters
from model.pipeline import Pipeline
from model.text_conditioning import pad_texts
from service.engine_types import JobHandle
from service.prompt_cache import PromptCache, prompt_key

log = logging.getLogger(__name__)

Failed = Callable[[JobHandle, str], None]


def start_jobs(
    pipeline: Pipeline,
    prompts: PromptCache,
    handles: Sequence[JobHandle],
    adapter_reads: Callable[[JobHandle], PendingAdapters | None],
    failed: Failed,
) -> list[JobHandle]:
    """Set `handle.start` for each job that can start and return those jobs, in order;
    `failed(handle, message)` for each that cannot."""
    adapters = {}
    for handle in handles:  # a missing or corrupt adapter fails only the job naming it
        load = adapter_reads(handle)
        try:  # read already: installing the layers here, between UNet calls, is cheap
            adapters[handle.id] = load.adapter_set() if load is not None else ()
        except LoraError as exc:
            failed(handle, str(exc))
        except Exception as exc:
            log.exception("job %s: reading its LoRA adapters failed", handle.id)
            failed(handle, f"LoRA load failed: {type(exc).__name__}: {exc}")
    handles = [h for h in handles if h.id in adapters]
    keys = [
        key
        for p in (h.request.params for h in handles)
        for key in (
            prompt_key(p.prompt, p.clip_skip, p.prompt_2),
            prompt_key(p.negative_prompt, p.clip_skip, p.negative_prompt_2),
            prompt_key("", p.clip_skip),  # padding chunks
        )
    ]
    try:
        sets = [adapters[h.id] for h in handles for _ in range(3)]
        embeddings = iter(prompts.get_many(keys, sets))
    except Exception as exc:
        log.exception("encoding prompts failed for %d jobs", len(handles))
        for handle in handles:
            failed(handle, f"text encoder failed: {type(exc).__name__}: {exc}")
        return []
    started = []
    for handle in handles:
        cond, uncond, empty = next(embeddings), next(embeddings), next(embeddings)
        req, p = handle.request, handle.request.params
        if req.guided:  # CFG's rows of one job share a length, as in generate()
            cond, uncond = pad_texts([cond, uncond], empty)
            uncond = pipeline.unconditional(p.negative_prompt, cond, uncond)
        try:
            handle.start = pipeline.begin(
                cond, uncond if req.guided else None, width=p.width, height=p.height,  # type: ignore[arg-type]
                steps=p.steps, guidance_scale=p.guidance_scale, sampler=p.sampler,
                seed=p.seed or 0, num_images=p.num_images, image=req.image, mask=req.mask,
                strength=p.strength, keep_unmasked=p.keep_unmasked,
                adapters=adapters[handle.id],
                aesthetic_score=p.aesthetic_score,
                negative_aesthetic_score=p.negative_aesthetic_score,
                noise_level=p.noise_level,
            )  # fmt: skip
        except Exception as exc:
            log.exception("job %s could not start", handle.id)
            failed(handle, f"could not start: {type(exc).__name__}: {exc}")
            continue
        started.append(handle)
    return started
