"""VQ autoencoder: encode/decode parity with diffusers' VQModel (within 1e-5) on tiny random
configs — diffusers' LDM test shape (f=2) and an irregular one (f=4, vq_embed_dim 5) — loaded
from a diffusers folder and from an original CompVis-layout single file; the tile blending
(the real decoder in tiles: tests/test_engine_ldm.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import VQModel
from safetensors.torch import load_file, save_file

from model.first_stage import decode_in_tiles
from model.vq import VQAutoencoder
from model.vq_convert import (
    CODEBOOK_KEY,
    vq_config_from_diffusers,
    vq_from_diffusers,
    vq_from_ldm,
    vq_state_dict_to_ldm,
)
from model.weights import CheckpointError
from tests.tiny import VQ_IRREGULAR, VQ_TEST, randomize_

CONFIGS: dict[str, dict[str, Any]] = {"test": VQ_TEST, "irregular": VQ_IRREGULAR}


def _reference(cfg: dict[str, Any], folder: Path) -> VQModel:
    ref = randomize_(VQModel(**cfg), seed=5, scale=0.1).eval()
    ref.save_pretrained(folder, safe_serialization=True)
    return ref


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * max(ref.abs().max().item(), 1.0))


def _assert_parity(ours: VQAutoencoder, ref: VQModel) -> None:
    f = ours.downsampling_factor
    g = torch.Generator().manual_seed(3)
    images = torch.rand((2, 3, 6 * f, 5 * f), generator=g) * 2 - 1
    with torch.no_grad():
        latents = ours.encode(images).latents
        ref_latents = ref.encode(images).latents
        _assert_close(latents, ref_latents)
        _assert_close(ours.decode(ref_latents), ref.decode(ref_latents).sample)
        z = torch.randn(ref_latents.shape, generator=g)  # off-codebook latents: quantised first
        _assert_close(ours.decode(z), ref.decode(z).sample)
    assert latents.shape == (2, ours.latent_channels, 6, 5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_folder_matches_vqmodel(name: str, tmp_path: Path) -> None:
    ref = _reference(CONFIGS[name], tmp_path)
    ours = vq_from_diffusers(tmp_path)
    assert ours.scaling_factor == ref.config.scaling_factor
    assert ours.config.n_embed == ref.config.num_vq_embeddings
    _assert_parity(ours, ref)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compvis_single_file_loads_and_agrees(name: str, tmp_path: Path) -> None:
    """Our weights under CompVis' names (first_stage_model.quantize.embedding.weight, ...) load
    back by shape detection alone and agree with diffusers on the same weights."""
    ref = _reference(CONFIGS[name], tmp_path)
    path = tmp_path / "vq.safetensors"
    save_file(vq_state_dict_to_ldm(vq_from_diffusers(tmp_path)), str(path))
    checkpoint = load_file(str(path))
    assert "first_stage_model." + CODEBOOK_KEY in checkpoint
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in checkpoint
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in checkpoint
    stripped = {k.removeprefix("first_stage_model."): v for k, v in checkpoint.items()}
    ours = vq_from_ldm(stripped, source=str(path), scaling_factor=ref.config.scaling_factor)
    _assert_parity(ours, ref)


def test_tiles_blend_exactly_for_a_local_decoder() -> None:
    """The tiling itself (origins, ramps, normalisation) is exact: a decoder that acts per
    position (nearest upsampling + 1x1 conv) gives the whole-latent result tile by tile."""
    conv = torch.nn.Conv2d(3, 3, 1)
    decoder = lambda h: conv(F.interpolate(h, scale_factor=4.0))  # noqa: E731
    h = torch.randn((2, 3, 37, 50), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole, tiled = decoder(h), decode_in_tiles(decoder, h, 4, tile=16, overlap=4)
    assert tiled.shape == whole.shape == (2, 3, 148, 200)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_config_refusals(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="norm_type"):
        vq_config_from_diffusers({"_class_name": "VQModel", "norm_type": "spatial"})
    with pytest.raises(CheckpointError, match="expected 'VQModel'"):
        vq_config_from_diffusers({"_class_name": "AutoencoderKL"})
    cfg = vq_config_from_diffusers({**VQ_IRREGULAR, "force_upcast": True})
    assert cfg.force_upcast and cfg.net.embed_dim == 5 and cfg.net.downsampling_factor == 4
    _reference(VQ_TEST, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "force_upcast": True}))
    assert (
        next(vq_from_diffusers(tmp_path, dtype=torch.float16).parameters()).dtype == torch.float32
    )
    sd = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    del sd[CODEBOOK_KEY]
    with pytest.raises(CheckpointError, match="missing key"):
        vq_from_ldm(sd, source="x")
