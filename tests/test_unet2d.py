"""UNet2DModel (no cross-attention): parity with diffusers' UNet2DModel on identical random
weights — diffusers' LDM / LDM super-resolution test shapes and an irregular one (three levels,
scale-shift, 16-channel heads, padding-free downsampling) — per-row timesteps, the concat
conditioning, old attention key names, and config refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import UNet2DModel as DiffusersUNet2DModel

from model.conditioning import Conditioning
from model.unet2d import (
    UNet2DModel,
    unet2d_config_from_diffusers,
    unet2d_state_dict_from_diffusers,
)
from model.weights import CheckpointError, build_module
from tests.tiny import UNET2D_IRREGULAR, UNET2D_SR, UNET2D_UNCOND, randomize_

CONFIGS: dict[str, dict[str, Any]] = {
    "uncond": UNET2D_UNCOND,
    "sr": UNET2D_SR,
    "irregular": UNET2D_IRREGULAR,
}


def _pair(cfg: dict[str, Any]) -> tuple[DiffusersUNet2DModel, UNet2DModel]:
    ref = randomize_(DiffusersUNet2DModel(**cfg), seed=21, scale=0.05).eval()
    config = unet2d_config_from_diffusers(ref.config, source="test")
    ours = build_module(
        lambda: UNet2DModel(config),
        unet2d_state_dict_from_diffusers(ref.state_dict()),
        what="UNet",
        source="test",
    )
    return ref, ours


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_diffusers(name: str, channels_last: bool) -> None:
    cfg = CONFIGS[name]
    ref, ours = _pair(cfg)
    if channels_last:
        ours.use_channels_last()
    g = torch.Generator().manual_seed(0)
    latent = cfg["out_channels"]
    x = torch.randn((3, latent, 16, 24), generator=g)
    concat = torch.randn((3, cfg["in_channels"] - latent, 16, 24), generator=g)
    t = torch.tensor([999.0, 500.0, 3.5])
    cond = Conditioning(torch.zeros((3, 0, 0)), concat=concat if concat.shape[1] else None)
    with torch.no_grad():
        got = ours(x, t, cond)
        full = torch.cat([x, concat], dim=1)
        expected = torch.cat([ref(full[i : i + 1], t[i]).sample for i in range(3)])
    assert got.shape == expected.shape == (3, latent, 16, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_old_attention_names_load() -> None:
    ref, ours = _pair(UNET2D_UNCOND)
    renamed = {
        k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
        .replace("to_out.0", "proj_attn"): v
        for k, v in ref.state_dict().items()
    }  # fmt: skip
    assert any(".attentions.0.query." in k for k in renamed)
    assert unet2d_state_dict_from_diffusers(renamed).keys() == ours.state_dict().keys()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"class_embed_type": "timestep"}, "class embeddings"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"down_block_types": ["DownBlock2D", "SkipDownBlock2D"]}, "SkipDownBlock2D"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "mirror"),
        ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
    ],
)
def test_refusals(override: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        unet2d_config_from_diffusers({**UNET2D_UNCOND, **override}, source="test")
