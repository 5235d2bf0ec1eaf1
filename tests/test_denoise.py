"""The batched step's bookkeeping: rows grouped by update rule, a group that keeps its rows
joined without copies at the next step, the batched conditioning reused while a call's rows
stay the same — and none of it changing a row's result."""

from __future__ import annotations

import torch

from model.conditioning import Conditioning
from model.denoise import ConditioningCache, Row, denoise_step
from model.samplers import NoiseSchedule, joined, plan, row_order, rule_rank, start

SHAPE = (1, 4, 6, 5)


def fake_unet(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """Depends on each row's input, timestep and text, never on other rows."""
    text = cond.crossattn.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return torch.tanh(x) * 0.5 + torch.sin(t.view(-1, 1, 1, 1) / 300.0) + text


def make_rows(samplers: list[str], first: int = 0) -> list[Row]:
    """Row i: its own seed, text and guidance scale."""
    schedule = NoiseSchedule.from_config(None)
    rows = []
    for i, name in enumerate(samplers, start=first):
        traj = plan(name, 6, schedule)
        state = start(traj, torch.Generator().manual_seed(i), SHAPE, "cpu")
        cond = Conditioning(torch.full((1, 3, 8), float(i)))
        rows.append(Row(traj, state, cond, cond.with_text(torch.zeros(1, 3, 8)), 3.0 + i))
    return rows


def run(rows: list[Row], cache: ConditioningCache | None) -> list[torch.Tensor]:
    """Step the unfinished rows together until all are done (samplers differ in length)."""
    while live := [r for r in rows if not r.finished]:
        for row, state in zip(live, denoise_step(fake_unet, live, cache), strict=True):
            row.state = state
    return [r.state.x for r in rows]


MIX = ["pndm", "ddim", "heun", "euler_a", "dpmpp_2m", "euler", "lcm", "dpmpp_2m_karras"]


def test_batched_rows_equal_solo_rows_with_and_without_the_cache() -> None:
    solo = [run(make_rows([name], i), None)[0] for i, name in enumerate(MIX)]
    cached = run(make_rows(MIX), ConditioningCache())
    plain = run(make_rows(MIX), None)
    for name, a, b, c in zip(MIX, solo, cached, plain, strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(b, c), name


def test_steady_state_rows_join_without_copies() -> None:
    rows = make_rows(["euler", "ddim", "euler_a", "heun", "heun"])
    assert rule_rank("euler") == rule_rank("ddim") == rule_rank("euler_a") != rule_rank("heun")
    for _ in range(2):
        for row, state in zip(rows, denoise_step(fake_unet, rows), strict=True):
            row.state = state
    for group in (rows[:3], rows[3:]):  # one update rule each: slices of one tensor
        group = sorted(group, key=lambda r: row_order(r.traj.sampler))  # the batch's order
        xs = [r.state.x for r in group]
        batch = joined(xs)
        assert batch.data_ptr() == xs[0].data_ptr() and batch.shape[0] == len(xs)
        assert torch.equal(batch, torch.cat(xs))
    mixed = [rows[0].state.x, rows[3].state.x]  # different tensors: a copy
    assert joined(mixed).data_ptr() not in {x.data_ptr() for x in mixed}


def test_cache_reuses_the_batch_while_the_rows_are_the_same() -> None:
    cache = ConditioningCache(size=2)
    a, b, c = (Conditioning(torch.full((1, 2, 4), float(i))) for i in range(3))
    first = cache.cat([a, b])
    assert cache.cat([a, b]) is first
    assert torch.equal(first.crossattn, torch.cat([a.crossattn, b.crossattn]))
    other = cache.cat([b, a])
    assert other is not first and torch.equal(other.crossattn[0], b.crossattn[0])
    cache.cat([c])  # evicts the least recently used ([a, b])
    assert cache.cat([a, b]) is not first


def test_drawing_rows_are_consecutive_within_their_rule() -> None:
    """Euler ancestral and LCM rows sit together inside the linear rule's slice, so their
    noise term is applied to one slice (no gather), and the result is still each row's solo
    result."""
    names = ["euler_a", "ddim", "lcm", "euler", "euler_a"]
    ordered = sorted(names, key=row_order)
    drawing = [i for i, n in enumerate(ordered) if n in ("euler_a", "lcm")]
    assert drawing == list(range(drawing[0], drawing[0] + len(drawing)))
    solo = [run(make_rows([name], i), None)[0] for i, name in enumerate(names)]
    batched = run(make_rows(names), None)
    for name, a, b in zip(names, solo, batched, strict=True):
        assert torch.equal(a, b), name
