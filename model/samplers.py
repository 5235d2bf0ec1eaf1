"""Samplers as small pure functions over per-sample tensors (k-diffusion style, vectorised).

Each sampler has a planner, which turns (steps, schedule) into a per-evaluation coefficient
table reproducing one diffusers scheduler's trajectory (timestep spacing, first-order start,
lower-order final, second-order stages, multistep history), and a branch-free update applied
to a batch of rows, each with the coefficients of its own trajectory at its own position.
All state lives in `SampleState`: multistep/second-order history in `memory`, the random
stream in `generator` (copied before every draw, so `advance` never mutates its inputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
import torch
from torch import Tensor

from model.schedules import (
    SD15_SCHEDULER_CONFIG,
    NoiseSchedule,
    dpm_grid,
    spaced_timesteps,
    ve_grid,
)

__all__ = [
    "SAMPLER_NAMES",
    "SD15_SCHEDULER_CONFIG",
    "NoiseSchedule",
    "SampleState",
    "Trajectory",
    "advance",
    "model_input",
    "plan",
    "start",
]

Memory = dict[str, Tensor]
Coefs = tuple[tuple[float, ...], ...]
Cols = list[Tensor]  # one (G, 1, 1, 1) coefficient column per name, gathered row by row
Update = tuple[Tensor, Memory]


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


@dataclass
class SampleState:
    """Where one image is: latent x (1, C, h, w) float32 before evaluation k, history, RNG."""

    x: Tensor
    k: int
    memory: Memory
    generator: torch.Generator


@dataclass(frozen=True)
class _Table:
    """What a planner returns; plan() wraps it into a Trajectory."""

    timesteps: Sequence[float]
    coefs: list[tuple[float, ...]]
    in_scale: Sequence[float] | None = None  # None: unscaled input
    init_sigma: float = 1.0
    draws: Sequence[bool] | None = None  # None: never draws noise


def _x0_vp(a: float, v: bool) -> tuple[float, float]:
    """(cx, co) with x0 = cx·x + co·out at ᾱ = a, for variance-preserving latents."""
    sa, sb = math.sqrt(a), math.sqrt(1 - a)
    return (sa, -sb) if v else (1 / sa, -sb / sa)


def _x0_ve(s: float, v: bool) -> tuple[float, float]:
    """(cx, co) with x0 = cx·x + co·out at sigma s, for variance-exploding (x/ᾱ^½) latents."""
    return (1 / (s * s + 1), -s / math.sqrt(s * s + 1)) if v else (1.0, -s)


def _plan_ddim(steps: int, sched: NoiseSchedule) -> _Table:
    """DDIMScheduler, eta = 0."""
    ts = spaced_timesteps(
        sched.spacing("leading"), steps, sched.num_train_timesteps, sched.steps_offset, integer=True
    )
    ratio, rows = sched.num_train_timesteps // steps, []
    for t in ts.tolist():
        a, ap = sched.alphas_cumprod[t], sched.alpha_at(t - ratio, default_one=True)
        ex, eo = (math.sqrt(1 - a), math.sqrt(a)) if sched.v_prediction else (0.0, 1.0)
        rows.append((*_x0_vp(a, sched.v_prediction), ex, eo, math.sqrt(ap), math.sqrt(1 - ap)))
    return _Table(ts.tolist(), rows)


def _step_ddim(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """Denoising Diffusion Implicit Models (Song et al. 2021), deterministic (eta = 0)."""
    x0x, x0o, ex, eo, a_prev, s_prev = c
    x0 = x0x * x + x0o * out
    eps = ex * x + eo * out
    return a_prev * x0 + s_prev * eps, mem


def _plan_euler(steps: int, sched: NoiseSchedule) -> _Table:
    """EulerDiscreteScheduler (s_churn = 0)."""
    ts, sig, init = ve_grid(sched, steps)
    s, sn = sig[:-1].tolist(), sig[1:].tolist()
    rows = [(*_x0_ve(a, sched.v_prediction), a, b - a) for a, b in zip(s, sn, strict=True)]
    return _Table(ts.tolist(), rows, [math.sqrt(a * a + 1) for a in s], init)


def _step_euler(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """Euler step of the probability-flow ODE (Karras et al. 2022, Algorithm 1)."""
    x0x, x0o, sigma, dt = c
    d = (x - (x0x * x + x0o * out)) / sigma
    return x + d * dt, mem


def _plan_euler_a(steps: int, sched: NoiseSchedule) -> _Table:
    """EulerAncestralDiscreteScheduler: noise is drawn at every step, the last one included."""
    ts, sig, init = ve_grid(sched, steps)
    rows = []
    for a, b in zip(sig[:-1].tolist(), sig[1:].tolist(), strict=True):
        up = math.sqrt(b * b * (a * a - b * b) / (a * a))
        down = math.sqrt(b * b - up * up)
        rows.append((*_x0_ve(a, sched.v_prediction), a, down - a, up))
    return _Table(
        ts.tolist(),
        rows,
        [math.sqrt(a * a + 1) for a in sig[:-1].tolist()],
        init,
        [True] * len(rows),
    )


def _step_euler_a(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """Euler ancestral step: deterministic to sigma_down, then noise up (Karras et al. 2022)."""
    x0x, x0o, sigma, dt, sigma_up = c
    d = (x - (x0x * x + x0o * out)) / sigma
    return x + d * dt + noise * sigma_up, mem


def _plan_heun(steps: int, sched: NoiseSchedule) -> _Table:
    """HeunDiscreteScheduler: Euler predictor then trapezoid corrector; the last step is Euler."""
    ts, sig, init = ve_grid(sched, steps)
    hs = [sig[0], *np.repeat(sig[1:-1], 2), sig[-1]]  # (2 * steps,) sigma per stage
    hts = [ts[0], *np.repeat(ts[1:], 2)]  # (2 * steps - 1,)
    rows = []
    for k in range(len(hts)):
        first = k % 2 == 0
        s, sn = (float(hs[k]), float(hs[k + 1])) if first else (float(hs[k - 1]), float(hs[k]))
        s_in = s if first else sn
        rows.append((*_x0_ve(s_in, sched.v_prediction), s_in, sn - s, float(first)))
    return _Table(
        [float(t) for t in hts], rows, [math.sqrt(float(s) ** 2 + 1) for s in hs[:-1]], init
    )


def _step_heun(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); first ∈ {0, 1} picks the stage."""
    x0x, x0o, sigma, dt, first = c
    d = (x - (x0x * x + x0o * out)) / sigma
    base = first * x + (1 - first) * mem["x_prev"]
    slope = first * d + (1 - first) * ((mem["d_prev"] + d) / 2)
    return base + slope * dt, {"x_prev": x, "d_prev": d}


def _plan_dpm(steps: int, sched: NoiseSchedule, karras: bool) -> _Table:
    """DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint): 1st order first and last."""
    ts, sig = dpm_grid(sched, steps, karras)

    def alpha_sigma_lambda(s: float) -> tuple[float, float, float]:
        a = 1 / math.sqrt(s * s + 1)
        return a, s * a, (math.log(a) - math.log(s * a)) if s > 0 else math.inf

    rows = []
    for i in range(len(ts)):
        a0, s0, l0 = alpha_sigma_lambda(sig[i])
        at, st, lt = alpha_sigma_lambda(sig[i + 1])
        w = -at * math.expm1(l0 - lt) if st > 0 else 1.0  # weight of x0 in the 1st-order step
        second = 0 < i < len(ts) - 1  # else 1st order: warm-up and lower_order_final
        r = (l0 - alpha_sigma_lambda(sig[i - 1])[2]) / (lt - l0) if second else math.inf
        rows.append(
            (*_x0_vp(a0 * a0, sched.v_prediction), st / s0, w * (1 + 0.5 / r), -w * 0.5 / r)
        )
    return _Table([float(t) for t in ts], rows)


def _step_dpmpp_2m(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """DPM-Solver++(2M) multistep update in data-prediction form (Lu et al. 2022)."""
    x0x, x0o, cx, c0, c1 = c
    x0 = x0x * x + x0o * out
    return cx * x + c0 * x0 + c1 * mem["x0_prev"], {"x0_prev": x0}


def _plan_lcm(steps: int, sched: NoiseSchedule) -> _Table:
    """LCMScheduler: a subset of the distillation grid; fresh noise after every step but the last."""
    orig = sched.original_inference_steps
    if steps > orig:
        raise ValueError(
            f"lcm supports at most {orig} steps (original_inference_steps), got {steps}"
        )
    grid = (np.arange(1, orig + 1) * (sched.num_train_timesteps // orig) - 1)[::-1]
    ts = grid[np.floor(np.linspace(0, orig, num=steps, endpoint=False)).astype(np.int64)].tolist()
    rows = []
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        a, ap = sched.alphas_cumprod[t], sched.alphas_cumprod[t if last else ts[i + 1]]
        st = t * sched.timestep_scaling
        c_skip, c_out = 0.25 / (st * st + 0.25), st / math.sqrt(st * st + 0.25)  # sigma_data = 0.5
        keep, fresh = (1.0, 0.0) if last else (math.sqrt(ap), math.sqrt(1 - ap))
        rows.append((*_x0_vp(a, sched.v_prediction), c_out, c_skip, keep, fresh))
    return _Table([float(t) for t in ts], rows, draws=[i < len(ts) - 1 for i in range(len(ts))])


def _step_lcm(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1)."""
    x0x, x0o, c_out, c_skip, keep, fresh = c
    denoised = c_out * (x0x * x + x0o * out) + c_skip * x
    return keep * denoised + fresh * noise, mem


# Weights of (current output, then the 3 previous pushed outputs) at evaluation c: Euler, the
# pseudo-Heun average (c = 1 re-uses the start latent), then Adams–Bashforth of order 2, 3, 4.
_PLMS_WEIGHTS = (
    (1.0, 0.0, 0.0, 0.0),
    (0.5, 0.5, 0.0, 0.0),
    (1.5, -0.5, 0.0, 0.0),
    (23 / 12, -16 / 12, 5 / 12, 0.0),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def _plan_pndm(steps: int, sched: NoiseSchedule) -> _Table:
    """PNDMScheduler with skip_prk_steps: a 2-evaluation pseudo-Heun start, then PLMS."""
    n = sched.num_train_timesteps
    desc = spaced_timesteps(sched.spacing("leading"), steps, n, sched.steps_offset, integer=True)
    ts = [int(desc[0]), *desc[1:2].tolist(), *desc[1:].tolist()]  # 2nd timestep evaluated twice
    ratio, rows = n // steps, []
    for c, t in enumerate(ts):
        t_from, t_to = (t + ratio, t) if c == 1 else (t, t - ratio)
        a, ap = sched.alphas_cumprod[t_from], sched.alpha_at(t_to, default_one=False)
        w = _PLMS_WEIGHTS[min(c, 4)]
        ex, eo = (math.sqrt(1 - a), math.sqrt(a)) if sched.v_prediction else (0.0, 1.0)
        gain = (ap - a) / (a * math.sqrt(1 - ap) + math.sqrt(a * (1 - a) * ap))
        rows.append((float(c != 1), *w, float(c != 1), ex, eo, math.sqrt(ap / a), gain))
    return _Table([float(t) for t in ts], rows)


def _step_pndm(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """Pseudo linear multistep (PLMS) update (Liu et al. 2022, PNDM); push ∈ {0, 1} keeps history."""
    from_x, w0, w1, w2, w3, push, ex, eo, keep, gain = c
    e1, e2, e3 = mem["e1"], mem["e2"], mem["e3"]
    base = from_x * x + (1 - from_x) * mem["x_start"]
    combo = w0 * out + w1 * e1 + w2 * e2 + w3 * e3
    eps = ex * base + eo * combo
    new = {
        "e1": push * out + (1 - push) * e1,
        "e2": push * e1 + (1 - push) * e2,
        "e3": push * e2 + (1 - push) * e3,
        "x_start": base,
    }
    return keep * base - gain * eps, new


Step = Callable[[Tensor, Tensor, Memory, Cols, Tensor], Update]
_SAMPLERS: dict[str, tuple[Callable[[int, NoiseSchedule], _Table], Step, tuple[str, ...]]] = {
    "ddim": (_plan_ddim, _step_ddim, ()),
    "euler": (_plan_euler, _step_euler, ()),
    "euler_a": (_plan_euler_a, _step_euler_a, ()),
    "heun": (_plan_heun, _step_heun, ("x_prev", "d_prev")),
    "dpmpp_2m": (partial(_plan_dpm, karras=False), _step_dpmpp_2m, ("x0_prev",)),
    "dpmpp_2m_karras": (partial(_plan_dpm, karras=True), _step_dpmpp_2m, ("x0_prev",)),
    "lcm": (_plan_lcm, _step_lcm, ()),
    "pndm": (_plan_pndm, _step_pndm, ("e1", "e2", "e3", "x_start")),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(_SAMPLERS)


@lru_cache(maxsize=256)
def plan(sampler: str, steps: int, schedule: NoiseSchedule) -> Trajectory:
    """The trajectory `sampler` takes in `steps` steps (cached: trajectories are immutable)."""
    if sampler not in _SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLER_NAMES)}")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {schedule.num_train_timesteps}, got {steps}")
    table = _SAMPLERS[sampler][0](steps, schedule)
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
    x = noise * torch.tensor(traj.init_sigma, dtype=torch.float32)
    memory = {key: torch.zeros_like(x) for key in _SAMPLERS[traj.sampler][2]}
    return SampleState(x=x, k=0, memory=memory, generator=gen)


def _check(traj: Trajectory, state: SampleState) -> None:
    if not 0 <= state.k < traj.n_evals:
        raise ValueError(
            f"{traj.sampler} state at evaluation {state.k} of {traj.n_evals}: nothing left to do"
        )


def model_input(
    trajs: Sequence[Trajectory], states: Sequence[SampleState]
) -> tuple[Tensor, Tensor]:
    """UNet inputs for a batch: x_in (B, C, h, w) float32 and t (B,) float32, row by row."""
    for traj, st in zip(trajs, states, strict=True):
        _check(traj, st)
    x = torch.cat([st.x for st in states])  # (B, C, h, w)
    scale = torch.tensor(
        [tr.in_scale[st.k] for tr, st in zip(trajs, states, strict=True)], dtype=torch.float32
    )
    t = torch.tensor(
        [tr.timesteps[st.k] for tr, st in zip(trajs, states, strict=True)], dtype=torch.float32
    )
    return x / scale.to(x.device).view(-1, 1, 1, 1), t.to(x.device)


def _noise(
    trajs: Sequence[Trajectory], states: Sequence[SampleState], x: Tensor
) -> tuple[Tensor, list[torch.Generator]]:
    """Per-row noise (G, C, h, w) from each row's own generator where its step draws, else 0."""
    shape = (1, *x.shape[1:])
    noises, gens = [], []
    for traj, st in zip(trajs, states, strict=True):
        if traj.draws[st.k]:
            gen = _fork(st.generator)  # copy first: the input state keeps its position
            noises.append(torch.randn(shape, generator=gen, dtype=torch.float32, device=gen.device))
            gens.append(gen)
        else:
            noises.append(torch.zeros(shape))
            gens.append(st.generator)
    return torch.cat([n.to(x.device) for n in noises]), gens


def advance(
    trajs: Sequence[Trajectory], states: Sequence[SampleState], model_output: Tensor
) -> list[SampleState]:
    """New states after one evaluation per row; rows are grouped by sampler and updated together."""
    if not len(trajs) == len(states) == model_output.shape[0]:
        raise ValueError(
            f"{len(trajs)} trajectories, {len(states)} states, {model_output.shape[0]} outputs"
        )
    out_all = model_output.float()
    groups: dict[str, list[int]] = {}
    for i, (traj, st) in enumerate(zip(trajs, states, strict=True)):
        _check(traj, st)
        groups.setdefault(traj.sampler, []).append(i)
    result: list[SampleState | None] = [None] * len(states)
    for name, rows in groups.items():
        _, step, keys = _SAMPLERS[name]
        x = torch.cat([states[i].x for i in rows])  # (G, C, h, w)
        coef = torch.tensor([trajs[i].coefs[states[i].k] for i in rows], dtype=torch.float32)
        cols = list(coef.to(x.device).view(len(rows), -1, 1, 1, 1).unbind(1))  # each (G, 1, 1, 1)
        mem = {key: torch.cat([states[i].memory[key] for i in rows]) for key in keys}
        noise, gens = _noise([trajs[i] for i in rows], [states[i] for i in rows], x)
        x_new, mem_new = step(x, out_all[rows], mem, cols, noise)
        for j, i in enumerate(rows):
            result[i] = SampleState(
                x=x_new[j : j + 1],
                k=states[i].k + 1,
                memory={key: v[j : j + 1] for key, v in mem_new.items()},
                generator=gens[j],
            )
    return [st for st in result if st is not None]
