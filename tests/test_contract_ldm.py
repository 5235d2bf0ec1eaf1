"""The API's torch-free judgement and the pipeline's own agree on the text-free LDM families
(unconditional, upscale): prompt, mode, upscale size and limit, strength."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from model.pipeline import GenerationError
from service.contract import ContractError, GenerationParams, check_capabilities, resolved_size
from tests.tiny import ldm_pipeline

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
}


@pytest.mark.parametrize("kind", list(CASES))
def test_capability_checks_follow_the_pipeline(kind: str) -> None:
    pipe = ldm_pipeline(kind)
    caps = pipe.capabilities.to_dict()
    for case in CASES[kind]:
        kw = {"steps": 4, **case}
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
                       prompt=params.prompt)  # fmt: skip
            model_field = None
        except GenerationError as exc:
            model_field = exc.field
        assert api_field == model_field, (kind, case)
        if sizes is not None:
            assert sizes == (width, height) == resolved_size(params, caps, img and img.size)
