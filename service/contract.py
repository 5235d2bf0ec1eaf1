"""The generation contract: every generation field, once, and the checks a model's capabilities allow.

`GenerationParams` is the single list of what a generation takes. The HTTP request
(`service.schemas.JobRequest`) extends it with transport fields; the engine's request, the
worker, `ldmserve generate`'s flags, bench and tests derive from it, and a test holds
`model.Pipeline.generate()`'s keywords to it. Adding a field is one edit here plus the code
that uses it.

`check_capabilities` judges a request against what the target model's workers published
(`model.capabilities.Capabilities.to_dict()`), so a job the model cannot run is a 422 naming
the field at submit, never a 202 that fails in the worker. Torch-free: the API imports it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Mirrors model.samplers.SAMPLER_NAMES (a test asserts they agree); the API may not import model.
SAMPLER_NAMES: tuple[str, ...] = (
    "ddim",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "lcm",
    "pndm",
)
SamplerName = Literal[
    "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "pndm"
]
DEFAULT_SAMPLER = "euler_a"
MAX_SEED = 2**32 - 1
MAX_CLIP_SKIP = 12  # AUTOMATIC1111's range; a model may allow fewer (capabilities text_layers)
IMAGE_FIELDS: tuple[str, ...] = ("image", "mask")  # carried as files, never in parameters JSON
MODES: tuple[str, ...] = ("txt2img", "img2img", "inpaint", "unconditional", "upscale")
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # as model.pipeline (and diffusers)
UPSCALE_INPUT_MULTIPLE = 32  # mirrors model.pipeline: upscaler inputs round down to it
# A LoRA name, never a path (mirrors model.lora_library.NAME; a test asserts they agree).
LORA_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,127}$"
# AUTOMATIC1111's extra-network syntax in prompts: <lora:name> or <lora:name:multiplier>.
LORA_TAG = re.compile(r"<lora:([^:>]*)(?::([^>]*))?>")
# Fields only some models read (capabilities' "fields" lists them); mirrors model.pipeline's.
MODEL_FIELDS = (
    "prompt_2", "negative_prompt_2", "aesthetic_score", "negative_aesthetic_score", "noise_level",
)  # fmt: skip


class ContractError(ValueError):
    """A request the target model cannot run; `field` names the parameter at fault."""

    def __init__(self, field: str, message: str, code: str = "unsupported") -> None:
        super().__init__(message)
        self.field = field
        self.code = code


class LoraRequest(BaseModel):
    """One LoRA adapter a job applies: a name the model's workers have, and its multiplier."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(
        pattern=LORA_NAME_PATTERN,
        description="`<name>.safetensors` in the workers' LoRA directory (GET /v1/loras).",
    )
    scale: float = Field(
        default=1.0, ge=-8, le=8, description="Multiplier (alpha/rank applied too)."
    )


def lora_tags(prompt: str) -> tuple[str, list[LoraRequest]]:
    """The prompt without its `<lora:name:multiplier>` tags, and the adapters they name."""
    found = []
    for match in LORA_TAG.finditer(prompt):
        name, mult = match[1].strip(), (match[2] or "1").strip()
        try:
            scale = float(mult)
        except ValueError:
            raise ValueError(f"prompt: {match[0]} has no number as its multiplier") from None
        found.append(LoraRequest(name=name, scale=scale))
    return LORA_TAG.sub("", prompt).strip(), found


class GenerationParams(BaseModel):
    """What one generation takes; defaults equal ``model.Pipeline.generate()``'s.

    Strict JSON types: ``"512"`` is not a number, NaN/Infinity are refused, unknown fields
    are rejected. Limits that a deployment sets (sizes, steps, ...) are checked by the API
    against its settings; what depends on the model, against the model's capabilities.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(
        default="",
        description="Text to render; length limit is a setting. Required, except by models "
        "that take none (capabilities.takes_prompt: unconditional models, the LDM upscaler) "
        "and in upscale mode, where it may be blank.",
    )
    negative_prompt: str = ""
    width: int | None = Field(
        default=None,
        description="Pixels, a multiple of the model's latent factor; default: the input "
        "image's width rounded down to it, else the model's native size.",
    )
    height: int | None = Field(default=None, description="Pixels; default as for width.")
    steps: int = Field(default=30, description="Denoising steps (default limit 1–150).")
    guidance_scale: float = Field(default=7.5, description="Classifier-free guidance scale.")
    sampler: SamplerName = DEFAULT_SAMPLER
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Omitted: the server draws one."
    )
    num_images: int = Field(default=1, description="Images from consecutive seeds.")
    image: str | None = Field(
        default=None,
        description="img2img init image, the inpainting source (with mask), or an upscaler's "
        "low-res input: base64 or a data: URL of a PNG, JPEG or WebP file.",
    )
    mask: str | None = Field(
        default=None,
        description="Inpainting mask, same size as image: white (>= 50%) = repaint, black = keep.",
    )
    strength: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of the schedule run on the image, (0, 1]; default 0.8 for "
        "img2img, 1.0 for inpainting.",
    )
    keep_unmasked: bool = Field(
        default=False,
        description="Inpainting: copy the source's pixels outside the mask into the result "
        "exactly (AUTOMATIC1111 / InvokeAI behaviour); default as diffusers.",
    )
    prompt_2: str | None = Field(
        default=None,
        description="SDXL: the prompt of the second text encoder (OpenCLIP ViT-bigG); "
        "default: prompt.",
    )
    negative_prompt_2: str | None = Field(
        default=None,
        description="SDXL: the second encoder's negative prompt; default: negative_prompt.",
    )
    aesthetic_score: float | None = Field(
        default=None,
        description="SDXL refiner: the aesthetic score it is conditioned on; default 6.0.",
    )
    negative_aesthetic_score: float | None = Field(
        default=None, description="SDXL refiner: the unconditional row's score; default 2.5."
    )
    noise_level: int | None = Field(
        default=None,
        ge=0,
        description="x4 upscaler: the noise added to the low-res input (its own DDPM "
        "schedule's step, also the UNet's class label), 0..the model's max_noise_level "
        "(350); default 20. Higher: more detail invented, less fidelity.",
    )
    clip_skip: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CLIP_SKIP,
        description="Text encoder layer to condition on, counted from the last: 1 = the last "
        "(default), 2 = the penultimate (AUTOMATIC1111's 'Clip skip'). SD 2.x counts from the "
        "layer it was trained on; at most the model's text_layers.",
    )
    loras: list[LoraRequest] = Field(
        default=[],
        description="LoRA adapters [{name, scale}]; `<lora:name:scale>` in the prompt adds "
        "one (and is removed from the prompt). At most a configured number per job.",
    )

    @model_validator(mode="after")
    def _prompt_loras(self) -> GenerationParams:
        """AUTOMATIC1111's `<lora:...>` tags move from the prompt into `loras`."""
        if "<lora:" in self.prompt:
            self.prompt, tagged = lora_tags(self.prompt)
            self.loras = [*self.loras, *tagged]
        return self  # a name given twice applies twice (its multipliers add up)

    def mode(self, modes: Sequence[str] = ()) -> str:
        return mode_of(self.image is not None, self.mask is not None, modes)


GENERATION_FIELDS: tuple[str, ...] = tuple(GenerationParams.model_fields)


def mode_of(has_image: bool, has_mask: bool, modes: Sequence[str] = ()) -> str:
    """The mode a request's inputs ask for on a model running `modes` (as model.Pipeline.mode_of)."""
    if not has_image:
        return "unconditional" if "unconditional" in modes else "txt2img"
    if not has_mask:
        return "upscale" if "upscale" in modes else "img2img"
    return "inpaint"


def steps_skipped(steps: int, strength: float) -> int:
    """Steps that strength skips: diffusers' get_timesteps (mirrors model.samplers.start_step)."""
    return max(steps - min(int(steps * strength), steps), 0)


def upscale_input_multiple(caps: dict[str, Any]) -> int:
    """What an upscaler's input rounds down to (workers before this field: 32)."""
    return int(caps.get("upscale_input_multiple") or UPSCALE_INPUT_MULTIPLE)


def resolved_size(
    params: GenerationParams, caps: dict[str, Any], image_size: tuple[int, int] | None
) -> tuple[int, int]:
    """(width, height): as requested, else the image's rounded down, else the native size."""
    f = int(caps["latent_factor"])
    if image_size is not None and caps.get("upscale_factor"):
        up, m = int(caps["upscale_factor"]), upscale_input_multiple(caps)
        w0, h0 = (up * (s - s % m) for s in image_size)
    elif image_size is not None:
        w0, h0 = (s - s % f for s in image_size)
    else:
        w0 = h0 = int(caps["native_size"])
    return (params.width or w0, params.height or h0)


def check_capabilities(
    params: GenerationParams,
    caps: dict[str, Any],
    image_size: tuple[int, int] | None = None,
    mask_size: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The request's (width, height) if the model can run it; else ContractError naming the field."""
    mode = mode_of(image_size is not None, mask_size is not None, caps["modes"])
    if caps.get("takes_prompt", True) and not params.prompt.strip() and mode != "upscale":
        # an upscaler's prompt only steers detail: none is a common request (diffusers too)
        raise ContractError("prompt", "must not be blank", code="validation_error")
    if not caps.get("takes_prompt", True) and (params.prompt or params.negative_prompt):
        field = "prompt" if params.prompt else "negative_prompt"
        raise ContractError(field, f"this model ({caps['family']}) takes no prompt")
    if mode not in caps["modes"]:
        runs = ", ".join(caps["modes"]) or "nothing"
        field = {"txt2img": "image", "inpaint": "mask"}.get(mode, "image")
        if mode == "img2img" and "inpaint" in caps["modes"]:
            field = "mask"  # an inpainting model: the image needs a mask
        raise ContractError(
            field, f"this model ({caps['family']}) cannot run {mode}; it runs {runs}"
        )
    for name in MODEL_FIELDS:
        if getattr(params, name) is not None and name not in caps.get("fields", ()):
            raise ContractError(name, f"this model ({caps['family']}) does not take {name}")
    top = caps.get("max_noise_level")
    if params.noise_level is not None and top is not None and params.noise_level > int(top):
        raise ContractError(
            "noise_level", f"must be in 0..{top} for this model, got {params.noise_level}"
        )
    if mask_size is not None and image_size is not None and mask_size != image_size:
        raise ContractError(
            "mask",
            f"mask is {mask_size[0]}x{mask_size[1]} but image is {image_size[0]}x{image_size[1]}",
        )
    if mode not in DEFAULT_STRENGTH and params.strength is not None:
        raise ContractError("strength", "strength needs an image (img2img or inpainting)")
    width, height = resolved_size(params, caps, image_size)
    if mode == "upscale":
        expected = resolved_size(
            params.model_copy(update={"width": None, "height": None}), caps, image_size
        )
        if (width, height) != expected or 0 in expected:
            raise ContractError(
                "width",
                f"an upscaler's output is {caps['upscale_factor']}x the input rounded down to "
                f"multiples of {upscale_input_multiple(caps)}: {expected[0]}x{expected[1]} here",
            )
        if width * height > int(caps.get("max_output_pixels") or width * height):
            raise ContractError(
                "image", f"the output {width}x{height} exceeds {caps['max_output_pixels']} pixels"
            )
    f = int(caps["latent_factor"])
    for name, side in (("width", width), ("height", height)):
        if side <= 0 or side % f:
            raise ContractError(
                name, f"{name} must be a multiple of {f} for this model, got {side}"
            )
    layers = caps.get("text_layers")
    if params.clip_skip is not None and layers is not None and params.clip_skip > int(layers):
        raise ContractError(
            "clip_skip", f"this model's text encoder has {layers} layers, got {params.clip_skip}"
        )
    if "loras" in caps:  # workers that publish their adapters
        for lora in params.loras:
            if lora.name not in caps["loras"]:
                raise ContractError(
                    "loras", f"unknown LoRA {lora.name!r}; GET /v1/loras lists them", "unknown_lora"
                )
    most = int(caps["max_steps"].get(params.sampler, 0))
    if params.steps > most:
        raise ContractError(
            "steps", f"{params.sampler} runs at most {most} steps on this model, got {params.steps}"
        )
    if mode in DEFAULT_STRENGTH:
        strength = params.strength if params.strength is not None else DEFAULT_STRENGTH[mode]
        if steps_skipped(params.steps, strength) >= params.steps:
            raise ContractError(
                "strength",
                f"strength {strength} × steps {params.steps} leaves no step to run; raise "
                "steps or the strength",
            )
    return width, height
