"""SDXL textual inversion: AUTOMATIC1111 SDXL embedding files (`clip_l` + `clip_g` vectors,
several tokens) used by name in the prompt and the second prompt equal diffusers'
StableDiffusionXLPipeline after `load_textual_inversion` once per text encoder (clip_l into
text_encoder / tokenizer, clip_g into text_encoder_2 / tokenizer_2); a file with only one of
the two is left out with an error naming it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from safetensors.torch import load_file, save_file

from model import load_pipeline
from model.embeddings import EmbeddingError, read_embedding, read_sdxl_embedding
from model.samplers import SD15_SCHEDULER_CONFIG
from tests.reference_sdxl import (
    SDXL_KW,
    SDXL_TEXT_HIDDEN,
    build_sdxl_reference,
    sdxl_reference_images,
)
from tests.test_engine import max_diff

KW = {**SDXL_KW, "num_images": 1, "steps": 5, "prompt": "a photo of xlink next to a grumpyxl",
      "prompt_2": "grumpyxl on a hill, xlink"}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ti-sdxl")
    ref = build_sdxl_reference()
    ref.scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ref.save_pretrained(root / "pipeline", safe_serialization=True)
    gen = torch.Generator().manual_seed(7)
    emb = root / "embeddings"
    emb.mkdir()
    for name, n in (("xlink", 3), ("grumpyxl", 1)):  # widths: the towers' (both 32 here)
        vectors = {k: torch.randn(n, SDXL_TEXT_HIDDEN, generator=gen) for k in ("clip_l", "clip_g")}
        save_file(vectors, str(emb / f"{name}.safetensors"))
    save_file({"clip_g": torch.randn(2, SDXL_TEXT_HIDDEN)}, str(emb / "lonely.safetensors"))
    return {"ref": ref, "folder": root / "pipeline", "emb": emb}


def test_sdxl_embeddings_match_diffusers(
    setup: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    ref, emb = setup["ref"], setup["emb"]
    for name in ("xlink", "grumpyxl"):
        vectors = load_file(str(emb / f"{name}.safetensors"))
        ref.load_textual_inversion(
            vectors["clip_l"], token=name, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer
        )
        ref.load_textual_inversion(
            vectors["clip_g"],
            token=name,
            text_encoder=ref.text_encoder_2,
            tokenizer=ref.tokenizer_2,
        )
    expected = sdxl_reference_images(ref, **KW)
    with caplog.at_level(logging.ERROR, logger="model.embeddings"):
        ours = load_pipeline(str(setup["folder"]), device="cpu", embeddings_dir=emb)
    assert ours.embeddings == {"grumpyxl": 1, "xlink": 3}
    assert "lonely.safetensors" in caplog.text and "'clip_l'" in caplog.text
    got = np.stack([np.asarray(im) for im in ours.generate(sampler="euler", **KW)])
    diff = max_diff(got, expected)
    print(f"SDXL embeddings parity: max pixel difference {diff}/255")  # noqa: T201
    assert diff <= 2, f"max pixel difference {diff} > 2/255"
    plain = load_pipeline(str(setup["folder"]), device="cpu")
    without = np.stack([np.asarray(im) for im in plain.generate(sampler="euler", **KW)])
    assert max_diff(got, without) > 10, "the embeddings matter"


def test_sdxl_files_and_one_encoder_files_are_told_apart(setup: dict[str, Any]) -> None:
    emb: Path = setup["emb"]
    with pytest.raises(EmbeddingError, match=r"lonely\.safetensors: an SDXL model needs"):
        read_sdxl_embedding(emb / "lonely.safetensors", {"clip_l": 32, "clip_g": 32})
    assert read_sdxl_embedding(emb / "lonely.safetensors", {"clip_g": 32})["clip_g"].shape == (
        2,
        32,
    )
    with pytest.raises(EmbeddingError, match=r"xlink\.safetensors: an SDXL embedding"):
        read_embedding(emb / "xlink.safetensors", 32)
