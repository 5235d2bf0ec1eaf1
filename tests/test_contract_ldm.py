"""The API's torch-free judgement and the pipeline's own agree on the text-free LDM families
(unconditional, upscale) and the x4 upscaler: prompt, mode, upscale size and limit, strength,
noise level."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from model.generation_checks import MODEL_FIELDS, GenerationError
from service.contract import ContractError, GenerationParams, check_capabilities, resolved_size
from tests.tiny import ldm_pipeline, x4_pipeline

CASES: dict[str, list[dict[str, Any]]] = {
    "uncond": [
        {},
        {"prompt": "a face"},
        {"width": 32, "height": 96},
        {"width": 30, "height": 64},
        {"strength": 0.5},
        {"image": (64, 64)},
        {"sampler": "lcm", "steps": 51},
    ],
    "sr": [
        {"image": (64, 32)},
        {"image": (70, 40)},
        {"image": (64, 32), "width": 128, "height": 64},
        {"image": (64, 32), "width": 64, "height": 64},
        {"image": (20, 32)},
        {"image": (64, 32), "prompt": "sharp"},
        {"image": (64, 32), "strength": 0.3},
        {"image": (64, 32), "mask": (64, 32)},
        {},
        {"image": (1056, 1024)},  # 2112 x 2048 > 2048^2 pixels
    ],
    "x4": [  # inputs round down to multiples of 4; the tiny UNet embeds noise levels 0..99
        {"image": (36, 32)},
        {"image": (38, 33)},
        {"image": (36, 32), "width": 144, "height": 128},
        {"image": (36, 32), "width": 128, "height": 128},
        {"image": (36, 32), "noise_level": 0},
        {"image": (36, 32), "noise_level": 99},
        {"image": (36, 32), "noise_level": 100},
        {"image": (36, 32), "negative_prompt": "blurry", "guidance_scale": 9.0},
        {"image": (36, 32), "prompt": ""},  # upscaling without a prompt, as diffusers allows
        {"image": (36, 32), "strength": 0.3},
        {"image": (36, 32), "mask": (36, 32)},
        {"image": (36, 32), "aesthetic_score": 6.0},
        {},
        {"image": (520, 520)},  # 2080 x 2080 > 2048^2 pixels
    ],
}
PIPELINES = {
    "uncond": lambda: ldm_pipeline("uncond"),
    "sr": lambda: ldm_pipeline("sr"),
    "x4": x4_pipeline,
}


@pytest.mark.parametrize("kind", list(CASES))
def test_capability_checks_follow_the_pipeline(kind: str) -> None:
    pipe = PIPELINES[kind]()
    caps = pipe.capabilities.to_dict()
    for case in CASES[kind]:
        kw = {"steps": 4, **({"prompt": "a fox"} if kind == "x4" else {}), **case}
        img = Image.new("RGB", kw.pop("image")) if "image" in kw else None
        msk = Image.new("L", kw.pop("mask")) if "mask" in kw else None
        params = GenerationParams(**kw)
        try:
            sizes = check_capabilities(params, caps, img and img.size, msk and msk.size)
            api_field = None
        except ContractError as exc:
            api_field, sizes = exc.field, None
        width, height = pipe.output_size(params.width, params.height, img)
        try:
            pipe.check(width=width, height=height, steps=params.steps, sampler=params.sampler,
                       num_images=1, image=img, mask=msk, strength=params.strength,
                       prompt=params.prompt,
                       **{name: getattr(params, name) for name in MODEL_FIELDS})  # fmt: skip
            model_field = None
        except GenerationError as exc:
            model_field = exc.field
        assert api_field == model_field, (kind, case)
        if sizes is not None:
            assert sizes == (width, height) == resolved_size(params, caps, img and img.size)
