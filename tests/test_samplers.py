"""Samplers: step-by-step parity with the diffusers schedulers, batched = solo, config parsing."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)

from model.samplers import (
    SAMPLER_NAMES,
    SD15_SCHEDULER_CONFIG,
    NoiseSchedule,
    SampleState,
    Trajectory,
    advance,
    model_input,
    plan,
    start,
)

REFERENCE = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
}
SHAPE = (1, 4, 8, 8)


def fake_unet(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, x- and t-dependent stand-in for the UNet (eps or v alike)."""
    t = t.float().reshape(-1, 1, 1, 1)
    return 0.7 * torch.tanh(x_in) + 0.3 * torch.sin(1.7 * x_in + t / 97.0)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Tight tolerance relative to the tensor's magnitude (latents range from ~15 to ~1)."""
    scale = max(1.0, ref.abs().max().item())
    err = (ours - ref.to(ours.dtype)).abs().max().item()
    assert err <= 1e-5 * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


def run_reference(sampler: str, steps: int, cfg: dict, seed: int) -> None:
    """Run diffusers' scheduler and ours side by side, comparing every input and latent."""
    cls, override = REFERENCE[sampler]
    ref = cls.from_config({**cfg, **override})
    ref.set_timesteps(steps)
    traj = plan(sampler, steps, NoiseSchedule.from_config(cfg))
    assert traj.n_evals == len(ref.timesteps)
    ref_gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=ref_gen, dtype=torch.float32) * ref.init_noise_sigma
    state = start(traj, torch.Generator().manual_seed(seed), SHAPE, "cpu")
    assert_close(state.x, latents, "initial latents")
    extra = {"generator": ref_gen} if "generator" in inspect.signature(ref.step).parameters else {}
    for i, t in enumerate(ref.timesteps):
        ref_in = ref.scale_model_input(latents, t)
        x_in, t_in = model_input([traj], [state])
        assert_close(x_in, ref_in, f"model input {i}")
        assert t_in.dtype == torch.float32 and t_in.item() == float(t), f"timestep {i}"
        out = fake_unet(ref_in, t)
        latents = ref.step(out, t, latents, **extra).prev_sample
        state = advance([traj], [state], out)[0]
        assert state.k == i + 1
        assert_close(state.x, latents, f"latents after evaluation {i}")


@pytest.mark.parametrize("steps", [1, 2, 4, 10, 25])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_matches_diffusers(sampler: str, prediction: str, steps: int) -> None:
    cfg = {**SD15_SCHEDULER_CONFIG, "prediction_type": prediction}
    run_reference(sampler, steps, cfg, seed=steps * 31 + len(sampler))


@pytest.mark.parametrize(
    ("sampler", "override"),
    [
        ("ddim", {"timestep_spacing": "trailing", "set_alpha_to_one": True}),
        ("ddim", {"timestep_spacing": "linspace", "beta_schedule": "linear"}),
        ("euler", {"timestep_spacing": "leading"}),
        ("euler_a", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
        ("heun", {"timestep_spacing": "leading"}),
        ("dpmpp_2m", {"timestep_spacing": "leading"}),
        ("dpmpp_2m", {"timestep_spacing": "trailing", "beta_schedule": "linear"}),
        ("dpmpp_2m_karras", {"beta_schedule": "linear", "prediction_type": "v_prediction"}),
        ("lcm", {"original_inference_steps": 25, "set_alpha_to_one": True}),
        ("pndm", {"timestep_spacing": "linspace"}),
        ("pndm", {"timestep_spacing": "trailing", "steps_offset": 0}),
    ],
)
def test_matches_diffusers_with_config_options(sampler: str, override: dict) -> None:
    run_reference(sampler, 7, {**SD15_SCHEDULER_CONFIG, **override}, seed=5)


def run_solo(traj: Trajectory, state: SampleState) -> torch.Tensor:
    while state.k < traj.n_evals:
        x_in, t = model_input([traj], [state])
        state = advance([traj], [state], fake_unet(x_in, t))[0]
    return state.x


def test_batched_equals_solo() -> None:
    """Rows with mixed samplers, step counts and positions match running each row alone, bit
    for bit (per-row coefficients, per-row generators, history kept per row)."""
    schedule = NoiseSchedule.from_config(None)
    jobs = [("euler_a", 6, 0), ("euler_a", 9, 3), ("lcm", 4, 1), ("heun", 5, 2), ("heun", 4, 3)]
    jobs += [("dpmpp_2m", 8, 0), ("dpmpp_2m_karras", 6, 2), ("dpmpp_2m", 12, 5), ("pndm", 7, 0)]
    jobs += [("pndm", 10, 4), ("ddim", 5, 1), ("euler", 3, 0), ("lcm", 6, 3)]
    trajs, states, expected = [], [], []
    for n, (sampler, steps, skip) in enumerate(jobs):
        traj = plan(sampler, steps, schedule)
        state = start(traj, torch.Generator().manual_seed(100 + n), SHAPE, "cpu")
        expected.append(run_solo(traj, state))
        for _ in range(skip):  # bring the row to a different position, alone
            x_in, t = model_input([traj], [state])
            state = advance([traj], [state], fake_unet(x_in, t))[0]
        trajs.append(traj)
        states.append(state)
    results: dict[int, torch.Tensor] = {}
    live = list(range(len(jobs)))
    while live:
        x_in, t = model_input([trajs[i] for i in live], [states[i] for i in live])
        # the stand-in UNet runs row by row so that only the samplers' batching is under test
        out = torch.cat([fake_unet(x_in[j : j + 1], t[j : j + 1]) for j in range(len(live))])
        new = advance([trajs[i] for i in live], [states[i] for i in live], out)
        for i, st in zip(live, new, strict=True):
            states[i] = st
            if st.k == trajs[i].n_evals:
                results[i] = st.x
        live = [i for i in live if i not in results]
    for i, job in enumerate(jobs):
        assert torch.equal(results[i], expected[i]), job


def test_advance_does_not_mutate_inputs() -> None:
    traj = plan("euler_a", 4, NoiseSchedule.from_config(None))
    state = start(traj, torch.Generator().manual_seed(0), SHAPE, "cpu")
    x, rng = state.x.clone(), state.generator.get_state().clone()
    x_in, t = model_input([traj], [state])
    first = advance([traj], [state], fake_unet(x_in, t))[0]
    again = advance([traj], [state], fake_unet(x_in, t))[0]
    assert (
        state.k == 0 and torch.equal(state.x, x) and torch.equal(state.generator.get_state(), rng)
    )
    assert torch.equal(first.x, again.x)
    assert not torch.equal(first.generator.get_state(), rng)


def test_start_matches_noise_convention() -> None:
    traj = plan("euler", 20, NoiseSchedule.from_config(None))
    state = start(traj, torch.Generator("cpu").manual_seed(42), SHAPE, "cpu")
    noise = torch.randn(
        SHAPE, generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float32
    )
    torch.testing.assert_close(state.x, noise * traj.init_sigma)
    assert state.x.dtype == torch.float32


def test_n_evals() -> None:
    schedule = NoiseSchedule.from_config(None)
    assert plan("heun", 10, schedule).n_evals == 19
    assert plan("pndm", 10, schedule).n_evals == 11
    assert all(
        plan(name, 10, schedule).n_evals == 10 for name in ("ddim", "euler", "lcm", "dpmpp_2m")
    )


def test_unknown_sampler() -> None:
    message = "unknown sampler 'x'; choose one of: " + ", ".join(SAMPLER_NAMES)
    with pytest.raises(ValueError) as info:
        plan("x", 10, NoiseSchedule.from_config(None))
    assert str(info.value) == message


@pytest.mark.parametrize(("sampler", "steps"), [("euler", 0), ("ddim", 1001), ("lcm", 51)])
def test_bad_step_count(sampler: str, steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):
        plan(sampler, steps, NoiseSchedule.from_config(None))


def test_advance_past_the_end() -> None:
    traj = plan("ddim", 1, NoiseSchedule.from_config(None))
    state = start(traj, torch.Generator().manual_seed(0), SHAPE, "cpu")
    state = advance([traj], [state], torch.zeros(SHAPE))[0]
    with pytest.raises(ValueError, match="nothing left"):
        advance([traj], [state], torch.zeros(SHAPE))


def test_from_config_diffusers_dict() -> None:
    """A real-world scheduler_config.json (SD 2.x v-prediction, with diffusers' own keys)."""
    cfg = {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.8.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }
    schedule = NoiseSchedule.from_config(cfg)
    assert schedule.prediction_type == "v_prediction"
    assert schedule.steps_offset == 1 and schedule.set_alpha_to_one is False
    ref = DDIMScheduler.from_config(cfg)
    assert torch.equal(
        torch.tensor(schedule.alphas_cumprod, dtype=torch.float32), ref.alphas_cumprod
    )
    assert NoiseSchedule.from_config(None) == NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG)
    assert NoiseSchedule.from_config(None).prediction_type == "epsilon"


def test_from_config_rejects_unsupported() -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_config({**SD15_SCHEDULER_CONFIG, "beta_schedule": "exp"})
