"""Generation parameters as AUTOMATIC1111 writes them ("infotext"), for PNGs and /sdapi.

A1111 stores them in a PNG ``parameters`` text chunk::

    a lighthouse at dusk
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: demo

Tools that read A1111's images (its own PNG Info tab, image browsers, civitai) parse this,
so ldmserve's images open there with their settings. No torch here: the API uses it too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# ldmserve sampler → (A1111 sampler name, A1111 schedule type label; "" = Automatic).
A1111_SAMPLERS: dict[str, tuple[str, str]] = {
    "euler_a": ("Euler a", ""),
    "euler": ("Euler", ""),
    "heun": ("Heun", ""),
    "ddim": ("DDIM", ""),
    "pndm": ("PLMS", ""),
    "lcm": ("LCM", ""),
    "dpmpp_2m": ("DPM++ 2M", "Normal"),  # A1111's automatic choice for it is Karras
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
}
VERSION = "ldmserve 0.1.0"


def _quote(value: object) -> str:
    """A1111's quoting: values holding its separators become JSON strings."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def _number(value: float) -> str:
    return f"{float(value):g}"


def model_label(source: str) -> str:
    """A1111 names a model by its checkpoint's file stem; a Hugging Face id stays as is."""
    if source.startswith(("/", ".", "~")) or "\\" in source:
        source = source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".ckpt", ".pt", ".bin"):
        if source.endswith(suffix):
            return source[: -len(suffix)]
    return source


def infotext(params: Mapping[str, Any], seed: int, model: str | None = None) -> str:
    """A1111's infotext for one image of a job with native ``params``."""
    sampler, schedule = A1111_SAMPLERS.get(str(params.get("sampler")), (params.get("sampler"), ""))
    fields: list[tuple[str, object]] = [
        ("Steps", params.get("steps")),
        ("Sampler", sampler),
    ]
    if schedule:
        fields.append(("Schedule type", schedule))
    fields += [
        ("CFG scale", _number(params.get("guidance_scale", 7.5))),
        ("Seed", seed),
        ("Size", f"{params.get('width')}x{params.get('height')}"),
    ]
    if params.get("strength") is not None:
        fields.append(("Denoising strength", _number(params["strength"])))
    name = model or params.get("model")
    if name:
        fields.append(("Model", model_label(str(name))))
    if params.get("clip_skip") and int(params["clip_skip"]) > 1:  # A1111 writes it only then
        fields.append(("Clip skip", int(params["clip_skip"])))
    fields.append(("Version", VERSION))
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields))
    return "\n".join(lines)


def image_infotexts(params: Mapping[str, Any], count: int, model: str | None = None) -> list[str]:
    """One infotext per image: image ``i`` of seed ``s`` has seed ``s + i``."""
    first = int(params.get("seed") or 0)
    return [infotext(params, first + i, model) for i in range(count)]
