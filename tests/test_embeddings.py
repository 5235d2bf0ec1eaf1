"""Textual-inversion embeddings: generate() with an embeddings directory equals diffusers'
pipeline after `load_textual_inversion` (A1111 .pt multi-vector, diffusers learned_embeds);
A1111 .safetensors (`emb_params`) gives the same vectors as its .pt; bad files are left out
with the others still loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model import load_pipeline
from tests.reference import PARITY_KW, build_reference, reference_images

KW = {**PARITY_KW, "num_images": 1, "steps": 5, "prompt": "a photo of inkling next to a grumpycat"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ref = build_reference("sd1")
    root = tmp_path_factory.mktemp("ti")
    ref.save_pretrained(root / "pipeline", safe_serialization=True)
    width = ref.text_encoder.config.hidden_size
    gen = torch.Generator().manual_seed(5)
    three = torch.randn(3, width, generator=gen)
    one = torch.randn(width, generator=gen)
    emb = root / "embeddings"
    emb.mkdir()
    torch.save(
        {"string_to_param": {"*": three}, "name": "inkling", "step": 100}, emb / "inkling.pt"
    )
    save_file({"<grumpycat>": one}, str(emb / "grumpycat.safetensors"))
    (emb / "broken.pt").write_bytes(b"not a pickle")
    save_file({"emb_params": torch.zeros(2, width + 1)}, str(emb / "wide.safetensors"))
    return {"ref": ref, "folder": root / "pipeline", "emb": emb, "three": three}


def test_embeddings_match_diffusers_load_textual_inversion(setup: dict[str, Any]) -> None:
    ref, emb = setup["ref"], setup["emb"]
    ref.load_textual_inversion(str(emb / "inkling.pt"), token="inkling")
    ref.load_textual_inversion(str(emb / "grumpycat.safetensors"), token="grumpycat")
    expected = reference_images(ref, **KW)
    ours = load_pipeline(str(setup["folder"]), device="cpu", embeddings_dir=emb)
    assert ours.embeddings == {"grumpycat": 1, "inkling": 3}  # broken / wide left out
    got = np.stack([np.asarray(im) for im in ours.generate(sampler="ddim", **KW)])
    diff = np.abs(got.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff} > 2/255"
    plain = load_pipeline(str(setup["folder"]), device="cpu")
    without = np.stack([np.asarray(im) for im in plain.generate(sampler="ddim", **KW)])
    assert np.abs(got.astype(int) - without.astype(int)).max() > 10, "the embeddings matter"


def test_a1111_safetensors_equals_its_pt(setup: dict[str, Any], tmp_path: Path) -> None:
    save_file({"emb_params": setup["three"]}, str(tmp_path / "inkling.safetensors"))
    a = load_pipeline(str(setup["folder"]), device="cpu", embeddings_dir=tmp_path)
    b = load_pipeline(str(setup["folder"]), device="cpu", embeddings_dir=setup["emb"])
    prompt = ["inkling on a hill"]
    assert torch.equal(a.encode_prompts(prompt).crossattn, b.encode_prompts(prompt).crossattn)
