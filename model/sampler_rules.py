"""Each sampler's rule: a planner (coefficient table per UNet evaluation) and a batched update.

A planner turns (steps, schedule, start) into the table that reproduces one diffusers
scheduler's trajectory from step `start` on (img2img's shortened schedule: `get_timesteps` +
`set_begin_index`); an update applies one evaluation to a group of rows of that sampler, each
row with its own coefficient column. Every table also says, per evaluation, how the state it
expects mixes clean latents and noise (`noise`: x = a·x0 + b·ε, what each scheduler's
`add_noise` computes there), so a trajectory can start from noised image latents and the
inpainting blend can re-noise the kept area. :mod:`model.samplers` wraps these into its public API
(plan, start, model_input, advance); this module holds only the maths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from torch import Tensor

from model.schedules import NoiseSchedule, dpm_grid, spaced_timesteps, ve_grid

Memory = dict[str, Tensor]
Cols = list[Tensor]  # one (G, 1, 1, 1) coefficient column per name, gathered row by row
Update = tuple[Tensor, Memory]


@dataclass(frozen=True)
class Table:
    """What a planner returns; plan() wraps it into a Trajectory."""

    timesteps: Sequence[float]
    coefs: list[tuple[float, ...]]
    in_scale: Sequence[float] | None = None  # None: unscaled input
    init_sigma: float = 1.0
    draws: Sequence[bool] | None = None  # None: never draws noise
    noise: Sequence[tuple[float, float]] = ()  # (a, b) per evaluation: state = a·x0 + b·ε

    def tail(self, first: int) -> Table:
        """The evaluations from `first` on, for samplers without history across steps."""
        return Table(
            self.timesteps[first:],
            self.coefs[first:],
            None if self.in_scale is None else self.in_scale[first:],
            self.init_sigma,
            None if self.draws is None else self.draws[first:],
            self.noise[first:],
        )


def _vp(sched: NoiseSchedule, t: int) -> tuple[float, float]:
    """DDPM-style add_noise at timestep t: (sqrt(ᾱ_t), sqrt(1 - ᾱ_t))."""
    a = sched.alphas_cumprod[int(t)]
    return math.sqrt(a), math.sqrt(1 - a)


def _dpm_ab(s: float) -> tuple[float, float]:
    """DPM-Solver's add_noise at sigma s: (alpha_t, sigma_t) = (1, s) / sqrt(s² + 1)."""
    a = 1 / math.sqrt(s * s + 1)
    return a, s * a


def _x0_vp(a: float, v: bool) -> tuple[float, float]:
    """(cx, co) with x0 = cx·x + co·out at ᾱ = a, for variance-preserving latents."""
    sa, sb = math.sqrt(a), math.sqrt(1 - a)
    return (sa, -sb) if v else (1 / sa, -sb / sa)


def _x0_ve(s: float, v: bool) -> tuple[float, float]:
    """(cx, co) with x0 = cx·x + co·out at sigma s, for variance-exploding (x/ᾱ^½) latents."""
    return (1 / (s * s + 1), -s / math.sqrt(s * s + 1)) if v else (1.0, -s)


def _plan_ddim(steps: int, sched: NoiseSchedule, start: int) -> Table:
    """DDIMScheduler, eta = 0."""
    ts = spaced_timesteps(
        sched.spacing("leading"), steps, sched.num_train_timesteps, sched.steps_offset, integer=True
    )
    ratio, rows = sched.num_train_timesteps // steps, []
    for t in ts.tolist():
        a, ap = sched.alphas_cumprod[t], sched.alpha_at(t - ratio, default_one=True)
        ex, eo = (math.sqrt(1 - a), math.sqrt(a)) if sched.v_prediction else (0.0, 1.0)
        rows.append((*_x0_vp(a, sched.v_prediction), ex, eo, math.sqrt(ap), math.sqrt(1 - ap)))
    noise = [_vp(sched, t) for t in ts.tolist()]
    return Table(ts.tolist(), rows, noise=noise).tail(start)


def _step_ddim(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """Denoising Diffusion Implicit Models (Song et al. 2021), deterministic (eta = 0)."""
    x0x, x0o, ex, eo, a_prev, s_prev = c
    x0 = x0x * x + x0o * out
    eps = ex * x + eo * out
    return a_prev * x0 + s_prev * eps, mem


def _plan_euler(steps: int, sched: NoiseSchedule, start: int) -> Table:
    """EulerDiscreteScheduler (s_churn = 0)."""
    ts, sig, init = ve_grid(sched, steps)
    s, sn = sig[:-1].tolist(), sig[1:].tolist()
    rows = [(*_x0_ve(a, sched.v_prediction), a, b - a) for a, b in zip(s, sn, strict=True)]
    noise = [(1.0, a) for a in s]
    return Table(ts.tolist(), rows, [math.sqrt(a * a + 1) for a in s], init, noise=noise).tail(
        start
    )


def _step_euler(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """Euler step of the probability-flow ODE (Karras et al. 2022, Algorithm 1)."""
    x0x, x0o, sigma, dt = c
    d = (x - (x0x * x + x0o * out)) / sigma
    return x + d * dt, mem


def _plan_euler_a(steps: int, sched: NoiseSchedule, start: int) -> Table:
    """EulerAncestralDiscreteScheduler: noise is drawn at every step, the last one included."""
    ts, sig, init = ve_grid(sched, steps)
    rows = []
    for a, b in zip(sig[:-1].tolist(), sig[1:].tolist(), strict=True):
        up = math.sqrt(b * b * (a * a - b * b) / (a * a))
        down = math.sqrt(b * b - up * up)
        rows.append((*_x0_ve(a, sched.v_prediction), a, down - a, up))
    return Table(
        ts.tolist(),
        rows,
        [math.sqrt(a * a + 1) for a in sig[:-1].tolist()],
        init,
        [True] * len(rows),
        [(1.0, a) for a in sig[:-1].tolist()],
    ).tail(start)


def _step_euler_a(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """Euler ancestral step: deterministic to sigma_down, then noise up (Karras et al. 2022)."""
    x0x, x0o, sigma, dt, sigma_up = c
    d = (x - (x0x * x + x0o * out)) / sigma
    return x + d * dt + noise * sigma_up, mem


def _plan_heun(steps: int, sched: NoiseSchedule, start: int) -> Table:
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
    return Table(
        [float(t) for t in hts],
        rows,
        [math.sqrt(float(s) ** 2 + 1) for s in hs[:-1]],
        init,
        noise=[(1.0, float(s)) for s in hs[:-1]],
    ).tail(2 * start)  # two evaluations per step: begin_index = start * order


def _step_heun(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); first ∈ {0, 1} picks the stage."""
    x0x, x0o, sigma, dt, first = c
    d = (x - (x0x * x + x0o * out)) / sigma
    base = first * x + (1 - first) * mem["x_prev"]
    slope = first * d + (1 - first) * ((mem["d_prev"] + d) / 2)
    return base + slope * dt, {"x_prev": x, "d_prev": d}


def _plan_dpm(steps: int, sched: NoiseSchedule, start: int, karras: bool) -> Table:
    """DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint): 1st order first and last.

    From `start` on, as with set_begin_index: no history yet, so that step is first order.
    """
    ts, sig = dpm_grid(sched, steps, karras)

    def alpha_sigma_lambda(s: float) -> tuple[float, float, float]:
        a = 1 / math.sqrt(s * s + 1)
        return a, s * a, (math.log(a) - math.log(s * a)) if s > 0 else math.inf

    rows = []
    for i in range(start, len(ts)):
        a0, s0, l0 = alpha_sigma_lambda(sig[i])
        at, st, lt = alpha_sigma_lambda(sig[i + 1])
        w = -at * math.expm1(l0 - lt) if st > 0 else 1.0  # weight of x0 in the 1st-order step
        second = start < i < len(ts) - 1  # else 1st order: warm-up and lower_order_final
        r = (l0 - alpha_sigma_lambda(sig[i - 1])[2]) / (lt - l0) if second else math.inf
        rows.append(
            (*_x0_vp(a0 * a0, sched.v_prediction), st / s0, w * (1 + 0.5 / r), -w * 0.5 / r)
        )
    noise = [_dpm_ab(s) for s in sig[start:-1]]
    return Table([float(t) for t in ts[start:]], rows, noise=noise)


def _step_dpmpp_2m(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Tensor) -> Update:
    """DPM-Solver++(2M) multistep update in data-prediction form (Lu et al. 2022)."""
    x0x, x0o, cx, c0, c1 = c
    x0 = x0x * x + x0o * out
    return cx * x + c0 * x0 + c1 * mem["x0_prev"], {"x0_prev": x0}


def _plan_lcm(steps: int, sched: NoiseSchedule, start: int) -> Table:
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
    draws = [i < len(ts) - 1 for i in range(len(ts))]
    noise = [_vp(sched, t) for t in ts]
    return Table([float(t) for t in ts], rows, draws=draws, noise=noise).tail(start)


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


def _plan_pndm(steps: int, sched: NoiseSchedule, start: int) -> Table:
    """PNDMScheduler with skip_prk_steps: a 2-evaluation pseudo-Heun start, then PLMS.

    From `start` on, PNDM (which has no begin index) runs its counter from 0 over the
    remaining timesteps `timesteps[start:]`, warm-up included, exactly as diffusers does.
    """
    n = sched.num_train_timesteps
    desc = spaced_timesteps(sched.spacing("leading"), steps, n, sched.steps_offset, integer=True)
    ts = [int(desc[0]), *desc[1:2].tolist(), *desc[1:].tolist()]  # 2nd timestep evaluated twice
    ts = ts[start:]
    ratio, rows = n // steps, []
    for c, t in enumerate(ts):
        t_from, t_to = (t + ratio, t) if c == 1 else (t, t - ratio)
        a, ap = sched.alphas_cumprod[t_from], sched.alpha_at(t_to, default_one=False)
        w = _PLMS_WEIGHTS[min(c, 4)]
        ex, eo = (math.sqrt(1 - a), math.sqrt(a)) if sched.v_prediction else (0.0, 1.0)
        gain = (ap - a) / (a * math.sqrt(1 - ap) + math.sqrt(a * (1 - a) * ap))
        rows.append((float(c != 1), *w, float(c != 1), ex, eo, math.sqrt(ap / a), gain))
    return Table([float(t) for t in ts], rows, noise=[_vp(sched, t) for t in ts])


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
Planner = Callable[[int, NoiseSchedule, int], Table]  # (steps, schedule, start step)
SAMPLER_RULES: dict[str, tuple[Planner, Step, tuple[str, ...]]] = {
    "ddim": (_plan_ddim, _step_ddim, ()),
    "euler": (_plan_euler, _step_euler, ()),
    "euler_a": (_plan_euler_a, _step_euler_a, ()),
    "heun": (_plan_heun, _step_heun, ("x_prev", "d_prev")),
    "dpmpp_2m": (partial(_plan_dpm, karras=False), _step_dpmpp_2m, ("x0_prev",)),
    "dpmpp_2m_karras": (partial(_plan_dpm, karras=True), _step_dpmpp_2m, ("x0_prev",)),
    "lcm": (_plan_lcm, _step_lcm, ()),
    "pndm": (_plan_pndm, _step_pndm, ("e1", "e2", "e3", "x_start")),
}
