"""Full generate() parity with diffusers' StableDiffusionPipeline, and the loaders' sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from model import load_pipeline
from tests.reference import FAMILIES, PARITY_KW, build_reference, reference_images


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[StableDiffusionPipeline, Path]:
    pipe = build_reference(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "pipeline"
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder


def ours_images(pipe: Any, **kw: Any) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe.generate(**kw)])


def test_generate_ddim_matches_diffusers(reference: tuple[StableDiffusionPipeline, Path]) -> None:
    ref, folder = reference
    ours = load_pipeline(str(folder), device="cpu")
    expected = reference_images(ref, **PARITY_KW)
    got = ours_images(ours, sampler="ddim", **PARITY_KW)
    assert got.shape == expected.shape == (2, 72, 64, 3)
    diff = np.abs(got.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff} > 2/255"
    assert np.abs(got[0].astype(int) - got[1].astype(int)).max() > 10, (
        "images of seeds s and s+1 must differ"
    )
