"""LoRA parity: generate() with adapters equals diffusers' StableDiffusionPipeline after
`load_lora_weights` + `set_adapters(names, weights)` (unfused), on tiny random SD 1.x and SD 2.x
models (SD 2.x: linear proj_in/out, OpenCLIP-style text tower as diffusers ships it).

kohya-ss files adapt every Linear and Conv2d of the UNet (LoCon: 3x3 convolutions with their
own kernel, stride and padding) and the text encoder's attention and MLP; diffusers/PEFT files
adapt the attention projections with alpha from their metadata.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from model import load_pipeline
from model.pipeline import Pipeline
from tests import lora_kit
from tests.reference import PARITY_KW, build_reference, reference_images

KW = {**PARITY_KW, "num_images": 1, "steps": 6}
ATTN = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    ref = build_reference(request.param)
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    ref.save_pretrained(root / "pipeline", safe_serialization=True)
    unet, te = ref.unet, ref.text_encoder
    kohya = lora_kit.kohya_unet_and_text(unet, te, rank=4, alpha=2.0, seed=1)
    unet_attn = [n for n in lora_kit.layers(unet) if n.endswith(ATTN)]
    te_attn = [n for n in lora_kit.layers(te) if n.endswith(("q_proj", "v_proj"))]
    peft = lora_kit.peft_tensors(
        {"unet": (unet, unet_attn), "text_encoder.text_model": (te, te_attn)}, rank=8, seed=2
    )
    meta = lora_kit.peft_metadata(
        {"unet": unet_attn, "text_encoder": te_attn},
        rank=8,
        alpha=16.0,
    )
    return {
        "ref": ref,
        "family": request.param,
        "folder": root / "pipeline",
        "kohya": lora_kit.write(root / "loras" / "style_k.safetensors", kohya),
        "peft": lora_kit.write(root / "loras" / "style_p.safetensors", peft, meta),
    }


def _reference(setup: dict[str, Any], adapters: dict[str, float]) -> np.ndarray:
    files = {name: setup[name] for name in adapters}
    with lora_kit.reference_adapters(setup["ref"], files, adapters):
        return reference_images(setup["ref"], **KW)


def _ours(pipe: Pipeline, loras: list[dict[str, Any]]) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe.generate(sampler="ddim", loras=loras, **KW)])


@pytest.mark.parametrize(
    "adapters",
    [{"kohya": 0.8}, {"peft": 0.7}, {"kohya": 0.5, "peft": 0.6}],
    ids=["kohya-locon", "peft", "kohya+peft"],
)
def test_lora_generate_matches_diffusers(setup: dict[str, Any], adapters: dict[str, float]) -> None:
    ours = load_pipeline(str(setup["folder"]), device="cpu", lora_dir=setup["kohya"].parent)
    plain = _ours(ours, [])
    # a name in lora_dir, or a path (the Python API allows both)
    specs = [
        {"name": "style_k" if a == "kohya" else str(setup[a]), "scale": s}
        for a, s in adapters.items()
    ]
    got = _ours(ours, specs)
    expected = _reference(setup, adapters)
    diff = np.abs(got.astype(int) - expected.astype(int)).max()
    print(f"LoRA parity {setup['family']} {adapters}: max pixel difference {diff}/255")  # noqa: T201
    assert diff <= 2, f"max pixel difference {diff} > 2/255"
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 20, "the adapters must matter"
    assert np.array_equal(_ours(ours, []), plain), "no adapter left applied after the job"
