"""Long, weighted prompts and clip_skip through generate(), against diffusers'
StableDiffusionPipeline on the same tiny weights: long prompts fed to diffusers as
`prompt_embeds` / `negative_prompt_embeds` computed by the independent reference
(tests/a1111_reference.py); clip_skip=2 against diffusers' own `clip_skip=1` (diffusers
counts the layers skipped, A1111 and ldmserve the layer used)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from tests.a1111_reference import ref_pair
from tests.reference import FAMILIES, PARITY_KW, build_reference

LONG = ", ".join(f"(word{i}:1.2) tree" for i in range(30)) + " BREAK [misty] hills"
PAD_IDS = {"sd1": 49407, "sd2": 0}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, StableDiffusionPipeline, Pipeline]:
    ref = build_reference(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "pipeline"
    ref.save_pretrained(folder, safe_serialization=True)
    return request.param, ref, load_pipeline(str(folder), device="cpu")


def diffusers_images(ref: StableDiffusionPipeline, cond: Any, uncond: Any, **kw: Any) -> np.ndarray:
    n, seed = kw["num_images"], kw["seed"]
    out = ref(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=kw["steps"],
        guidance_scale=kw["guidance_scale"],
        width=kw["width"],
        height=kw["height"],
        num_images_per_prompt=n,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
        output_type="np",
    ).images
    return (out * 255).round().astype(np.uint8)


def ours_images(pipe: Pipeline, **kw: Any) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe.generate(sampler="ddim", **kw)])


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize(
    ("prompt", "negative", "clip_skip"),
    [
        (LONG, "blurry", None),  # conditional 3 chunks, unconditional 1: padded
        ("a red bicycle", LONG, None),  # the other way round
        (LONG, "(blurry:1.3), " + LONG, 2),  # both long, different lengths, penultimate layer
    ],
)
def test_long_weighted_prompts_match_diffusers_fed_the_reference_embeddings(
    pair: tuple[str, StableDiffusionPipeline, Pipeline],
    prompt: str,
    negative: str,
    clip_skip: int | None,
) -> None:
    family, ref, ours = pair
    cond, uncond = ref_pair(
        ref.text_encoder, ref.tokenizer, prompt, negative, pad_id=PAD_IDS[family],
        clip_skip=clip_skip or 1,
    )  # fmt: skip
    assert cond.shape[1] > 77 and cond.shape == uncond.shape
    kw = {**PARITY_KW, "prompt": prompt, "negative_prompt": negative}
    expected = diffusers_images(ref, cond, uncond, **kw)
    got = ours_images(ours, clip_skip=clip_skip, **kw)
    assert got.shape == expected.shape == (2, 72, 64, 3)
    assert max_diff(got, expected) <= 2, f"max pixel difference {max_diff(got, expected)} > 2"
    # The long prompt is not the truncated one: cutting it to 75 tokens changes the image.
    cut = ref.tokenizer.decode(ref.tokenizer(prompt, add_special_tokens=False).input_ids[:75])
    if len(cut) < len(prompt):
        assert max_diff(ours_images(ours, clip_skip=clip_skip, **{**kw, "prompt": cut}), got) > 4


def test_clip_skip_2_matches_diffusers_clip_skip_1(
    pair: tuple[str, StableDiffusionPipeline, Pipeline],
) -> None:
    _, ref, ours = pair
    if not hasattr(ref.text_encoder, "text_model"):
        # diffusers reaches the final layer norm through `text_encoder.text_model`, which
        # transformers 5's CLIPTextModel no longer has; point it at the model itself (not
        # registered as a submodule, so no module cycle).
        object.__setattr__(ref.text_encoder, "text_model", ref.text_encoder)
    # diffusers applies clip_skip to the prompt only; ldmserve (as A1111) to both, so the
    # negative prompt's embedding comes from diffusers' same encode_prompt with clip_skip=1.
    cond = ref.encode_prompt(PARITY_KW["prompt"], "cpu", 1, False, clip_skip=1)[0]
    uncond = ref.encode_prompt(PARITY_KW["negative_prompt"], "cpu", 1, False, clip_skip=1)[0]
    expected = diffusers_images(ref, cond, uncond, **PARITY_KW)
    got = ours_images(ours, clip_skip=2, **PARITY_KW)
    assert max_diff(got, expected) <= 2, f"max pixel difference {max_diff(got, expected)} > 2"
    assert max_diff(got, ours_images(ours, **PARITY_KW)) > 4, "clip_skip=2 must change the image"
    assert (
        max_diff(ours_images(ours, clip_skip=1, **PARITY_KW), ours_images(ours, **PARITY_KW)) == 0
    )


def test_clip_skip_beyond_the_encoders_layers_names_the_field(
    pair: tuple[str, StableDiffusionPipeline, Pipeline],
) -> None:
    _, _, ours = pair
    with pytest.raises(GenerationError, match=r"clip_skip must be in 1\.\.2") as err:
        ours.generate("x", width=64, height=64, steps=2, clip_skip=3)
    assert err.value.field == "clip_skip"
    assert ours.capabilities.text_layers == 2
