"""LDMBert (model/ldmbert.py) against diffusers' LDMBertModel with the same random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
    LDMBertConfig as RefConfig,
)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
from transformers import BertTokenizer

from model.ldmbert import (
    BertTextEncoder,
    LDMBert,
    ldmbert_config_from_diffusers,
    ldmbert_state_dict_from_diffusers,
)
from model.prompt_encoding import encode_prompts
from model.weights import build_module

# The shape of diffusers' own LDMTextToImagePipeline test text encoder (tiny, random).
TINY_LDMBERT = {"d_model": 32, "encoder_attention_heads": 4, "head_dim": 8,
                "encoder_ffn_dim": 37, "encoder_layers": 5, "vocab_size": 1000,
                "max_position_embeddings": 77}  # fmt: skip
WORDS = ["a", "red", "fox", "in", "snow", "painting", "of", "squirrel", "eating", "burger"]


def bert_tokenizer(folder: Path) -> BertTokenizer:
    """A BERT WordPiece tokenizer over a small vocabulary (ids below the tiny vocab size)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), model_max_length=77)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[LDMBertModel, BertTextEncoder]:
    torch.manual_seed(0)
    ref = LDMBertModel(RefConfig(**TINY_LDMBERT)).eval()
    cfg = ldmbert_config_from_diffusers(ref.config.to_dict(), source="test")
    ours = build_module(lambda: LDMBert(cfg), ldmbert_state_dict_from_diffusers(ref.state_dict()),
                        what="LDMBert", source="test")  # fmt: skip
    tokenizer = bert_tokenizer(tmp_path_factory.mktemp("bert"))
    return ref, BertTextEncoder(ours, tokenizer)


def test_hidden_states_equal_diffusers(pair: tuple[LDMBertModel, BertTextEncoder]) -> None:
    ref, ours = pair
    prompts = ["a red fox in snow", "", "painting of a squirrel eating a burger"]
    ids = ours.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids  # the LDM pipeline's tokenization
    with torch.inference_mode():
        expected = ref(ids)[0]
    got, pooled = ours.encode_ids(ids)
    assert pooled is None and got.shape == (3, 77, 32)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # Chunked encoding of a short unweighted prompt gives the pipeline's exact sequence.
    (emb,) = encode_prompts(ours, [prompts[0]])
    assert torch.allclose(emb.hidden, expected[:1], atol=1e-5)


def test_the_language_model_head_is_dropped_and_nothing_else() -> None:
    torch.manual_seed(1)
    ref = LDMBertModel(RefConfig(**TINY_LDMBERT))
    sd = ldmbert_state_dict_from_diffusers(ref.state_dict())
    assert not any(k.startswith("to_logits") for k in sd)
    assert set(sd) == set(LDMBert(ldmbert_config_from_diffusers(ref.config.to_dict(),
                                                                source="t")).state_dict())  # fmt: skip
    with pytest.raises(ValueError, match=r"lacks .max_position_embeddings"):
        ldmbert_config_from_diffusers({"vocab_size": 3}, source="bert/config.json")


# ---------------------------------------------------------------- the text-to-image family

# diffusers' LDMTextToImagePipeline test components (tiny, random), with its DDIM schedule.
LDM_TEXT_UNET = {"block_out_channels": (32, 64), "layers_per_block": 2, "sample_size": 32,
                 "in_channels": 4, "out_channels": 4, "cross_attention_dim": 32,
                 "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}  # fmt: skip
# f = 8: the pipeline sizes its latents as height // 8 whatever the autoencoder.
LDM_TEXT_VAE = {"block_out_channels": (32, 32, 64, 64), "in_channels": 3, "out_channels": 3,
                "down_block_types": ("DownEncoderBlock2D",) * 4, "layers_per_block": 1,
                "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 4}  # fmt: skip
LDM_TEXT_DDIM = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "clip_sample": False, "set_alpha_to_one": False}  # fmt: skip


@pytest.fixture(scope="module")
def text2im(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel

    from model import load_pipeline
    from tests.tiny import randomize_

    torch.manual_seed(0)
    ref = LDMTextToImagePipeline(
        vqvae=AutoencoderKL(**LDM_TEXT_VAE), bert=LDMBertModel(RefConfig(**TINY_LDMBERT)),
        tokenizer=bert_tokenizer(tmp_path_factory.mktemp("tok")),
        unet=randomize_(UNet2DConditionModel(**LDM_TEXT_UNET), seed=3),
        scheduler=DDIMScheduler(**LDM_TEXT_DDIM),
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    ref.bert.eval()  # as from_pretrained leaves it: built directly, its dropout (0.1) is live
    folder = tmp_path_factory.mktemp("ldm-text2im")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, load_pipeline(str(folder), device="cpu")


@pytest.mark.parametrize("sampler", ["ddim", "pndm"])
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_text2im_equals_ldm_text_to_image_pipeline(
    text2im: tuple[Any, Any], sampler: str, guidance: float
) -> None:
    """LDMTextToImagePipeline neither scales the initial noise nor the UNet input, so parity
    holds for the samplers whose both are 1 (DDIM, PNDM; the pipeline's own is DDIM)."""
    from tests.test_ldm_families import SCHEDULERS

    ref, ours = text2im
    cls, override, _ = SCHEDULERS[sampler]
    ref.scheduler = cls.from_config(ref.scheduler.config, **override)
    prompt, steps = "a painting of a squirrel eating a burger", 4
    out = ref(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
              width=64, height=64,
              generator=[torch.Generator("cpu").manual_seed(5 + i) for i in range(1)]).images  # fmt: skip
    expected = (out * 255).round().astype(np.uint8)
    got = np.stack([np.asarray(im) for im in ours.generate(
        prompt, steps=steps, guidance_scale=guidance, sampler=sampler, seed=5, width=64,
        height=64)])  # fmt: skip
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert int(np.abs(got.astype(int) - expected.astype(int)).max()) <= 2
    caps = ours.capabilities
    assert caps.family == "ldm-text2im" and caps.native_size == 256 and caps.takes_prompt


def test_text2im_jobs_batch_in_the_engine_and_equal_their_solo_images(
    text2im: tuple[Any, Any],
) -> None:
    from service.engine import Engine
    from tests.test_engine import assert_all_equal_solo, req

    _, ours = text2im
    engine = Engine(ours, max_batch=8)
    jobs = [
        req("a", "a red fox in snow", steps=3, sampler="ddim", width=64, height=64, seed=1,
            guidance_scale=6.0),
        req("b", "painting of a squirrel", negative_prompt="snow", steps=4, sampler="pndm",
            width=64, height=64, seed=2, guidance_scale=3.0, num_images=2),
        req("c", "(a burger:1.3) " + "fox " * 80, steps=3, sampler="euler", width=64,
            height=64, seed=3),  # long and weighted: LDMBert chunks like CLIP
    ]  # fmt: skip
    handles = [engine.submit(j) for j in jobs]
    outs = engine.run_until_idle()
    assert any(jobs_in_call > 1 for o in outs for _, jobs_in_call in o.calls)
    assert_all_equal_solo(ours, handles)
