"""SDXL LoRA: generate() with one and with two adapters equals diffusers'
StableDiffusionXLPipeline after `load_lora_weights` + `set_adapters(names, weights)` (unfused)
on the tiny SDXL model (the refiner, bigG only: `lora_te2_` + UNet, img2img); in the engine, SDXL jobs with different adapter sets (and none) share
UNet calls and each equals its solo image.

The kohya file is LoCon in the original layout sd-scripts writes for SDXL (every UNet Linear
and Conv2d as `lora_unet_input_blocks_..`, and both towers as `lora_te1_` / `lora_te2_`);
the PEFT file adapts the UNet's attention and both towers' q/v projections (`unet.`,
`text_encoder.`, `text_encoder_2.`) with alpha from its metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from model.samplers import SD15_SCHEDULER_CONFIG
from service.engine import Engine
from tests import lora_kit
from tests.reference_sdxl import (
    SDXL_KW,
    build_sdxl_reference,
    build_sdxl_refiner,
    sdxl_reference_images,
)
from tests.test_engine import assert_all_equal_solo, max_diff, req, run_until_idle, solo
from tests.test_pipeline_image_modes import source_image

KW = {**SDXL_KW, "num_images": 1, "steps": 5}
ATTN = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ref = build_sdxl_reference()
    ref.scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    root = tmp_path_factory.mktemp("lora-sdxl")
    ref.save_pretrained(root / "pipeline", safe_serialization=True)
    ours = load_pipeline(str(root / "pipeline"), device="cpu", lora_dir=root / "loras")
    te1, te2 = ref.text_encoder, ref.text_encoder_2
    kohya = lora_kit.kohya_sdxl(ours.unet, te1, te2, rank=4, alpha=2.0, seed=11)
    unet_attn = [n for n in lora_kit.layers(ref.unet) if n.endswith(ATTN)]
    targets, networks = lora_kit.peft_sdxl(ref.unet, te1, te2, unet_attn, ("q_proj", "v_proj"))
    peft = lora_kit.peft_tensors(networks, rank=8, seed=12)
    meta = lora_kit.peft_metadata(targets, rank=8, alpha=16.0)
    return {
        "ref": ref,
        "ours": ours,
        "kohya": lora_kit.write(root / "loras" / "xl_k.safetensors", kohya),
        "peft": lora_kit.write(root / "loras" / "xl_p.safetensors", peft, meta),
    }


def _reference(
    ref: Any, files: dict[str, Path], adapters: dict[str, float], **kw: Any
) -> tuple[np.ndarray, Any]:
    """diffusers' images and its (prompt_embeds, pooled_prompt_embeds) with the adapters."""
    with lora_kit.reference_adapters(ref, files, adapters):
        with torch.no_grad():
            embeds = ref.encode_prompt(
                KW["prompt"], device="cpu", do_classifier_free_guidance=False
            )
        return sdxl_reference_images(ref, **{**KW, **kw}), (embeds[0], embeds[2])


def _assert_text_matches(ours: Pipeline, specs: list[dict[str, Any]], expected: Any) -> None:
    """The adapted towers' outputs equal diffusers' (context: ViT-L's + bigG's features, bigG's
    pooled vector), and each tower's adapter changes its part of the context."""
    context, pooled = expected
    text = ours.encode_prompts([KW["prompt"]], adapters=[ours.adapter_set(specs)])
    torch.testing.assert_close(text.crossattn, context, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text.pooled, pooled, atol=1e-4, rtol=1e-4)
    bare = ours.encode_prompts([KW["prompt"]]).crossattn
    widths = [t.hidden_size for t in (ours.text.first, ours.text.second) if t is not None]  # type: ignore[union-attr]
    for a, b in zip(bare.split(widths, -1), text.crossattn.split(widths, -1), strict=True):
        assert (a - b).abs().max() > 0.05, "each tower's adapter changes its output"


def _ours(pipe: Pipeline, loras: list[dict[str, Any]]) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe.generate(sampler="euler", loras=loras, **KW)])


@pytest.mark.parametrize(
    "adapters",
    [{"kohya": 0.8}, {"peft": 0.7}, {"kohya": 0.5, "peft": 0.6}],
    ids=["kohya-locon", "peft", "kohya+peft"],
)
def test_sdxl_lora_matches_diffusers(setup: dict[str, Any], adapters: dict[str, float]) -> None:
    ours: Pipeline = setup["ours"]
    parts = {p for a in adapters for p in ours.loras.load(str(setup[a])).parts}
    assert parts == {"unet", "text", "text_2"}, "both towers and the UNet are adapted"
    plain = _ours(ours, [])
    specs = [{"name": setup[a].stem, "scale": s} for a, s in adapters.items()]
    got = _ours(ours, specs)
    files = {a: setup[a] for a in adapters}
    expected, text = _reference(setup["ref"], files, adapters)
    diff = max_diff(got, expected)
    print(f"SDXL LoRA parity {adapters}: max pixel difference {diff}/255")  # noqa: T201
    _assert_text_matches(ours, specs, text)
    assert diff <= 2, f"max pixel difference {diff} > 2/255"
    assert max_diff(got, plain) > 20, "the adapters must matter"
    assert np.array_equal(_ours(ours, []), plain), "no adapter left applied after the job"


def test_sdxl_jobs_with_different_adapters_share_calls_and_equal_solo(
    setup: dict[str, Any],
) -> None:
    ours: Pipeline = setup["ours"]
    kw = {"steps": 4, "sampler": "euler", "width": 64, "height": 64}
    jobs = [
        req("none", "a red fox", seed=1, **kw),
        req("k", "a red fox", seed=1, loras=[{"name": "xl_k", "scale": 0.8}], **kw),
        req("kp", "a red fox", seed=2, prompt_2="ink", loras=[{"name": "xl_k"}, {"name": "xl_p", "scale": 0.5}], **kw),
        req("p", "a boat <lora:xl_p:1.3>", seed=3, negative_prompt="grainy", **kw),
    ]  # fmt: skip
    ours.adapter_set([{"name": "xl_k"}, {"name": "xl_p"}])  # resident: no read to wait for
    engine = Engine(ours, max_batch=16)
    handles = [engine.submit(j) for j in jobs]
    calls = [c for o in run_until_idle(engine) for c in o.calls]
    assert calls == [(8, 4)] * 4, "every UNet call holds the 4 jobs' 8 rows"
    assert_all_equal_solo(ours, handles)
    assert max_diff(solo(ours, jobs[0]), solo(ours, jobs[1])) > 20, "the adapter matters"


def test_sdxl_refiner_lora_adapts_bigg_and_matches_diffusers(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    ref = build_sdxl_refiner(setup["ref"])
    ref.save_pretrained(tmp_path / "refiner", safe_serialization=True)
    ours = load_pipeline(str(tmp_path / "refiner"), device="cpu")
    te2 = ref.text_encoder_2
    tensors = lora_kit.kohya_sdxl(ours.unet, te2, te2, rank=4, alpha=2.0, seed=13)
    refiner_file = {k: v for k, v in tensors.items() if not k.startswith("lora_te1_")}
    path = lora_kit.write(tmp_path / "loras" / "xl_r.safetensors", refiner_file)
    kw = {"image": source_image(), "strength": 0.6}
    expected, text = _reference(ref, {"r": path}, {"r": 0.9}, **kw)
    specs = [{"name": str(path), "scale": 0.9}]
    got = np.stack(
        [np.asarray(im) for im in ours.generate(sampler="euler", loras=specs, **KW, **kw)]
    )
    _assert_text_matches(ours, specs, text)
    assert set(ours.loras.load(str(path)).parts) == {"unet", "text_2"}
    diff = max_diff(got, expected)
    print(f"SDXL refiner LoRA parity: max pixel difference {diff}/255")  # noqa: T201
    assert diff <= 2, f"max pixel difference {diff} > 2/255"
    with pytest.raises(GenerationError, match=r"xl_k\.safetensors: key 'lora_te1_.*no text to"):
        ours.adapter_set([{"name": str(setup["kohya"])}])
