"""Any UNet2DConditionModel layout of CrossAttn/plain blocks: per-level heads, depths and
ResBlocks, attention anywhere, SDXL's added embedding and class embeddings — each checked
against diffusers on identical random weights, from diffusers keys and from the original
single-file layout."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from model import load_pipeline
from model.conditioning import Conditioning
from model.unet import UNetModel
from model.unet_config import UNetConfig
from model.unet_config_diffusers import unet_config_from_diffusers
from model.unet_config_ldm import unet_config_from_ldm
from model.unet_convert import LDM_PREFIX, unet_state_dict_from_diffusers, unet_state_dict_to_ldm
from model.weights import CheckpointError, build_module
from tests.reference import PARITY_KW, build_reference, reference_images
from tests.tiny import (
    SDXL_POOLED_DIM,
    UNET_CLASSES,
    UNET_IRREGULAR_HEADS,
    UNET_PER_LEVEL,
    UNET_SD2,
    UNET_SDXL,
    UNET_X4,
    randomize_,
)

LAYOUTS: dict[str, dict[str, Any]] = {
    "irregular_heads": UNET_IRREGULAR_HEADS,
    "per_level": UNET_PER_LEVEL,
    "sdxl": UNET_SDXL,
    "classes": UNET_CLASSES,
    "x4_upscaler": UNET_X4,
    "class_timestep": {**UNET_SD2, "class_embed_type": "timestep"},
    "class_projection": {
        **UNET_SD2,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 12,
    },
}
# What a single file cannot tell from shapes: which vector its label MLP embeds (SDXL's
# text_time is recognised by its 2048/1280-d context; tiny models need saying).
LDM_LABEL_HINTS: dict[str, dict[str, Any]] = {
    "sdxl": {"label": "text_time", "addition_time_embed_dim": 8},
    "class_timestep": {"label": "timestep"},
}
TOL: dict[str, float] = {"atol": 1e-5, "rtol": 1e-4}


def _inputs(cfg: dict[str, Any], batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """Latents, per-row timesteps and a conditioning with whatever the UNet's config needs."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, cfg["in_channels"], 16, 12, generator=g)
    t = torch.tensor([1.0, 500.0, 981.0][:batch])
    ctx = torch.randn(batch, 9, cfg["cross_attention_dim"], generator=g)
    extra: dict[str, torch.Tensor] = {}
    if cfg.get("addition_embed_type") == "text_time":
        extra["pooled"] = torch.randn(batch, SDXL_POOLED_DIM, generator=g)
        sizes = torch.tensor([[1024, 768, 0, 16, 1024, 1024], [512, 512, 8, 0, 768, 1024]])
        extra["time_ids"] = sizes.repeat(2, 1)[:batch].float()
    elif cfg.get("class_embed_type") == "projection":
        extra["class_labels"] = torch.randn(batch, cfg["projection_class_embeddings_input_dim"])
    elif cfg.get("class_embed_type") == "timestep":
        extra["class_labels"] = torch.tensor([0.0, 20.0, 350.0][:batch])
    elif cfg.get("num_class_embeds"):
        extra["class_labels"] = torch.tensor([0, 20, cfg["num_class_embeds"] - 1][:batch])
    return x, t, Conditioning(ctx, **extra)


def _reference(cfg: dict[str, Any], x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
               ref: UNet2DConditionModel) -> torch.Tensor:  # fmt: skip
    added = None
    if cond.pooled is not None:
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    with torch.no_grad():
        return ref(
            x, t, encoder_hidden_states=cond.crossattn, class_labels=cond.class_labels,
            added_cond_kwargs=added,
        ).sample  # fmt: skip


def _ours_from_diffusers(ref: UNet2DConditionModel) -> UNetModel:
    cfg = unet_config_from_diffusers(ref.config, source="test")
    sd = unet_state_dict_from_diffusers(ref.state_dict(), cfg, source="test")
    return build_module(lambda: UNetModel(cfg), sd, what="UNet", source="test")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_diffusers_weights_give_diffusers_output(name: str) -> None:
    cfg = LAYOUTS[name]
    ref = randomize_(UNet2DConditionModel(**cfg), seed=21).eval()
    ours = _ours_from_diffusers(ref)
    x, t, cond = _inputs(cfg)
    with torch.no_grad():
        got = ours(x, t, cond)
    torch.testing.assert_close(got, _reference(cfg, x, t, cond, ref), **TOL)
    ours.use_channels_last()  # the CPU pipeline's layout
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, cond), got, **TOL)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_single_file_layout_loads_and_gives_the_same_output(name: str) -> None:
    """Our weights as an original-layout state dict: the architecture is detected from the
    shapes alone (heads and norm groups aside, which no shape tells: single files follow
    the SD conventions there) and the UNet loads strictly."""
    cfg = LAYOUTS[name]
    ref = randomize_(UNet2DConditionModel(**cfg), seed=22).eval()
    ours = _ours_from_diffusers(ref)
    single = unet_state_dict_to_ldm(ours)
    stripped = {k.removeprefix(LDM_PREFIX): v for k, v in single.items()}
    detected = unet_config_from_ldm(stripped, source="test", **LDM_LABEL_HINTS.get(name, {}))
    c = ours.config
    unseen = {
        "num_heads": c.num_heads,
        "head_dim": c.head_dim,
        "upcast_attention": c.upcast_attention,
        "norm_groups": c.norm_groups,
    }
    assert replace(detected, **unseen) == c
    loaded = build_module(
        lambda: UNetModel(replace(detected, **unseen)), stripped, what="UNet", source="test"
    )
    x, t, cond = _inputs(cfg)
    expected = _reference(cfg, x, t, cond, ref)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), expected, **TOL)
    if isinstance(cfg["layers_per_block"], int):  # diffusers' converter needs one per model
        # diffusers' own converter reads our key names as the original layout's.
        fresh = UNet2DConditionModel(**cfg).eval()
        fresh.load_state_dict(convert_ldm_unet_checkpoint(single, dict(fresh.config)), strict=True)
        torch.testing.assert_close(_reference(cfg, x, t, cond, fresh), expected, **TOL)


def test_sdxl_config_reads_per_level_fields() -> None:
    cfg = unet_config_from_diffusers(UNET_SDXL, source="test")
    assert cfg.num_res_blocks == 2 and cfg.num_heads == (2, 4)
    assert cfg.attention_levels == (1,) and cfg.attention_levels_up is None
    assert [cfg.depth(1), cfg.depth(-1)] == [2, 2]
    assert [cfg.heads_for(0), cfg.heads_for(1)] == [(2, 16), (4, 16)]
    assert (cfg.label, cfg.adm_in_channels, cfg.addition_time_embed_dim) == ("text_time", 80, 8)
    per_level = unet_config_from_diffusers(UNET_PER_LEVEL, source="test")
    assert per_level.attention_levels == (1,) and per_level.attention_levels_up == (0, 2)
    assert [per_level.depth(0, up=True), per_level.depth(2, up=True)] == [3, 2]
    assert per_level.depth(-1) == 2 and per_level.heads_for(0) == (3, 10)
    x4 = unet_config_from_diffusers(UNET_X4, source="test")
    assert x4.cross_only_levels == (1,) and not x4.cross_only_middle  # level 0 has no attention
    assert (x4.label, x4.num_classes, x4.in_channels) == ("classes", 100, 7)


def test_real_sdxl_shapes_are_detected_from_a_single_file() -> None:
    """SDXL base's layout (levels 320/640/1280, depths 0/2/10, 2816-d label MLP) from shapes."""
    base = UNetConfig(
        model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2,
        attention_levels=(1, 2), transformer_depth=(1, 2, 10), num_heads=None, head_dim=64,
        context_dim=2048, use_linear_projection=True, label="text_time", adm_in_channels=2816,
    )  # fmt: skip
    with torch.device("meta"):
        shapes = UNetModel(base).state_dict()
    assert unet_config_from_ldm(shapes, source="sdxl.safetensors") == base


def test_rows_with_their_own_added_conditioning_batch_like_solo_rows() -> None:
    ref = randomize_(UNet2DConditionModel(**UNET_SDXL), seed=23).eval()
    ours = _ours_from_diffusers(ref)
    x, t, cond = _inputs(UNET_SDXL)
    rows = [
        Conditioning(cond.crossattn[i : i + 1], pooled=cond.pooled[i : i + 1],  # type: ignore[index]
                     time_ids=cond.time_ids[i : i + 1])  # type: ignore[index]
        for i in range(3)
    ]  # fmt: skip
    with torch.no_grad():
        batched = ours(x, t, Conditioning.cat(rows))
        for i, row in enumerate(rows):
            torch.testing.assert_close(
                batched[i : i + 1], ours(x[i : i + 1], t[i : i + 1], row), **TOL
            )


def test_conditioning_operations_carry_every_kind() -> None:
    one = Conditioning(
        torch.randn(1, 5, 8), pooled=torch.randn(1, 4), time_ids=torch.ones(1, 6),
        class_labels=torch.tensor([3]),
    )  # fmt: skip
    many = one.expand(3)
    assert many.rows == 3 and many.pooled.shape == (3, 4) and many.class_labels.shape == (3,)  # type: ignore[union-attr]
    uncond = one.with_text(torch.zeros(1, 5, 8), pooled=torch.zeros(1, 4))
    assert torch.equal(uncond.time_ids, one.time_ids) and not uncond.pooled.any()  # type: ignore[arg-type,union-attr]
    both = Conditioning.cat([one, uncond])
    assert both.kinds == ("pooled", "time_ids", "class_labels") and both.time_ids.shape == (2, 6)  # type: ignore[union-attr]
    half = both.to(torch.device("cpu"), torch.float16)
    assert half.pooled.dtype == torch.float16 and half.class_labels.dtype == torch.int64  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="different kinds"):
        Conditioning.cat([one, Conditioning(torch.randn(1, 5, 8))])


def test_missing_added_conditioning_is_an_error() -> None:
    unet = UNetModel(unet_config_from_diffusers(UNET_SDXL, source="test")).eval()
    x, t, cond = _inputs(UNET_SDXL)
    with pytest.raises(ValueError, match="pooled text embeddings and time ids"):
        unet(x, t, Conditioning(cond.crossattn))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"time_cond_proj_dim": 256}, "time_cond_proj_dim"),
        ({"only_cross_attention": [False, True, False]}, "only_cross_attention"),
        ({"class_embeddings_concat": True, "num_class_embeds": 4}, "class_embeddings_concat"),
        ({"addition_embed_type": "text_image"}, "addition_embed_type"),
        ({"addition_time_embed_dim": None}, "addition_time_embed_dim"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        (
            {
                "class_embed_type": "projection",
                "addition_embed_type": None,
                "projection_class_embeddings_input_dim": None,
            },
            "projection_class_embeddings_input_dim",
        ),
        ({"cross_attention_dim": [64, 32]}, "cross_attention_dim"),
        ({"up_block_types": ["SimpleCrossAttnUpBlock2D", "UpBlock2D"]}, "up_block_types"),
        ({"attention_head_dim": [2, 4, 4]}, "attention_head_dim"),
        ({"reverse_transformer_layers_per_block": [[1, 2, 1], [1, 1, 1]]}, "transformer depths"),
    ],
)
def test_unsupported_config_fails_naming_the_key(override: dict[str, Any], key: str) -> None:
    with pytest.raises(CheckpointError, match=key):
        unet_config_from_diffusers({**UNET_SDXL, **override}, source="unet/config.json")


@pytest.fixture(scope="module")
def irregular_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    pipe = build_reference("sd1", unet=UNET_IRREGULAR_HEADS)
    folder = tmp_path_factory.mktemp("irregular") / "pipeline"
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder


def test_diffusers_folder_with_irregular_heads_matches_diffusers(
    irregular_folder: tuple[Any, Path],
) -> None:
    """attention_head_dim [2, 4, 4, 4] over block_out_channels [32, 64, 64, 96] (issue 11)."""
    ref, folder = irregular_folder
    ours = load_pipeline(str(folder), device="cpu")
    expected = reference_images(ref, **PARITY_KW)
    got = np.stack([np.asarray(im) for im in ours.generate(sampler="ddim", **PARITY_KW)])
    diff = np.abs(got.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff} > 2/255"
