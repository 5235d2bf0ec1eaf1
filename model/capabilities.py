"""What a loaded model can run, as plain data the service publishes and checks requests against.

The API process has no torch and no model; workers publish these with their registration so a
request that the model cannot run is refused at submit (422 naming the field), never accepted
and failed later. `service.contract.check_capabilities` reads the same dict. `probe_inputs`
makes a request of the model's first mode (warm-up, call-cost measurement).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from model.sampler_rules import SAMPLER_RULES

if TYPE_CHECKING:
    from model.pipeline import Pipeline

_FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}


@dataclass(frozen=True)
class Capabilities:
    """A model's family, modes, shapes and per-sampler step limits."""

    family: str  # sd1 | sd2 | sdxl | sdxl-refiner | <family>-inpainting | ldm | ldm-sr | sd-x4-upscaler | ...
    modes: tuple[str, ...]  # of txt2img, img2img, inpaint, unconditional, upscale
    latent_factor: int  # pixels per latent side (f)
    latent_channels: int
    unet_in_channels: int
    native_size: int  # the side a request without width/height gets
    prediction_type: str  # epsilon | v_prediction
    max_steps: dict[str, int]  # sampler name -> most steps it can plan
    text_layers: int = 1  # text encoder blocks: the largest clip_skip (0: no text encoder)
    takes_prompt: bool = True  # False: unconditional and upscaling models
    upscale_factor: int | None = None  # upscale: output side / input side (rounded down)
    max_output_pixels: int | None = None  # upscale: the largest output
    upscale_input_multiple: int | None = None  # upscale: what the input rounds down to
    max_noise_level: int | None = None  # the x4 upscaler's largest noise_level
    loras: tuple[str, ...] = ()  # LoRA adapter names requests may use (its lora_dir's files)
    fields: tuple[str, ...] = ()  # the model-specific generation fields it reads (MODEL_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modes"] = list(self.modes)
        data["loras"] = list(self.loras)
        data["fields"] = list(self.fields)
        return data


def describe(pipe: Pipeline) -> Capabilities:
    """The capabilities of a loaded pipeline (computed from its parts, never configured)."""
    sched = pipe.schedule
    in_ch = pipe.unet.config.in_channels
    if pipe.upscaler:
        modes: tuple[str, ...] = ("upscale",)
    elif not pipe.takes_prompt:
        modes = ("unconditional",) if in_ch == pipe.latent_channels else ()
    elif pipe.concat_inpainting:
        modes = ("inpaint",)
    elif in_ch == pipe.latent_channels and pipe.family == "sdxl-refiner":
        modes = ("img2img", "inpaint")  # the refiner refines images: diffusers runs it img2img
    elif in_ch == pipe.latent_channels:
        modes = ("txt2img", "img2img", "inpaint")
    else:
        modes = ()
    context = getattr(pipe.unet.config, "context_dim", None)  # None: a UNet2DModel
    family = pipe.family or _FAMILY_BY_CONTEXT.get(context or 0, "custom")
    if pipe.concat_inpainting and not family.endswith("-inpainting"):
        family += "-inpainting"
    limits = {name: sched.num_train_timesteps for name in SAMPLER_RULES}
    limits["lcm"] = min(limits["lcm"], sched.original_inference_steps)
    return Capabilities(
        family=family,
        modes=modes,
        latent_factor=pipe.vae_scale_factor,
        latent_channels=pipe.latent_channels,
        unet_in_channels=in_ch,
        native_size=pipe.native_size,
        prediction_type=sched.prediction_type,
        max_steps=limits,
        text_layers=pipe.text.layers if pipe.text is not None else 0,
        takes_prompt=pipe.takes_prompt,
        upscale_factor=pipe.vae_scale_factor if pipe.upscaler else None,
        max_output_pixels=pipe.max_upscale_pixels if pipe.upscaler else None,
        upscale_input_multiple=pipe.upscale_input_multiple if pipe.upscaler else None,
        max_noise_level=None if pipe.low_res_noise is None else pipe.low_res_noise.max_noise_level,
        loras=tuple(pipe.loras.names()) if pipe.lora_dir is not None else (),
        fields=pipe.model_fields,
    )


def probe_inputs(pipe: Pipeline, side: int) -> dict[str, Any]:
    """`Pipeline.generate()` keywords for a throwaway job of the model's first mode with a
    side x side output (warm-up, call-cost measurement): whatever inputs the mode needs."""
    f = pipe.vae_scale_factor
    side = max(f, side // f * f)
    mode = pipe.capabilities.modes[0]
    if mode == "upscale":
        low = max(pipe.upscale_input_multiple, side // f)
        image = Image.new("RGB", (low, low))
        width, height = pipe.output_size(None, None, image)
        prompt = {"prompt": "warm-up"} if pipe.takes_prompt else {}
        return {"image": image, "width": width, "height": height, **prompt}
    kw: dict[str, Any] = {"width": side, "height": side}
    if mode == "inpaint":
        kw |= {
            "image": Image.new("RGB", (side, side)),
            "mask": Image.new("L", (side, side), 255),
        }
    elif mode == "img2img":
        kw["image"] = Image.new("RGB", (side, side))
    if pipe.takes_prompt:
        kw["prompt"] = "warm-up"
    return kw
