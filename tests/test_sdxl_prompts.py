"""SDXL with long and weighted prompts and clip_skip, against diffusers'
StableDiffusionXLPipeline on the same tiny weights: long prompts are fed to diffusers as
`prompt_embeds` / `pooled_prompt_embeds` built by an independent reference (each tower's
chunks from tests/a1111_reference.py's chunker, encoded alone: penultimate states, weights
with the mean restored per chunk and tower; the pooled vector of bigG's first chunk,
unweighted); clip_skip=2 against diffusers' own clip_skip=1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from model import load_pipeline
from model.pipeline import Pipeline
from model.samplers import SD15_SCHEDULER_CONFIG
from tests.a1111_reference import ref_chunks
from tests.reference_sdxl import SDXL_KW, build_sdxl_reference, sdxl_reference_images
from tests.test_pipeline_samplers import max_diff, write_scheduler_config

LONG = ", ".join(f"(word{i}:1.2) tree" for i in range(30)) + " BREAK [misty] hills"
KW: dict[str, Any] = {**SDXL_KW, "num_images": 1}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Pipeline]:
    ref = build_sdxl_reference()
    ref.scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    folder: Path = tmp_path_factory.mktemp("sdxl_prompts") / "pipeline"
    ref.save_pretrained(folder, safe_serialization=True)
    write_scheduler_config(folder, SD15_SCHEDULER_CONFIG)
    return ref, load_pipeline(str(folder), device="cpu")


@torch.no_grad()
def ref_tower(model: Any, tokenizer: Any, prompt: str, pad_id: int) -> tuple[list[Any], Any]:
    """One tower's chunks: [(1, 77, D)] penultimate states weighted, mean restored; and the
    first chunk's text_embeds (bigG) or None."""
    chunks, pooled = [], None
    for i, (ids, weights) in enumerate(ref_chunks(tokenizer, prompt, pad_id)):
        out = model(torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[-2]
        original = z.mean()
        z = z * torch.tensor(weights)[None, :, None]
        chunks.append(z * (original / z.mean()))
        if i == 0 and hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return chunks, pooled


def ref_sdxl(ref: Any, prompts: list[tuple[str, str]]) -> list[tuple[Any, Any]]:
    """(context, pooled) of each (prompt, prompt_2); every tower and row padded with that
    tower's empty-prompt chunk to the longest of all."""
    towers = [(ref.text_encoder, ref.tokenizer, 49407), (ref.text_encoder_2, ref.tokenizer_2, 0)]
    empty = [ref_tower(m, t, "", pad)[0][0] for m, t, pad in towers]
    rows = []
    for pair in prompts:
        encoded = [
            ref_tower(m, t, text, pad) for (m, t, pad), text in zip(towers, pair, strict=True)
        ]
        rows.append(([c for c, _ in encoded], encoded[1][1]))
    longest = max(len(chunks) for parts, _ in rows for chunks in parts)
    out = []
    for parts, pooled in rows:
        padded = [
            torch.cat(c + [e] * (longest - len(c)), dim=1)
            for c, e in zip(parts, empty, strict=True)
        ]
        out.append((torch.cat(padded, dim=-1), pooled))
    return out


@pytest.mark.parametrize(
    ("prompt", "prompt_2", "negative"),
    [
        (LONG, None, "blurry"),  # conditional 3 chunks, unconditional 1: padded
        ("a red bicycle", None, LONG),  # the other way round
        (LONG, "a short second prompt", "(blurry:1.3)"),  # the towers' lengths differ
    ],
)
def test_long_weighted_prompts_match_diffusers_fed_the_reference_embeddings(
    sdxl: tuple[Any, Pipeline], prompt: str, prompt_2: str | None, negative: str
) -> None:
    ref, ours = sdxl
    (cond, pooled), (uncond, upooled) = ref_sdxl(
        ref, [(prompt, prompt_2 or prompt), (negative, negative)]
    )
    assert cond.shape[1] > 77 and cond.shape == uncond.shape
    n, seed = KW["num_images"], KW["seed"]
    expected = ref(
        prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=upooled, num_inference_steps=KW["steps"],
        guidance_scale=KW["guidance_scale"], width=KW["width"], height=KW["height"],
        num_images_per_prompt=n, output_type="np",
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
    ).images  # fmt: skip
    expected = (expected * 255).round().astype(np.uint8)
    kw = {**KW, "prompt": prompt, "prompt_2": prompt_2, "negative_prompt": negative}
    got = np.stack([np.asarray(im) for im in ours.generate(sampler="euler", **kw)])
    assert max_diff(got, expected) <= 2, f"max pixel difference {max_diff(got, expected)} > 2"


def test_clip_skip_2_matches_diffusers_clip_skip_1(sdxl: tuple[Any, Pipeline]) -> None:
    """diffusers applies clip_skip to the prompt only; ldmserve (as A1111) to both, so the
    unconditional embeddings come from diffusers' encode_prompt of the negative prompt."""
    ref, ours = sdxl
    cond, _, pooled, _ = ref.encode_prompt(KW["prompt"], device="cpu", clip_skip=1,
                                           do_classifier_free_guidance=False)  # fmt: skip
    uncond, _, upooled, _ = ref.encode_prompt(KW["negative_prompt"], device="cpu", clip_skip=1,
                                              do_classifier_free_guidance=False)  # fmt: skip
    expected = sdxl_reference_images(
        ref, **{k: v for k, v in KW.items() if k not in ("prompt", "negative_prompt")},
        prompt=None, prompt_embeds=cond, negative_prompt_embeds=uncond,
        pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=upooled,
    )  # fmt: skip
    got = np.stack([np.asarray(im) for im in ours.generate(sampler="euler", clip_skip=2, **KW)])
    assert max_diff(got, expected) <= 2, f"max pixel difference {max_diff(got, expected)} > 2"
    plain = np.stack([np.asarray(im) for im in ours.generate(sampler="euler", **KW)])
    assert max_diff(got, plain) > 4, "clip_skip=2 must change the image"
    assert ours.capabilities.text_layers == 2  # 3-block towers: the penultimate and one below
