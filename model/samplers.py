"""Samplers as small pure functions over per-sample tensors (k-diffusion style, vectorised).

The per-sampler maths (planners and updates) lives in :mod:`model.sampler_rules`.

Each sampler has a planner, which turns (steps, schedule) into a per-evaluation coefficient
table reproducing one diffusers scheduler's trajectory (timestep spacing, first-order start,
lower-order final, second-order stages, multistep history), and a branch-free update applied
to a batch of rows, each with the coefficients of its own trajectory at its own position.
All state lives in `SampleState`: multistep/second-order history in `memory`, the random
stream in `generator` (copied before every draw, so `advance` never mutates its inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from model.host_threads import fill_normal
from model.sampler_rules import SAMPLER_RULES, Cols, Memory, Noise, Step
from model.schedules import (
    SD15_SCHEDULER_CONFIG,
    NoiseSchedule,
)

__all__ = [
    "SAMPLER_NAMES",
    "SD15_SCHEDULER_CONFIG",
    "NoiseSchedule",
    "SampleState",
    "Trajectory",
    "advance",
    "from_noise",
    "model_input",
    "plan",
    "start",
    "start_noised",
    "start_step",
]

Coefs = tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class Trajectory:
    """One image's sampling plan: what to feed the UNet and how to update, per evaluation."""

    sampler: str
    steps: int
    n_evals: int  # UNet evaluations (heun: 2 * steps - 1, pndm: steps + 1, as diffusers)
    init_sigma: float  # initial noise scale (diffusers' init_noise_sigma)
    timesteps: tuple[float, ...]  # (n_evals,) timestep passed to the UNet
    in_scale: tuple[float, ...]  # (n_evals,) UNet input = x / in_scale
    coefs: Coefs  # (n_evals, n_coef) update coefficients
    draws: tuple[bool, ...]  # (n_evals,) whether the update consumes fresh noise
    noise_ab: tuple[tuple[float, float], ...]  # (n_evals,) state before eval k = a·x0 + b·ε
    start: int = 0  # steps skipped (img2img / inpainting strength < 1)


@dataclass
class SampleState:
    """Where one image is: latent x (1, C, h, w) float32 before evaluation k, history, RNG."""

    x: Tensor
    k: int
    memory: Memory
    generator: torch.Generator


SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLER_RULES)
_RULES = list(dict.fromkeys(rule[1] for rule in SAMPLER_RULES.values()))
_RANKS = {name: _RULES.index(rule[1]) for name, rule in SAMPLER_RULES.items()}
_ORDER = {name: (_RANKS[name], i) for i, name in enumerate(SAMPLER_RULES)}


def rule_rank(sampler: str) -> int:
    """Samplers sharing an update rule share a rank (`advance` updates them as one group)."""
    return _RANKS[sampler]


def row_order(sampler: str) -> tuple[int, int]:
    """Where a row of `sampler` goes in a batch: by update rule, then by sampler, so that each
    rule's rows are one slice and, within it, the rows that draw noise (Euler ancestral, LCM)
    are consecutive (their noise term then needs no gather)."""
    return _ORDER[sampler]


def start_step(steps: int, strength: float | None) -> int:
    """Steps skipped at `strength` (diffusers' get_timesteps); ValueError if none would run."""
    if strength is None:
        return 0
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    skip = max(steps - min(int(steps * strength), steps), 0)
    if skip >= steps:
        raise ValueError(
            f"strength {strength} × steps {steps} leaves no step to run; "
            f"raise steps to at least {math.ceil(1 / strength)} or the strength"
        )
    return skip


@lru_cache(maxsize=256)
def plan(sampler: str, steps: int, schedule: NoiseSchedule, start: int = 0) -> Trajectory:
    """The trajectory `sampler` takes in `steps` steps from step `start` (cached: immutable)."""
    if sampler not in SAMPLER_RULES:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLER_NAMES)}")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {schedule.num_train_timesteps}, got {steps}")
    if not 0 <= start < steps:
        raise ValueError(f"start step {start} outside 0..{steps - 1}")
    table = SAMPLER_RULES[sampler][0](steps, schedule, start)
    n = len(table.coefs)
    return Trajectory(
        sampler=sampler,
        steps=steps,
        n_evals=n,
        init_sigma=table.init_sigma,
        timesteps=tuple(float(t) for t in table.timesteps),
        in_scale=tuple(table.in_scale) if table.in_scale is not None else (1.0,) * n,
        coefs=tuple(table.coefs),
        draws=tuple(table.draws) if table.draws is not None else (False,) * n,
        noise_ab=tuple(table.noise),
        start=start,
    )


def _fork(generator: torch.Generator) -> torch.Generator:
    """A copy of `generator` at the same position, so drawing leaves the original untouched."""
    fork = torch.Generator(device=generator.device)
    fork.set_state(generator.get_state())
    return fork


def start(
    traj: Trajectory,
    generator: torch.Generator,
    shape: tuple[int, int, int, int],
    device: torch.device | str,
) -> SampleState:
    """Initial state: randn(shape) from (a copy of) the image's generator × the initial sigma."""
    gen = _fork(generator)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32, device=gen.device).to(device)
    return from_noise(traj, noise, gen)


def from_noise(traj: Trajectory, noise: Tensor, generator: torch.Generator) -> SampleState:
    """Initial state of a full trajectory from drawn noise (txt2img; inpainting at strength 1)."""
    x = noise * torch.tensor(traj.init_sigma, dtype=torch.float32)
    memory = {key: torch.zeros_like(x) for key in SAMPLER_RULES[traj.sampler][2]}
    return SampleState(x=x, k=0, memory=memory, generator=generator)


def start_noised(
    traj: Trajectory, clean: Tensor, noise: Tensor, generator: torch.Generator
) -> SampleState:
    """Initial state from clean latents and drawn noise, as the scheduler's add_noise at the
    trajectory's first evaluation (img2img). `generator` continues from where it is: the
    caller drew the VAE posterior sample and `noise` from it already."""
    a, b = traj.noise_ab[0]
    x = (clean.float() * a + noise.float() * b).contiguous()
    memory = {key: torch.zeros_like(x) for key in SAMPLER_RULES[traj.sampler][2]}
    return SampleState(x=x, k=0, memory=memory, generator=generator)


def renoise(traj: Trajectory, k: int, clean: Tensor, noise: Tensor) -> Tensor:
    """What add_noise gives for the state before evaluation k; the clean latents past the end."""
    if k >= traj.n_evals:
        return clean
    a, b = traj.noise_ab[k]
    return clean * a + noise * b


def _check(traj: Trajectory, state: SampleState) -> None:
    if not 0 <= state.k < traj.n_evals:
        raise ValueError(
            f"{traj.sampler} state at evaluation {state.k} of {traj.n_evals}: nothing left to do"
        )


def _runs(parts: Sequence[Tensor]) -> list[Tensor]:
    """The rows as few (n, ...) tensors as possible without copying: maximal runs of rows that
    are consecutive rows of one tensor, as views (each step's states are slices of the last
    update's batch, so a group that keeps its composition is one run). Adjacency is read
    from data pointers; a run is kept only if its first and last rows share one storage."""
    runs: list[Tensor] = []
    i, n = 0, len(parts)
    while i < n:
        first, j = parts[i], i + 1
        if first.is_contiguous():
            ptr, size, shape = first.data_ptr(), first.numel() * first.element_size(), first.shape
            while (
                j < n
                and parts[j].data_ptr() == ptr + (j - i) * size
                and parts[j].shape == shape
                and parts[j].is_contiguous()
            ):
                j += 1
            if j - i > 1 and (
                parts[j - 1].untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            ):
                j = i + 1  # adjacent memory of two tensors: not one view
        runs.append(_rows_of(first, j - i))
        i = j
    return runs


def _rows_of(first: Tensor, n: int) -> Tensor:
    """`n` consecutive rows of `first`'s storage starting at `first` (a view)."""
    if n == 1:
        return first
    return first.as_strided((n * first.shape[0], *first.shape[1:]), first.stride(),
                            first.storage_offset())  # fmt: skip


def joined(parts: Sequence[Tensor]) -> Tensor:
    """The rows as one (B, ...) tensor: a view when they are consecutive rows of one tensor,
    else a copy (`torch.cat`)."""
    runs = _runs(parts)
    return runs[0] if len(runs) == 1 else torch.cat(runs)


def model_input(
    trajs: Sequence[Trajectory], states: Sequence[SampleState]
) -> tuple[Tensor, Tensor]:
    """UNet inputs for a batch: x_in (B, C, h, w) float32 and t (B,) float32, row by row; the
    input scaling writes straight into the batch (one pass, no separate gather)."""
    for traj, st in zip(trajs, states, strict=True):
        _check(traj, st)
    runs = _runs([st.x for st in states])
    scale = torch.tensor(
        [tr.in_scale[st.k] for tr, st in zip(trajs, states, strict=True)], dtype=torch.float32
    )
    t = torch.tensor(
        [tr.timesteps[st.k] for tr, st in zip(trajs, states, strict=True)], dtype=torch.float32
    )
    first = runs[0]
    scale = scale.to(first.device).view(-1, 1, 1, 1)
    if len(runs) == 1:
        return first / scale, t.to(first.device)
    x_in = torch.empty((len(states), *first.shape[1:]), dtype=first.dtype, device=first.device)
    at = 0
    for run in runs:
        n = run.shape[0]
        torch.div(run, scale[at : at + n], out=x_in[at : at + n])
        at += n
    return x_in, t.to(first.device)


def advance(
    trajs: Sequence[Trajectory],
    states: Sequence[SampleState],
    model_output: Tensor,
) -> list[SampleState]:
    """New states after one evaluation per row. Rows are grouped by update rule (DDIM, Euler,
    Euler ancestral and LCM share one) and each group is updated together; a group whose rows
    are consecutive in the batch reads its slice of the output without a copy, and may keep
    rows of `model_output` as history: it must not be overwritten afterwards. The step's
    noise is drawn first, for every group at once (`host_threads.fill_normal`)."""
    if not len(trajs) == len(states) == model_output.shape[0]:
        raise ValueError(
            f"{len(trajs)} trajectories, {len(states)} states, {model_output.shape[0]} outputs"
        )
    out_all = model_output.float()
    by_rule: dict[Step, list[int]] = {}
    for i, (traj, st) in enumerate(zip(trajs, states, strict=True)):
        _check(traj, st)
        by_rule.setdefault(SAMPLER_RULES[traj.sampler][1], []).append(i)
    groups = list(by_rule.items())
    gens = [st.generator for st in states]
    drawing = [  # per group: the positions of its rows that draw this step
        [j for j, i in enumerate(rows) if trajs[i].draws[states[i].k]] for _, rows in groups
    ]
    drawing_rows = [rows[j] for (_, rows), d in zip(groups, drawing, strict=True) for j in d]
    drawn = _draw(out_all, drawing_rows, states, gens)
    result: list[SampleState | None] = [None] * len(states)
    at = 0  # the group's first row in `drawn`: groups drew in order
    for (step, rows), draws in zip(groups, drawing, strict=True):
        keys = SAMPLER_RULES[trajs[rows[0]].sampler][2]
        x = joined([states[i].x for i in rows])  # (G, C, h, w)
        if rows == list(range(rows[0], rows[0] + len(rows))):
            out = out_all.narrow(0, rows[0], len(rows))
        else:
            out = out_all.index_select(0, torch.tensor(rows, device=out_all.device))
        host = [trajs[i].coefs[states[i].k] for i in rows]
        coef = torch.tensor(host, dtype=torch.float32).to(x.device)
        cols = Cols(list(coef.view(len(rows), -1, 1, 1, 1).unbind(1)), host)  # (G, 1, 1, 1) each
        mem = {key: joined([states[i].memory[key] for i in rows]) for key in keys}
        noise = _noise_term(draws, len(rows), drawn, at, x.device)
        at += len(draws)
        x_new, mem_new = step(x, out, mem, cols, noise)
        xs = x_new.split(1)  # row views in one call
        split = {key: v.split(1) for key, v in mem_new.items()}
        for j, i in enumerate(rows):
            memory = {key: v[j] for key, v in split.items()}
            result[i] = SampleState(x=xs[j], k=states[i].k + 1, memory=memory, generator=gens[i])
    return [st for st in result if st is not None]


def _draw(
    like: Tensor, drawing: list[int], states: Sequence[SampleState], gens: list[torch.Generator]
) -> Tensor | None:
    """One fresh noise row per drawing row (D, C, h, w), each from a copy of its own
    generator (the input state keeps its position; `gens` gets the copies), drawn where the
    generators live (`fill_normal`) and moved to the latents' device in one copy."""
    if not drawing:
        return None
    forks = [_fork(states[i].generator) for i in drawing]
    for i, gen in zip(drawing, forks, strict=True):
        gens[i] = gen
    drawn = torch.empty(
        (len(drawing), *like.shape[1:]), dtype=torch.float32, device=forks[0].device
    )
    fill_normal(drawn, forks)
    return drawn.to(like.device)


def _noise_term(
    draws: list[int], n: int, drawn: Tensor | None, at: int, device: torch.device
) -> Noise:
    """A group of `n` rows' noise term: which of its rows draw (None: all, a slice when
    consecutive, else their indices) and their noise, rows at..at+len(draws) of `drawn`;
    None when none does."""
    if not draws or drawn is None:
        return None
    noise = drawn[at : at + len(draws)]
    if len(draws) == n:
        return None, noise
    if draws[-1] - draws[0] == len(draws) - 1:
        return slice(draws[0], draws[-1] + 1), noise
    return torch.tensor(draws, device=device), noise
