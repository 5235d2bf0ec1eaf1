"""The engine with long, weighted prompts and clip_skip: jobs whose text contexts differ in
length (77·k) run in the same steps, in one UNet call per length, and each equals its solo
`generate()` image; the prompt cache keeps clip_skip variants apart."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from service.engine import Engine
from service.engine_types import GenerationRequest, JobState

LONG = ", ".join(f"(word{i}:1.2) tree" for i in range(30))  # 3 chunks


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return load_pipeline("demo", device="cpu")


def req(id: str, prompt: str, **fields: Any) -> GenerationRequest:
    base = {"width": 64, "height": 64, "steps": 6, "sampler": "euler_a", "seed": 3}
    return GenerationRequest.of(id, prompt=prompt, **{**base, **fields})


def solo(pipe: Pipeline, request: GenerationRequest) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe.generate(**request.generate_kwargs())])


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


JOBS = [
    req("long", LONG, negative_prompt="blurry"),  # cond 3 chunks, uncond padded to 3
    req("short", "a red fox", seed=4, num_images=2),  # 1 chunk
    req("long-neg", "a castle", negative_prompt=LONG + " BREAK fog", seed=5),  # 4 chunks
    req("unguided", LONG + " BREAK sea", guidance_scale=1.0, seed=6),  # 4 chunks, no uncond
    req("skip", "a red fox", clip_skip=2, seed=4, num_images=2),  # same text, other layer
    req("weighted", "a (red:1.5) [fox]", seed=7),
]


def test_long_and_short_prompts_batched_equal_their_solo_images(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=16)
    handles = [engine.submit(job) for job in JOBS]
    outputs = engine.run_until_idle(limit=1000)
    for handle in handles:
        assert handle.state is JobState.DONE, (handle.id, handle.error)
        got, expected = np.stack(handle.images), solo(demo, handle.request)
        assert max_diff(got, expected) <= 2, f"{handle.id}: batched differs from solo"
    # Every step of the shared 64x64 group made one call per context length, and no more.
    lengths = {h.start.rows[0].cond.crossattn.shape[1] for h in handles}  # type: ignore[union-attr]
    assert len(lengths) >= 3 and min(lengths) == 77
    calls = [len(o.calls) for o in outputs if o.calls]
    assert calls[0] == len(lengths)
    assert sum(rows for o in outputs for rows, _ in o.calls) == 6 * sum(j.rows for j in JOBS)
    # The same text at clip_skip 2 is its own image, not the cached clip_skip 1 embedding.
    short, skip = (np.stack(h.images) for h in handles if h.id in ("short", "skip"))
    assert max_diff(short, skip) > 4
    assert engine.prompts.misses == len(
        {("blurry", 1), (LONG, 1), ("", 1), ("a red fox", 1), ("a castle", 1),
         (LONG + " BREAK fog", 1), (LONG + " BREAK sea", 1), ("a red fox", 2), ("", 2),
         ("a (red:1.5) [fox]", 1)}
    )  # fmt: skip


def test_a_long_prompt_joining_mid_flight_equals_its_solo_image(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=8)
    first = engine.submit(req("first", "a lighthouse", steps=10))
    for _ in range(3):
        engine.step()
    late = engine.submit(req("late", LONG, negative_prompt="(ugly:1.4)", steps=5, seed=9))
    engine.run_until_idle(limit=1000)
    for handle in (first, late):
        assert handle.state is JobState.DONE, (handle.id, handle.error)
        assert max_diff(np.stack(handle.images), solo(demo, handle.request)) <= 2


def test_clip_skip_beyond_the_text_encoder_is_refused_at_submit(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=4)
    with pytest.raises(GenerationError) as err:
        engine.submit(req("deep", "x", clip_skip=demo.text.layers + 1))
    assert err.value.field == "clip_skip"
