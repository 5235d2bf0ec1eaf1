"""What a model can run: a generation request's parameters checked against a loaded
pipeline (size, mode, inputs, sampler and steps, strength, clip_skip, the fields only some
models read), each refusal a GenerationError naming the parameter, so the service can turn it
into a 422 on that field. The service's own check of a request against published
capabilities (service.contract) must agree with this one (tests/test_contract*.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import Image

from model import samplers

if TYPE_CHECKING:
    from model.pipeline import Pipeline

DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # diffusers' pipeline defaults
# Generation fields only some models read (service.contract.MODEL_FIELDS mirrors this).
MODEL_FIELDS = (
    "prompt_2", "negative_prompt_2", "aesthetic_score", "negative_aesthetic_score", "noise_level",
)  # fmt: skip


class GenerationError(ValueError):
    """A generation request the pipeline cannot run; the message says which parameter and why."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def check_generation(
    pipe: Pipeline,
    *,
    width: int,
    height: int,
    steps: int,
    sampler: str,
    num_images: int,
    image: Image.Image | None,
    mask: Image.Image | None,
    strength: float | None,
    clip_skip: int | None = None,
    prompt: str = "",
    **model_fields: Any,
) -> tuple[str, float | None]:
    """(mode, strength) of a request `pipe` can run, or GenerationError naming the parameter;
    `model_fields` are MODEL_FIELDS as given (None: not given)."""
    pipe.latent_shape(width, height)
    for name, value in model_fields.items():
        if value is not None and name not in pipe.model_fields:
            raise GenerationError(f"{pipe.name} does not take {name}", name)
    if pipe.low_res_noise is not None:
        try:
            pipe.low_res_noise.level(model_fields.get("noise_level"))
        except ValueError as exc:
            raise GenerationError(str(exc), "noise_level") from None
    layers = pipe.text.layers if pipe.text is not None else 0
    if clip_skip is not None and not 1 <= clip_skip <= layers:
        raise GenerationError(
            f"clip_skip must be in 1..{layers} for this model, got {clip_skip}"
            if layers
            else f"{pipe.name} has no text encoder: clip_skip does not apply",
            "clip_skip",
        )
    if num_images < 1:
        raise GenerationError(f"num_images must be at least 1, got {num_images}", "num_images")
    if mask is not None and image is None:
        raise GenerationError("a mask needs an image to inpaint", "mask")
    if prompt and not pipe.takes_prompt:
        raise GenerationError(f"{pipe.name} takes no prompt", "prompt")
    mode = pipe.mode_of(image, mask)
    if mode not in pipe.capabilities.modes:
        inpainter = mode == "img2img" and "inpaint" in pipe.capabilities.modes
        raise GenerationError(
            f"{pipe.name} cannot run {mode}; it runs {', '.join(pipe.capabilities.modes)}",
            "mask" if mode == "inpaint" or inpainter else "image",
        )
    if mask is not None and image is not None and mask.size != image.size:
        raise GenerationError(
            f"mask is {mask.size[0]}x{mask.size[1]} but image is "
            f"{image.size[0]}x{image.size[1]}; they must be the same size",
            "mask",
        )
    if mode == "upscale" and image is not None:
        expected = pipe.output_size(None, None, image)
        if (width, height) != expected or 0 in image.size:
            raise GenerationError(
                f"an upscaler's output is {pipe.vae_scale_factor}x the input rounded down to "
                f"multiples of {pipe.upscale_input_multiple}: {expected[0]}x{expected[1]} here, "
                f"got {width}x{height}",
                "width",
            )
        if width * height > pipe.max_upscale_pixels:
            raise GenerationError(
                f"the output {width}x{height} exceeds {pipe.max_upscale_pixels} pixels", "image"
            )
    if mode not in DEFAULT_STRENGTH and strength is not None:
        raise GenerationError("strength needs an image (img2img or inpainting)", "strength")
    strength = DEFAULT_STRENGTH.get(mode) if strength is None else strength
    try:
        start = samplers.start_step(steps, strength) if mode in DEFAULT_STRENGTH else 0
        samplers.plan(sampler, steps, pipe.schedule, start)
    except ValueError as exc:
        name = (
            "strength"
            if "strength" in str(exc)
            else "sampler"
            if "sampler" in str(exc)
            else "steps"
        )
        raise GenerationError(str(exc), name) from None
    return mode, strength
