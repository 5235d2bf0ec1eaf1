"""A1111's ``info`` answer: the JSON string describing a finished txt2img / img2img job."""

from __future__ import annotations

import json
import time
from typing import Any

from service.compat.a1111_samplers import a1111_sampler_name
from service.infotext import VERSION, image_infotexts


def info_json(record_params: dict[str, Any], fields: dict[str, Any], job_id: str,
          ignored: list[str], count: int, interrupted: bool) -> str:  # fmt: skip
    seed = int(record_params.get("seed", 0))
    n = max(count, 1)
    prompt, negative = fields["prompt"], fields["negative_prompt"]
    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * n,
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * n,
        "seed": seed,
        "all_seeds": [seed + i for i in range(n)],
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": fields["width"],
        "height": fields["height"],
        "sampler_name": a1111_sampler_name(fields["sampler"]),
        "cfg_scale": fields["guidance_scale"],
        "steps": fields["steps"],
        "batch_size": n,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": record_params.get("model"),
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": fields.get("strength"),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": image_infotexts(record_params, n) if count else [],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime()),
        "clip_skip": fields.get("clip_skip") or 1,
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
        "interrupted": interrupted,
        "ldmserve_job_id": job_id,
        "ldmserve_ignored_fields": ignored,
    }
    return json.dumps(info)
