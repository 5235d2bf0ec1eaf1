"""Call sizing: the cost model, the split it picks, the engine's calls and its admission wait."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from pydantic import ValidationError

from model import load_pipeline
from model.compiled import default_buckets
from model.pipeline import Pipeline
from service.call_cost import CallCosts, measure
from service.engine import Engine
from service.settings import PinnedCallCosts, Settings
from service.warm_up import warm_up
from tests.test_engine import max_diff, req, solo

# Seconds per call at 1, 2, 4, 8, 16 rows of 32x32 latents.
CPU_LIKE = CallCosts(((1, 1.0), (2, 1.9), (4, 3.6), (8, 8.0), (16, 20.0)), 32 * 32)  # best: 4
GPU_LIKE = CallCosts(((1, 1.0), (2, 1.1), (4, 1.3), (8, 1.8), (16, 2.9)), 32 * 32)  # best: 16


def test_estimates_interpolate_and_scale_with_pixels() -> None:
    assert CPU_LIKE.seconds(4, 1024) == pytest.approx(3.6)
    assert CPU_LIKE.seconds(6, 1024) == pytest.approx(5.8)  # between 4 and 8 rows
    assert CPU_LIKE.seconds(8, 256) == pytest.approx(1.9)  # 8 rows of 16x16 = 2 rows' work
    assert CPU_LIKE.seconds(32, 1024) == pytest.approx(44.0)  # past the end: last slope
    # the smallest size within 5% of the least time per row (0.90 s at 4 rows): 3 rows
    # (2.75 s, interpolated) on the CPU-like curve, 14 of 16 on the GPU-like one
    assert CPU_LIKE.efficient_rows(16, 1024) == 3 and GPU_LIKE.efficient_rows(16, 1024) == 14
    assert GPU_LIKE.efficient_rows(10, 1024) == 9  # within the limit (10 rows: 0.20 s per row)
    assert CPU_LIKE.efficient_rows(16, 1024, tolerance=0.0) == 4
    with pytest.raises(ValueError, match="increasing"):
        CallCosts(((2, 1.0), (1, 0.5)), 64)


def test_a_compiled_unets_calls_cost_their_bucket() -> None:
    """A compiled UNet pads 12 rows to its 16-row bucket: the estimate says so, and the split
    then prefers calls that fill buckets over one padded call."""
    linear = ((1, 1.0), (2, 2.0), (4, 4.0), (8, 8.0), (16, 16.0))
    eager = CallCosts(linear, 1024)
    compiled = CallCosts(linear, 1024, buckets=(1, 2, 4, 8, 16))
    assert eager.seconds(12, 1024) == pytest.approx(12.0)
    assert compiled.seconds(12, 1024) == pytest.approx(16.0)
    assert compiled.seconds(3, 1024) == pytest.approx(4.0)
    counts = compiled.split([1] * 12, 1024, 16)
    assert counts != [12] and all(n in (1, 2, 4, 8, 16) for n in counts), counts
    assert eager.split([1] * 12, 1024, 16) == [12]  # unpadded, one call is as cheap
    assert compiled.to_dict()["buckets"] == [1, 2, 4, 8, 16]


def test_split_minimises_estimated_time_and_keeps_samples_whole() -> None:
    assert CPU_LIKE.split([1] * 12, 1024, 16) == [4, 4, 4]
    assert GPU_LIKE.split([1] * 12, 1024, 16) == [12]
    assert GPU_LIKE.split([1] * 12, 1024, 5) == [4, 4, 4]  # the row limit is a bound
    # Guided samples take 2 rows each and never straddle two calls.
    assert CPU_LIKE.split([2] * 6, 1024, 16) == [2, 2, 2]
    assert sum(CPU_LIKE.split([2, 1, 2, 1, 2], 1024, 16)) == 5
    counts = CPU_LIKE.split([1] * 12, 1024, 16)
    exhaustive = min(
        (sum(CPU_LIKE.seconds(n, 1024) for n in split), split)
        for split in ([12], [6, 6], [4, 4, 4], [3, 3, 3, 3], [2] * 6, [1] * 12, [8, 4])
    )
    assert sum(CPU_LIKE.seconds(n, 1024) for n in counts) <= exhaustive[0] + 1e-9


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return load_pipeline("demo", device="cpu")


def test_measure_times_every_candidate_size(demo: Pipeline) -> None:
    costs = measure(demo, 8, side=64, budget_s=60)
    assert [w for w, _ in costs.points] == list(default_buckets(8)) == [1, 2, 4, 8]
    assert costs.pixels == 8 * 8 and all(s > 0 for _, s in costs.points)
    one = measure(demo, 8, side=64, budget_s=1e-9)  # the budget stops it after one size
    assert [w for w, _ in one.points] == [1]


def test_pinned_costs_replace_the_measurement(
    demo: Pipeline, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JSON a worker logs after measuring, set as LDMSERVE_CALL_COSTS, is the curve the
    next worker uses, without measuring; a curve that is not increasing is refused."""
    with caplog.at_level(logging.INFO, logger="service.call_cost"):
        measured = measure(demo, 4, side=64, budget_s=60)
    logged = next(r.getMessage() for r in caplog.records if "LDMSERVE_CALL_COSTS" in r.message)
    monkeypatch.setenv("LDMSERVE_CALL_COSTS", logged.split("LDMSERVE_CALL_COSTS='")[1][:-1])
    settings = Settings()
    assert settings.call_costs is not None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="service.call_cost"):
        assert warm_up(demo, settings) == measured  # same points and pixels, no buckets
    assert [r.message for r in caplog.records if "UNet call costs" in r.message] == [
        f"UNet call costs pinned at 64 latent pixels: {list(measured.points)}"
    ]  # nothing measured
    assert warm_up(demo, Settings(call_sizing=False)) is None  # sizing off wins
    bad = Settings(call_costs=PinnedCallCosts(pixels=64, points=[(2, 1.0), (1, 0.5)]))
    with pytest.raises(ValueError, match="increasing"):
        warm_up(demo, bad)
    with pytest.raises(ValidationError):
        Settings(call_costs={"pixels": 64, "points": [[1, -1.0]]})


def test_engine_calls_follow_the_split_and_images_stay_solo(demo: Pipeline) -> None:
    """On a GPU-like curve the whole group shares its calls."""
    engine = Engine(demo, max_batch=16, call_costs=GPU_LIKE)
    jobs = [req(f"j{i}", f"p{i}", steps=3, sampler="ddim", width=256, height=256, seed=i,
                guidance_scale=1.0) for i in range(6)]  # fmt: skip
    handles = [engine.submit(j) for j in jobs]
    outs = engine.run_until_idle()
    first = next(o for o in outs if o.calls)
    assert [rows for rows, _ in first.calls] == [6]  # one call: rows are nearly free
    for handle in handles:
        assert max_diff(np.stack(handle.images), solo(demo, handle.request)) <= 2


def test_on_a_linear_curve_the_jobs_closest_to_their_end_go_first(demo: Pipeline) -> None:
    """CPU-like costs (time about linear in rows): advancing every job in every step would
    stretch the short jobs over the long ones' rows, so a step advances the jobs with the
    fewest evaluations left; the short jobs leave first; the images stay the solo ones."""
    engine = Engine(demo, max_batch=16, call_costs=CPU_LIKE)
    steps = [6, 2, 6, 2, 6, 2, 6, 2]  # interleaved arrivals of two settings groups
    handles = []
    for i, n in enumerate(steps):
        job = req(f"j{i}", f"p{i}", steps=n, sampler="euler", width=256, height=256, seed=i,
                  guidance_scale=1.0)  # fmt: skip
        handles.append(engine.submit(job))
    outs = engine.run_until_idle()
    ended = [h.id for o in outs for h in o.ended]
    assert set(ended[:4]) == {"j1", "j3", "j5", "j7"}  # the short ones leave first
    calls = [rows for o in outs for rows, _ in o.calls]
    assert max(calls) <= 3 and sum(calls) == 4 * 2 + 4 * 6  # every evaluation, none twice
    first = next(o for o in outs if o.calls)
    advanced = {p[0].id for p in first.progress}  # only the advanced samples report
    assert {"j1", "j3", "j5", "j7"} <= advanced and len(advanced) < len(steps)
    for handle in handles:
        assert max_diff(np.stack(handle.images), solo(demo, handle.request)) <= 2


def test_waiting_jobs_age_so_none_starves(demo: Pipeline) -> None:
    """A long job left out while shorter ones keep coming gains a step of priority per step
    it waits, so it is advanced long before the stream of short jobs ends."""
    engine = Engine(demo, max_batch=16, call_costs=CPU_LIKE)
    long = engine.submit(req("long", "l", steps=8, sampler="euler", width=256, height=256,
                             guidance_scale=1.0))  # fmt: skip
    advanced_at = None
    for i in range(40):
        if engine.free_rows() >= 3:
            for j in range(3):
                engine.submit(req(f"s{i}.{j}", "s", steps=2, sampler="euler", width=256,
                                  height=256, seed=j, guidance_scale=1.0))  # fmt: skip
        out = engine.step()
        if advanced_at is None and any(job is long for job, _ in out.progress):
            advanced_at = i
    # left out at first (shorter jobs go first), then in well before the stream ends (12 here)
    assert advanced_at is not None and 0 < advanced_at <= 16, advanced_at
    assert long.done()


def test_idle_engine_gathers_jobs_for_at_most_one_call(demo: Pipeline) -> None:
    slow = CallCosts(((1, 0.4), (4, 1.0), (8, 2.4)), 32 * 32)  # 1 row: 0.4 s; best: 4 rows
    engine = Engine(demo, max_batch=8, call_costs=slow, admission_wait_s=10.0)
    first = engine.submit(req("a", "x", steps=2, width=256, height=256, guidance_scale=1.0))
    out = engine.step()
    assert not out.calls and 0 < out.wait_s <= 0.4  # gathering, for one call's time at most
    engine.submit(req("b", "y", steps=2, width=256, height=256, guidance_scale=1.0, seed=1))
    out = engine.step()
    assert not out.calls  # 2 rows < 4: still gathering
    time.sleep(out.wait_s)
    out = engine.step()
    assert out.calls == [(2, 2)]  # both start in one call once the wait has passed
    engine.run_until_idle()
    assert first.done()
    # No wait when what is pending already fills the best call, or with the bound at 0.
    quick = Engine(demo, max_batch=8, call_costs=slow, admission_wait_s=10.0)
    quick.submit(req("c", "x", steps=2, width=256, height=256, num_images=4, guidance_scale=1.0))
    assert quick.step().calls == [(4, 1)]
    off = Engine(demo, max_batch=8, call_costs=slow, admission_wait_s=0.0)
    off.submit(req("d", "x", steps=2, width=256, height=256, guidance_scale=1.0))
    assert off.step().calls == [(1, 1)]


def test_the_measured_sd15_cpu_curve_runs_the_short_group_first(demo: Pipeline) -> None:
    """The curve a worker measured for SD 1.5 at 256² on the 2-core CPU (eager, 20 s budget:
    1, 2 and 4 rows, larger calls extrapolated) is sublinear, yet running 12 CFG rows
    together saves less than it costs the short jobs in waiting: bench/engine.py's burst of
    three 2-step and three 4-step jobs starts with the short ones (and at most one other)."""
    measured = CallCosts(((1, 1.293), (2, 1.995), (4, 3.275)), 32 * 32)
    engine = Engine(demo, max_batch=16, call_costs=measured)
    for i, n in enumerate([4, 2, 4, 2, 4, 2]):
        engine.submit(req(f"j{i}", f"p{i}", steps=n, sampler="ddim", width=256, height=256,
                          seed=i))  # fmt: skip
    first = next(o for o in iter(engine.step, None) if o.calls)
    advanced = {p[0].id for p in first.progress}
    assert {"j1", "j3", "j5"} <= advanced and len(advanced) <= 4  # at most one long one joins
    engine.run_until_idle()
