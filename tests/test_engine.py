"""Continuous batching: batched equals solo (txt2img, img2img, inpainting), join mid-flight,
cancel, shapes, limits, out-of-memory handling, failures outside the UNet call."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from service.engine import Engine
from service.engine_types import GenerationRequest, JobHandle, JobState, StepOutput
from tests.test_pipeline_image_modes import hard_mask, source_image
from tests.tiny import demo_inpainting_pipeline


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return load_pipeline("demo", device="cpu")


def req(id: str, prompt: str = "x", **fields: Any) -> GenerationRequest:
    image, mask = fields.pop("image", None), fields.pop("mask", None)
    return GenerationRequest.of(id, image=image, mask=mask, prompt=prompt, **fields)


def solo(pipe: Pipeline, request: GenerationRequest) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe.generate(**request.generate_kwargs())])


def run_until_idle(engine: Engine) -> list[StepOutput]:
    return engine.run_until_idle(limit=10_000)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def assert_all_equal_solo(pipe: Pipeline, handles: list[JobHandle]) -> None:
    for handle in handles:
        assert handle.state is JobState.DONE, (handle.id, handle.error)
        got, expected = np.stack(handle.images), solo(pipe, handle.request)
        assert got.shape == expected.shape
        assert max_diff(got, expected) <= 2, f"{handle.id}: batched differs from solo"


MIXED = [
    req("j0", "a red fox", steps=5, sampler="ddim", width=64, height=64, seed=1),
    req("j1", "a blue whale", negative_prompt="ugly", steps=12, sampler="euler_a", seed=2,
        guidance_scale=1.0, width=128, height=128),
    req("j2", "a castle", width=96, height=64, steps=8, sampler="heun", seed=3),
    req("j3", "a red fox", steps=20, sampler="dpmpp_2m", width=64, height=64, seed=4, num_images=2),
    req("j4", "moss", width=96, height=64, steps=6, sampler="dpmpp_2m_karras", seed=5,
        guidance_scale=1.0),
    req("j5", "a lantern", steps=10, sampler="pndm", width=64, height=64, seed=6,
        guidance_scale=3.0),
    req("j6", "rain", width=96, height=64, steps=4, sampler="lcm", seed=7, guidance_scale=1.0),
    req("j7", "snow", steps=15, sampler="euler", width=64, height=64, seed=8),
    req("j8", "a red fox", width=96, height=64, steps=9, sampler="euler_a", seed=9),
]  # fmt: skip


def _staggered(
    engine: Engine, jobs: list[GenerationRequest]
) -> tuple[list[JobHandle], list[StepOutput]]:
    handles, outputs = [], []
    for i, job in enumerate(jobs):
        handles.append(engine.submit(job))
        for _ in range(i % 3 + 1):  # staggered: some UNet calls between submissions
            outputs.append(engine.step())
    return handles, outputs + run_until_idle(engine)


def test_batched_equals_solo_with_staggered_mixed_jobs(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=10)
    handles, outputs = _staggered(engine, MIXED)
    calls = [c for out in outputs for c in out.calls]
    assert max(rows for rows, _ in calls) <= 10
    assert max(jobs for _, jobs in calls) > 1, "jobs must share UNet calls"
    assert_all_equal_solo(demo, handles)
    assert sorted(h.id for out in outputs for h in out.ended) == sorted(r.id for r in MIXED)


def test_txt2img_and_img2img_share_calls_and_equal_solo(demo: Pipeline) -> None:
    image = source_image(64, 64)
    jobs = [
        req("t0", "a red fox", steps=6, sampler="ddim", width=64, height=64, seed=1),
        req("i0", "a red fox", image=image, strength=0.5, steps=8, sampler="euler_a", seed=2),
        req("i1", "a whale", image=image, strength=0.75, steps=7, sampler="heun", seed=3,
            num_images=2),
        req("t1", "moss", steps=5, sampler="dpmpp_2m", width=64, height=64, seed=4,
            guidance_scale=1.0),
        req("i2", "moss", image=image, steps=9, sampler="pndm", seed=5, guidance_scale=4.0),
        req("i3", "rain", image=image, strength=0.6, steps=6, sampler="dpmpp_2m", seed=6),
        req("b0", "a door", image=image, mask=hard_mask(64, 64), steps=6, sampler="euler", seed=7),
    ]  # fmt: skip
    engine = Engine(demo, max_batch=16)
    handles, outputs = _staggered(engine, jobs)
    jobs_per_call = [j for out in outputs for _, j in out.calls]
    assert max(jobs_per_call) >= 4, f"img2img and txt2img must share calls: {jobs_per_call}"
    assert_all_equal_solo(demo, handles)


def test_inpainting_jobs_share_calls_and_equal_solo() -> None:
    pipe = demo_inpainting_pipeline()
    assert pipe.capabilities.modes == ("inpaint",)
    image, mask = source_image(64, 64), hard_mask(64, 64)
    jobs = [
        req(f"p{i}", f"prompt {i}", image=image, mask=mask, strength=s, steps=st, sampler=sm,
            seed=i, keep_unmasked=i == 2)
        for i, (s, st, sm) in enumerate(
            [(1.0, 6, "ddim"), (0.7, 8, "euler_a"), (1.0, 5, "dpmpp_2m"), (0.5, 6, "pndm")]
        )
    ]  # fmt: skip
    engine = Engine(pipe, max_batch=16)
    handles, outputs = _staggered(engine, jobs)
    assert max(j for out in outputs for _, j in out.calls) >= 3
    assert_all_equal_solo(pipe, handles)
    with pytest.raises(GenerationError, match="cannot run txt2img") as err:
        engine.submit(req("t", width=64, height=64))
    assert err.value.field == "image"


def test_job_joins_mid_flight(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=8)
    first = engine.submit(req("first", "a", steps=20, sampler="euler", width=64, height=64))
    progress = [(h.id, p.step) for _ in range(5) for h, p in engine.step().progress]
    assert progress[-1] == ("first", 5)
    engine.submit(req("second", "b", steps=3, sampler="euler", width=64, height=64))
    seen = [(h.id, p.step) for h, p in engine.step().progress]
    assert ("second", 1) in seen and not first.done(), "the new job must take the next call"
    later = [(h.id, p.step) for out in run_until_idle(engine) for h, p in out.progress]
    assert later.index(("second", 3)) < later.index(("first", 20))


def test_cancel_frees_the_slot(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=2)
    a = engine.submit(req("a", "x", steps=30, width=64, height=64))  # guided: 2 rows
    b = engine.submit(req("b", "y", steps=2, width=64, height=64))
    engine.step()
    assert a.progress.step == 1 and b.progress.step == 0 and engine.free_rows() == -2
    assert engine.cancel("a")
    ended = [h for out in run_until_idle(engine) for h in out.ended]
    assert [h.id for h in ended] == ["a", "b"]
    assert a.state is JobState.CANCELED and not a.images
    assert b.state is JobState.DONE and len(b.images) == 1
    assert engine.free_rows() == 2
    assert not engine.cancel("a"), "an ended job cannot be canceled again"


def test_cancel_pending_job(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=2)
    engine.submit(req("a", "x", steps=3, width=64, height=64))
    b = engine.submit(req("b", "y", steps=3, width=64, height=64))
    assert engine.cancel("b")
    assert b.state is JobState.CANCELED
    assert b in engine.step().ended, "the next step reports the canceled job"
    run_until_idle(engine)


def test_other_shape_progresses_while_a_big_group_is_busy(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=16)
    big = [
        engine.submit(req(f"big{i}", steps=20, guidance_scale=1.0, width=64, height=64, seed=i))
        for i in range(12)
    ]
    small = engine.submit(req("odd", "y", steps=4, guidance_scale=1.0, width=128, height=64))
    for _ in range(10):
        engine.step()
    assert small.state is JobState.DONE
    assert all(not h.done() for h in big)
    run_until_idle(engine)


def test_max_batch_is_never_exceeded(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=5)
    handles = [
        engine.submit(
            req(
                f"j{i}",
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
    rows_seen = []
    while not all(h.done() for h in handles):
        out = engine.step()
        rows_seen += [rows for rows, _ in out.calls]
        with engine._lock:
            assert engine._active_rows <= 5
    assert max(rows_seen) <= 5
    assert all(h.state is JobState.DONE for h in handles)


def test_too_big_or_invalid_jobs_are_refused(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=4)
    cases = [
        ({"num_images": 3}, "needs 6 UNet rows", "num_images"),
        ({"width": 70}, "width must be a positive multiple of 8", "width"),
        ({"sampler": "lcm", "steps": 60}, "lcm supports at most 50 steps", "steps"),
        ({"mask": hard_mask()}, "needs an image", "mask"),
        ({"image": source_image(), "strength": 0.1, "steps": 4}, "leaves no step", "strength"),
    ]
    for fields, message, field in cases:
        with pytest.raises(GenerationError, match=message) as err:
            engine.submit(req("x", "p", **fields))
        assert err.value.field == field
    assert engine.idle()


def _limited_unet(demo: Pipeline, monkeypatch: pytest.MonkeyPatch, most: list[int]) -> None:
    """The UNet raises CUDA's out-of-memory error above `most[0]` rows (changeable)."""
    real = demo.unet_forward

    def limited(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if x.shape[0] > most[0]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, t, cond)

    monkeypatch.setattr(demo, "unet_forward", limited)


def test_out_of_memory_splits_the_batch_lowers_the_limit_then_grows_back(
    demo: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [req(f"j{i}", steps=3, seed=i, width=64, height=64) for i in range(4)]
    expected = [solo(demo, r) for r in jobs]
    most = [3]
    _limited_unet(demo, monkeypatch, most)
    engine = Engine(demo, max_batch=8, grow_after=4)
    handles = [engine.submit(r) for r in jobs]
    first = engine.step()
    assert first.calls and max(rows for rows, _ in first.calls) <= 3
    assert engine.call_rows < 8
    most[0] = 100  # memory frees up: the call size must not stay lowered for ever
    run_until_idle(engine)
    for h, e in zip(handles, expected, strict=True):
        assert h.state is JobState.DONE
        assert max_diff(np.stack(h.images), e) <= 2
    more = [engine.submit(req(f"k{i}", steps=12, seed=i, width=64, height=64)) for i in range(4)]
    outputs = run_until_idle(engine)
    assert engine.call_rows == 8, "call_rows grows back after a run of good calls"
    assert max(rows for out in outputs for rows, _ in out.calls) == 8
    assert all(h.state is JobState.DONE for h in more)


def test_out_of_memory_at_the_smallest_call_fails_that_job(
    demo: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One guided image needs two rows; a device that fits only one must fail the job with a
    clear error (it looped for ever when call_rows fell to 1 < 2)."""
    _limited_unet(demo, monkeypatch, [1])
    engine = Engine(demo, max_batch=4)
    guided = engine.submit(req("g", steps=3, width=64, height=64))
    plain = engine.submit(req("p", steps=3, width=64, height=64, guidance_scale=1.0))
    outputs = engine.run_until_idle(limit=50)
    assert guided.state is JobState.FAILED and "out of memory" in (guided.error or "")
    assert "64x64" in (guided.error or "")
    assert plain.state is JobState.DONE, plain.error
    assert guided in [h for out in outputs for h in out.ended]
    assert engine.free_rows() == 4


def test_failure_during_admission_fails_the_jobs_and_frees_their_rows(
    demo: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception outside the UNet call (the text encoder) used to leave jobs admitted,
    holding rows, never finished."""
    engine = Engine(demo, max_batch=6)

    def broken(prompts: Any, adapters: Any = None) -> Any:
        raise RuntimeError("text encoder exploded")

    monkeypatch.setattr(engine.prompts, "get_many", broken)
    a = engine.submit(req("a", "new prompt a", steps=3, width=64, height=64))
    b = engine.submit(req("b", "new prompt b", steps=3, width=64, height=64))
    out = engine.step()
    assert {h.id for h in out.ended} == {"a", "b"}
    assert a.state is b.state is JobState.FAILED and "text encoder exploded" in (a.error or "")
    assert engine.free_rows() == 6 and engine.idle()
    monkeypatch.undo()
    c = engine.submit(req("c", steps=2, width=64, height=64))
    run_until_idle(engine)
    assert c.state is JobState.DONE


def test_a_bad_job_at_admission_fails_alone(
    demo: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(demo, max_batch=8)
    real = demo.begin

    def begin(*args: Any, **kw: Any) -> Any:
        if kw["seed"] == 666:
            raise ValueError("corrupt input image")
        return real(*args, **kw)

    monkeypatch.setattr(demo, "begin", begin)
    bad = engine.submit(req("bad", steps=2, width=64, height=64, seed=666))
    good = engine.submit(req("good", steps=2, width=64, height=64, seed=1))
    run_until_idle(engine)
    assert bad.state is JobState.FAILED and "corrupt input image" in (bad.error or "")
    assert good.state is JobState.DONE and engine.free_rows() == 8


def test_threaded_submits_and_prompt_cache(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=8)
    handles: list[JobHandle] = []
    threads = [
        threading.Thread(
            target=lambda i=i: handles.append(
                engine.submit(req(f"t{i}", "same prompt", steps=3, width=64, height=64, seed=i))
            )
        )
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run_until_idle(engine)
    assert all(h.state is JobState.DONE for h in handles)
    assert len(engine.prompts) == 2  # "same prompt" and "" encoded once each
    assert engine.prompts.hits >= 10
