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
import torch
from torch import Tensor

from model.schedules import NoiseSchedule, dpm_grid, spaced_timesteps, ve_grid

Memory = dict[str, Tensor]
Update = tuple[Tensor, Memory]
# (rows that draw: a slice when consecutive, None when all; their draws), or None: no draws
Noise = tuple[Tensor | slice | None, Tensor] | None


@dataclass(frozen=True)
class Cols:
    """A group's coefficients at this evaluation: one (G, 1, 1, 1) column per name on the
    latents' device, and the same values on the host, so that an update can drop a term (or
    pass a buffer on instead of copying it) where the value is the same for every row."""

    cols: list[Tensor]
    host: Sequence[tuple[float, ...]]  # (G,) rows of the plan's coefficient table

    def every(self, j: int, value: float) -> bool:
        """Whether coefficient `j` is `value` for every row of the group."""
        return all(row[j] == value for row in self.host)


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
        x0x, x0o = _x0_vp(a, sched.v_prediction)
        sa, sb = math.sqrt(ap), math.sqrt(1 - ap)  # x_prev = sa·x0 + sb·eps (Song et al. 2021)
        rows.append((sa * x0x + sb * ex, sa * x0o + sb * eo, 0.0))
    noise = [_vp(sched, t) for t in ts.tolist()]
    return Table(ts.tolist(), rows, noise=noise).tail(start)


def _step_linear(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Noise) -> Update:
    """x' = cx·x + co·out (+ cn·noise): DDIM (eta 0), Euler, Euler ancestral and LCM all fold
    into this form at plan time, so rows of the four share one group; two passes over the
    latents (a product into a fresh tensor, then a fused multiply-add into it), and the noise
    term touches only the rows that draw."""
    cx, co, cn = c.cols
    x_new = torch.mul(x, cx).addcmul_(out, co)
    if noise is not None:
        rows, draws = noise
        if rows is None:
            x_new.addcmul_(draws, cn)
        elif isinstance(rows, slice):  # consecutive drawing rows (the batch is ordered so)
            x_new[rows].addcmul_(draws, cn[rows])
        else:  # the same fused multiply-add on the drawing rows: a row's result is its solo one
            part = x_new.index_select(0, rows).addcmul_(draws, cn.index_select(0, rows))
            x_new.index_copy_(0, rows, part)
    return x_new, mem


def _plan_euler(steps: int, sched: NoiseSchedule, start: int) -> Table:
    """EulerDiscreteScheduler (s_churn = 0)."""
    ts, sig, init = ve_grid(sched, steps)
    s, sn = sig[:-1].tolist(), sig[1:].tolist()
    rows = [_euler_linear(a, b - a, 0.0, sched.v_prediction) for a, b in zip(s, sn, strict=True)]
    noise = [(1.0, a) for a in s]
    return Table(ts.tolist(), rows, [math.sqrt(a * a + 1) for a in s], init, noise=noise).tail(
        start
    )


def _euler_linear(sigma: float, dt: float, up: float, v: bool) -> tuple[float, float, float]:
    """An Euler step (Karras et al. 2022, Algorithm 1: x + dt·(x - x0)/sigma, plus up·noise
    for the ancestral variant) folded into (cx, co, cn) of `_step_linear`."""
    x0x, x0o = _x0_ve(sigma, v)
    return 1 + dt * (1 - x0x) / sigma, -dt * x0o / sigma, up


def _plan_euler_a(steps: int, sched: NoiseSchedule, start: int) -> Table:
    """EulerAncestralDiscreteScheduler: noise is drawn at every step, the last one included."""
    ts, sig, init = ve_grid(sched, steps)
    rows = []
    for a, b in zip(sig[:-1].tolist(), sig[1:].tolist(), strict=True):
        up = math.sqrt(b * b * (a * a - b * b) / (a * a))
        down = math.sqrt(b * b - up * up)
        rows.append(_euler_linear(a, down - a, up, sched.v_prediction))
    return Table(
        ts.tolist(),
        rows,
        [math.sqrt(a * a + 1) for a in sig[:-1].tolist()],
        init,
        [True] * len(rows),
        [(1.0, a) for a in sig[:-1].tolist()],
    ).tail(start)


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
        x0x, x0o = _x0_ve(s_in, sched.v_prediction)
        dx, do = (1 - x0x) / s_in, -x0o / s_in  # d = (x - x0) / sigma = dx·x + do·out
        f, dt = float(first), sn - s
        w = dt * (1.0 if first else 0.5)  # Euler slope, or the trapezoid's half of each
        rows.append((dx, do, f + w * dx, w * do, 1 - f, (1 - f) * w))
    return Table(
        [float(t) for t in hts],
        rows,
        [math.sqrt(float(s) ** 2 + 1) for s in hs[:-1]],
        init,
        noise=[(1.0, float(s)) for s in hs[:-1]],
    ).tail(2 * start)  # two evaluations per step: begin_index = start * order


def _step_heun(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Noise) -> Update:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1) with the derivative
    d = dx·x + do·out: the Euler predictor x + dt·d, then the corrector
    x_prev + dt·(d_prev + d)/2; the coefficients (0 or 1 per stage) pick the stage.

    A group all at the predictor skips the history terms; one all at the corrector keeps no
    history, since the next evaluation is a predictor, which weighs it by 0 (x stands in: any
    finite tensor gives the same sum)."""
    dx, do, cx, co, cxp, cdp = c.cols
    x_new = torch.mul(x, cx).addcmul_(out, co)
    predictor = c.every(4, 0.0) and c.every(5, 0.0)
    if not predictor:
        x_new.addcmul_(mem["x_prev"], cxp).addcmul_(mem["d_prev"], cdp)
    if c.every(4, 1.0):
        return x_new, {"x_prev": x, "d_prev": x}
    return x_new, {"x_prev": x, "d_prev": torch.mul(x, dx).addcmul_(out, do)}


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


def _step_dpmpp_2m(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Noise) -> Update:
    """DPM-Solver++(2M) multistep update in data-prediction form (Lu et al. 2022)."""
    x0x, x0o, cx, c0, c1 = c.cols
    x0 = torch.mul(x, x0x).addcmul_(out, x0o)
    x_new = torch.mul(x, cx).addcmul_(x0, c0)
    if not c.every(4, 0.0):  # first-order steps have no history term
        x_new.addcmul_(mem["x0_prev"], c1)
    return x_new, {"x0_prev": x0}


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
        x0x, x0o = _x0_vp(a, sched.v_prediction)
        # denoised = c_out·x0 + c_skip·x, then keep·denoised + fresh·noise (Luo et al. 2023)
        rows.append((keep * (c_out * x0x + c_skip), keep * c_out * x0o, fresh))
    draws = [i < len(ts) - 1 for i in range(len(ts))]
    noise = [_vp(sched, t) for t in ts]
    return Table([float(t) for t in ts], rows, draws=draws, noise=noise).tail(start)


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
        keep = math.sqrt(ap / a)  # x' = keep·base - gain·eps, eps = ex·base + eo·combo
        rows.append((float(c != 1), *w, float(c != 1), keep - gain * ex, -gain * eo))
    return Table([float(t) for t in ts], rows, noise=[_vp(sched, t) for t in ts])


def _step_pndm(x: Tensor, out: Tensor, mem: Memory, c: Cols, noise: Noise) -> Update:
    """Pseudo linear multistep (PLMS) update (Liu et al. 2022, PNDM); push ∈ {0, 1} keeps
    history. The planner folds the eps estimate into the update (x' = cb·base + cc·combo).
    Where a 0/1 weight is the same for every row, the history moves by reference (no pass);
    otherwise `lerp` with it returns one end exactly, in one pass; all-zero weights of the
    warm-up drop their terms."""
    from_x, w0, w1, w2, w3, push, cb, cc = c.cols
    e1, e2, e3 = mem["e1"], mem["e2"], mem["e3"]
    base = x if c.every(0, 1.0) else torch.lerp(mem["x_start"], x, from_x)
    combo = torch.mul(out, w0)
    for j, (e, w) in enumerate(((e1, w1), (e2, w2), (e3, w3)), start=2):
        if not c.every(j, 0.0):
            combo.addcmul_(e, w)
    if c.every(5, 1.0):
        new = {"e1": out, "e2": e1, "e3": e2}
    elif c.every(5, 0.0):
        new = {"e1": e1, "e2": e2, "e3": e3}
    else:
        new = {
            "e1": torch.lerp(e1, out, push),
            "e2": torch.lerp(e2, e1, push),
            "e3": torch.lerp(e3, e2, push),
        }
    return torch.mul(base, cb).addcmul_(combo, cc), {**new, "x_start": base}


Step = Callable[[Tensor, Tensor, Memory, Cols, Noise], Update]
Planner = Callable[[int, NoiseSchedule, int], Table]  # (steps, schedule, start step)
SAMPLER_RULES: dict[str, tuple[Planner, Step, tuple[str, ...]]] = {
    "ddim": (_plan_ddim, _step_linear, ()),
    "euler": (_plan_euler, _step_linear, ()),
    "euler_a": (_plan_euler_a, _step_linear, ()),
    "heun": (_plan_heun, _step_heun, ("x_prev", "d_prev")),
    "dpmpp_2m": (partial(_plan_dpm, karras=False), _step_dpmpp_2m, ("x0_prev",)),
    "dpmpp_2m_karras": (partial(_plan_dpm, karras=True), _step_dpmpp_2m, ("x0_prev",)),
    "lcm": (_plan_lcm, _step_linear, ()),
    "pndm": (_plan_pndm, _step_pndm, ("e1", "e2", "e3", "x_start")),
}
