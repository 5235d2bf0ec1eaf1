"""Continuous batching: batched equals solo, join mid-flight, cancel, shapes, limits, OOM."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from service.engine import Engine
from service.engine_types import GenerationRequest, JobHandle, JobState, Progress


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return load_pipeline("demo", device="cpu")


def solo(pipe: Pipeline, req: GenerationRequest) -> np.ndarray:
    images = pipe.generate(
        req.prompt,
        req.negative_prompt,
        req.width,
        req.height,
        req.steps,
        req.guidance_scale,
        req.sampler,
        req.seed,
        req.num_images,
    )
    return np.stack([np.asarray(im) for im in images])


def run_until_idle(engine: Engine, limit: int = 10_000) -> int:
    calls = 0
    while engine.step():
        calls += 1
        assert calls < limit
    engine.flush_callbacks()
    return calls


MIXED = [
    GenerationRequest("j0", "a red fox", steps=5, sampler="ddim", width=64, height=64, seed=1),
    GenerationRequest(
        "j1", "a blue whale", "ugly", steps=12, sampler="euler_a", seed=2, guidance_scale=1.0
    ),
    GenerationRequest("j2", "a castle", width=96, height=64, steps=8, sampler="heun", seed=3),
    GenerationRequest(
        "j3", "a red fox", steps=20, sampler="dpmpp_2m", width=64, height=64, seed=4, num_images=2
    ),
    GenerationRequest(
        "j4",
        "moss",
        width=96,
        height=64,
        steps=6,
        sampler="dpmpp_2m_karras",
        seed=5,
        guidance_scale=1.0,
    ),
    GenerationRequest(
        "j5", "a lantern", steps=10, sampler="pndm", width=64, height=64, seed=6, guidance_scale=3.0
    ),
    GenerationRequest(
        "j6", "rain", width=96, height=64, steps=4, sampler="lcm", seed=7, guidance_scale=1.0
    ),
    GenerationRequest("j7", "snow", steps=15, sampler="euler", width=64, height=64, seed=8),
    GenerationRequest("j8", "a red fox", width=96, height=64, steps=9, sampler="euler_a", seed=9),
]


def test_batched_equals_solo_with_staggered_mixed_jobs(demo: Pipeline) -> None:
    rows_seen: list[int] = []
    jobs_per_call: list[int] = []

    def on_batch(rows: int, jobs: int) -> None:
        rows_seen.append(rows)
        jobs_per_call.append(jobs)

    engine = Engine(demo, max_batch=10, on_batch=on_batch)
    handles: list[JobHandle] = []
    for i, req in enumerate(MIXED):
        handles.append(engine.submit(req))
        for _ in range(i % 3 + 1):  # staggered: some UNet calls between submissions
            engine.step()
    run_until_idle(engine)
    assert max(rows_seen) <= 10
    assert max(jobs_per_call) > 1, "jobs must share UNet calls"
    for handle, req in zip(handles, MIXED, strict=True):
        assert handle.state is JobState.DONE, (req.id, handle.error)
        got = np.stack(handle.images)
        expected = solo(demo, req)
        assert got.shape == expected.shape
        diff = np.abs(got.astype(int) - expected.astype(int)).max()
        assert diff <= 2, f"{req.id}: batched differs from solo by {diff}/255"


def test_job_joins_mid_flight(demo: Pipeline) -> None:
    events: list[tuple[str, int]] = []

    def record(handle: JobHandle, p: Progress) -> None:
        events.append((handle.id, p.step))

    engine = Engine(demo, max_batch=8)
    first = engine.submit(
        GenerationRequest("first", "a", steps=20, sampler="euler", width=64, height=64), record
    )
    for _ in range(5):
        engine.step()
    engine.flush_callbacks()
    assert events[-1] == ("first", 5)
    engine.submit(
        GenerationRequest("second", "b", steps=3, sampler="euler", width=64, height=64), record
    )
    engine.step()
    engine.flush_callbacks()
    assert ("second", 1) in events and not first.done(), (
        "the new job must take the very next UNet call"
    )
    run_until_idle(engine)
    assert events.index(("second", 1)) < events.index(("first", 20))


def test_cancel_frees_the_slot(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=2)
    a = engine.submit(GenerationRequest("a", "x", steps=30, width=64, height=64))  # guided: 2 rows
    b = engine.submit(GenerationRequest("b", "y", steps=2, width=64, height=64))
    engine.step()
    engine.flush_callbacks()
    assert a.progress.step == 1 and b.progress.step == 0 and engine.free_rows() == -2
    assert engine.cancel("a")
    run_until_idle(engine)
    assert a.state is JobState.CANCELED and not a.images
    assert b.state is JobState.DONE and len(b.images) == 1
    assert engine.free_rows() == 2
    assert not engine.cancel("a"), "an ended job cannot be canceled again"


def test_cancel_pending_job(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=2)
    engine.submit(GenerationRequest("a", "x", steps=3, width=64, height=64))
    b = engine.submit(GenerationRequest("b", "y", steps=3, width=64, height=64))
    assert engine.cancel("b")
    run_until_idle(engine)
    assert b.state is JobState.CANCELED


def test_other_shape_progresses_while_a_big_group_is_busy(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=16)
    big = [
        engine.submit(
            GenerationRequest(
                f"big{i}", "x", steps=20, guidance_scale=1.0, width=64, height=64, seed=i
            )
        )
        for i in range(12)
    ]
    small = engine.submit(
        GenerationRequest("odd", "y", steps=4, guidance_scale=1.0, width=128, height=64)
    )
    for _ in range(10):
        engine.step()
    engine.flush_callbacks()
    assert small.state is JobState.DONE
    assert all(not h.done() for h in big)
    run_until_idle(engine)


def test_max_batch_is_never_exceeded(demo: Pipeline) -> None:
    rows_seen: list[int] = []
    engine = Engine(demo, max_batch=5, on_batch=lambda rows, jobs: rows_seen.append(rows))
    handles = [
        engine.submit(
            GenerationRequest(
                f"j{i}",
                "x",
                steps=3 + i % 4,
                seed=i,
                width=64,
                height=64,
                guidance_scale=7.5 if i % 2 else 1.0,
                num_images=1 + i % 2,
            )
        )
        for i in range(10)
    ]
    while engine.step():
        assert engine.free_rows() >= -sum(h.request.rows for h in handles)
        with engine._cv:
            assert engine._active_rows <= 5
    engine.flush_callbacks()
    assert max(rows_seen) <= 5
    assert all(h.state is JobState.DONE for h in handles)


def test_too_big_or_invalid_jobs_are_refused(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=4)
    with pytest.raises(GenerationError, match="needs 6 UNet rows"):
        engine.submit(GenerationRequest("x", "p", num_images=3))
    with pytest.raises(GenerationError, match="unknown sampler"):
        engine.submit(GenerationRequest("x", "p", sampler="nope"))
    with pytest.raises(GenerationError, match="width must be a positive multiple of 8"):
        engine.submit(GenerationRequest("x", "p", width=70))


def test_out_of_memory_splits_the_batch_and_lowers_the_limit(
    demo: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = demo.unet_forward

    def limited(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, t, ctx)

    reqs = [GenerationRequest(f"j{i}", "x", steps=3, seed=i, width=64, height=64) for i in range(4)]
    expected = [solo(demo, r) for r in reqs]
    monkeypatch.setattr(demo, "unet_forward", limited)
    engine = Engine(demo, max_batch=8)
    handles = [engine.submit(r) for r in reqs]
    run_until_idle(engine)
    assert engine.call_rows <= 3
    for h, e in zip(handles, expected, strict=True):
        assert h.state is JobState.DONE
        assert np.abs(np.stack(h.images).astype(int) - e.astype(int)).max() <= 2


def test_threaded_driver_and_prompt_cache(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=8)
    engine.start()
    try:
        base = GenerationRequest("t0", "same prompt", steps=3, width=64, height=64)
        handles = []
        threads = [
            threading.Thread(
                target=lambda i=i: handles.append(engine.submit(replace(base, id=f"t{i}", seed=i)))
            )
            for i in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(h.wait(60) for h in handles)
        assert all(h.state is JobState.DONE for h in handles)
        assert len(engine.prompts) == 2  # "same prompt" and "" encoded once each
        assert engine.prompts.hits >= 10
    finally:
        engine.stop()
