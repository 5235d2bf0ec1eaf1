"""SDXL original-layout single files (SGM keys: `conditioner.embedders.*`, `label_emb.0.*`):
the tiny base and refiner written in that layout load from shapes alone and give their
diffusers folders' images; diffusers' own converters read our text-tower layout back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file

from model import load_pipeline
from model.pipeline import Pipeline
from model.schedules import SDXL_SCHEDULER_CONFIG
from model.text_sdxl import SDXLTextEncoder, sdxl_text_state_dict_to_ldm
from model.unet_convert import unet_state_dict_to_ldm
from model.vae_convert import vae_state_dict_to_ldm
from tests.reference_sdxl import (
    SDXL_KW,
    build_sdxl_reference,
    build_sdxl_refiner,
    sdxl_reference_images,
)
from tests.test_pipeline_image_modes import source_image
from tests.test_pipeline_samplers import max_diff, write_scheduler_config
from tests.tiny import UNET_SDXL_REFINER_SINGLE_FILE, UNET_SDXL_SINGLE_FILE

KW: dict[str, Any] = {**SDXL_KW, "sampler": "euler"}


def _single_file(pipe: Pipeline, path: Path) -> Path:
    text = pipe.text
    assert isinstance(text, SDXLTextEncoder)
    state = {
        **unet_state_dict_to_ldm(pipe.unet),
        **vae_state_dict_to_ldm(pipe.vae),
        **sdxl_text_state_dict_to_ldm(text),
    }
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def _folder(ref: Any, folder: Path) -> Pipeline:
    ref.save_pretrained(folder, safe_serialization=True)
    write_scheduler_config(folder, SDXL_SCHEDULER_CONFIG)  # what single files get
    return load_pipeline(str(folder), device="cpu")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Pipeline, Pipeline]:
    tmp = tmp_path_factory.mktemp("sdxl_file")
    ref = build_sdxl_reference(unet=UNET_SDXL_SINGLE_FILE)
    folder = _folder(ref, tmp / "base")
    single = load_pipeline(str(_single_file(folder, tmp / "sdxl.safetensors")), device="cpu")
    return ref, folder, single


def test_base_single_file_gives_the_folder_and_diffusers_images(
    base: tuple[Any, Pipeline, Pipeline],
) -> None:
    ref, folder, single = base
    detected, expected = single.unet.config, folder.unet.config  # from shapes / config.json
    assert [detected.heads_for(i) for i in range(2)] == [expected.heads_for(i) for i in range(2)]
    assert replace(detected, num_heads=expected.num_heads, head_dim=None) == expected
    assert single.capabilities.native_size == 1024  # SDXL's; the tiny folder says 256
    assert single.capabilities == replace(folder.capabilities, native_size=1024)
    assert single.zero_empty_negative and single.vae.scaling_factor == folder.vae.scaling_factor
    got = np.stack([np.asarray(im) for im in single.generate(**KW)])
    assert max_diff(got, np.stack([np.asarray(im) for im in folder.generate(**KW)])) == 0
    ref.scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    kw = {k: v for k, v in KW.items() if k != "sampler"}
    assert max_diff(got, sdxl_reference_images(ref, **kw)) <= 2


def test_diffusers_converters_read_our_text_layout(base: tuple[Any, Pipeline, Pipeline]) -> None:
    ref, folder, _ = base
    assert isinstance(folder.text, SDXLTextEncoder)
    state = sdxl_text_state_dict_to_ldm(folder.text)
    first = {  # transformers' CLIPTextModel keys have no text_model. prefix (its WithProjection's do)
        k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()
    }
    first.pop("embeddings.position_ids", None)
    second = convert_open_clip_checkpoint(
        ref.text_encoder_2, state, prefix="conditioner.embedders.1.model."
    )
    for model, converted in ((ref.text_encoder, first), (ref.text_encoder_2, second)):
        expected = model.state_dict()
        assert set(converted) == set(expected)
        for key, value in expected.items():
            assert torch.equal(converted[key], value), key


def test_refiner_single_file_gives_the_folder_images(
    base: tuple[Any, Pipeline, Pipeline], tmp_path: Path
) -> None:
    ref, _, _ = base
    refiner = build_sdxl_refiner(ref, unet=UNET_SDXL_REFINER_SINGLE_FILE)
    folder = _folder(refiner, tmp_path / "refiner")
    single = load_pipeline(str(_single_file(folder, tmp_path / "refiner.safetensors")), "cpu")
    assert single.capabilities == replace(folder.capabilities, native_size=1024)
    assert single.capabilities.family == "sdxl-refiner" and not single.zero_empty_negative
    kw = {**KW, "image": source_image(), "strength": 0.6, "num_images": 1}
    got = np.stack([np.asarray(im) for im in single.generate(**kw)])
    assert max_diff(got, np.stack([np.asarray(im) for im in folder.generate(**kw)])) == 0


def test_missing_projection_is_named(base: tuple[Any, Pipeline, Pipeline], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from model.weights import CheckpointError

    _, folder, _ = base
    state = load_file(_single_file(folder, tmp_path / "full.safetensors"))
    del state["conditioner.embedders.1.model.text_projection"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"embedders\.1\.model\.text_projection"):
        load_pipeline(str(tmp_path / "broken.safetensors"), device="cpu")
