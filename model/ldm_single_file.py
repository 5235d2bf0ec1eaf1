"""The LDM paper's own checkpoints as CompVis single files (the `latent-diffusion` repo's .ckpt
layout, usually converted to .safetensors).

Text-free: unconditional (ldm-celebahq-256, `configs/latent-diffusion/celebahq-ldm-vq-4.yaml`)
and super-resolution (ldm-super-resolution-4x-openimages, `models/ldm/bsr_sr/config.yaml`).
They hold `model.diffusion_model.*` (openaimodel's UNetModel without context:
`input_blocks.N.0.in_layers`, AttentionBlock `input_blocks.N.1.norm/qkv/proj_out`,
`time_embed.0/2`, `out.0/2`) and `first_stage_model.*` (a VQModel, model/vq_convert.py). The
UNet's keys are mapped onto our UNet2DModel (model/unet2d_convert.py); the family is told by the
UNet's input channels: the VQ latents (unconditional) or latents + 3 low-res RGB channels
(super-resolution). What the weights leave implicit, from the two yaml files (they agree on all
but the schedule's end):
- 32 channels per attention head (`num_head_channels: 32`), in the legacy fused order
  (QKVAttentionLegacy: per head its q, k and v rows); a width that 32 does not divide is
  refused, naming its `qkv` key.
- openaimodel's fixed choices: GroupNorm of 32 groups (eps 1e-5) everywhere, mid-block
  attention included; sinusoids cos-first with no frequency shift; downsampling convs with
  padding 1; scale-shift time embedding where `emb_layers` emit twice the width.
- Latent side 64 (`image_size: 64`): native size 64 x the VQ's downsampling factor.
- Schedule linear in sqrt(beta) over 1000 steps (diffusers' "scaled_linear"): from the file's
  `betas` buffer when it has one (it must be such a schedule), else 0.0015..0.0195
  (celebahq, `LDM_SCHEDULER_CONFIG`) or 0.0015..0.0155 (bsr_sr, `LDM_SR_SCHEDULER_CONFIG`).
- Latent scale: the file's `scale_factor` buffer (models trained with `scale_by_std`), else 1
  (the yaml files' default).

Text-to-image: txt2img-f8-large (ldm-text2im-large-256, `txt2img-1p4B-eval.yaml`): a KL
first stage (model/vae_convert.py), the UNet in the layout our UNetModel already has (8 heads
per level, the yaml's `num_heads: 8`), `cond_stage_model.transformer.*` (BERTEmbedder's
x-transformers TransformerWrapper) mapped onto LDMBert (model/ldmbert.py: 64 channels per
head). Implicit: latent side 32 (native 256), latent scale 0.18215 (a config value there),
schedule 0.00085..0.012 without `betas` (`LDM_TEXT2IM_SCHEDULER_CONFIG`), and the BERT
tokenizer (bert-base-uncased, not in the file): a `tokenizer/` folder beside the file, else
bert-base-uncased from the Hugging Face cache (never downloaded at load).

Ignored by name: the DDPM buffers derived from `betas` (`DERIVED_SCHEDULE_KEYS`), the EMA copy
(`model_ema.*`; an EMA-only export already holds it under `model.diffusion_model.`),
first-stage training losses (`first_stage_model.loss.*`) and the text model's LM head
(`cond_stage_model.transformer.to_logits.*`). Any other key fails the load, naming it; so
does any other `cond_stage_model.*` (a conditional model of another kind).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.ldm import LDM_SCHEDULER_CONFIG, LDM_SR_SCHEDULER_CONFIG, LDM_TEXT2IM_SCHEDULER_CONFIG
from model.ldmbert import COMPVIS_PREFIX as TEXT_PREFIX
from model.ldmbert import BertTextEncoder, LDMBert, ldmbert_from_compvis
from model.pipeline import Pipeline
from model.samplers import NoiseSchedule
from model.unet import UNetModel, prefers_channels_last
from model.unet2d import UNet2DModel
from model.unet2d_convert import unet2d_from_original
from model.unet_convert import LDM_PREFIX as UNET_PREFIX
from model.unet_convert import unet_config_from_ldm
from model.vae_convert import LDM_VAE_PREFIX as VAE_PREFIX
from model.vae_convert import vae_from_ldm
from model.vq_convert import CODEBOOK_KEY, vq_from_ldm
from model.weight_files import WeightFile
from model.weights import CheckpointError, build_module

log = logging.getLogger(__name__)

LATENT_SIDE = 64  # image_size of both yaml files
DERIVED_SCHEDULE_KEYS = frozenset(
    {
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "lvlb_weights",
        "logvar",
    }
)
IGNORED_PREFIXES = ("model_ema.", VAE_PREFIX + "loss.")


def is_ldm_vq_single_file(shapes: Mapping[str, Any]) -> bool:
    """A CompVis LDM single file with a VQ first stage (its codebook) and an openaimodel UNet."""
    return VAE_PREFIX + CODEBOOK_KEY in shapes and UNET_PREFIX + "input_blocks.0.0.weight" in shapes


def is_ldm_text_single_file(shapes: Mapping[str, Any]) -> bool:
    """txt2img-f8-large's layout: a BERTEmbedder (x-transformers token embedding) text encoder."""
    return TEXT_PREFIX + "token_emb.weight" in shapes


def _decimal(value: float) -> float:
    """The shortest decimal with the same float32 value: the number the yaml file gave
    (0.18215, not 0.1821500062942505), so configs built from a file equal the published ones."""
    target = torch.tensor(value, dtype=torch.float32).item()
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if torch.tensor(short, dtype=torch.float32).item() == target:
            return short
    return value


def _schedule(wf: WeightFile, family: str, source: str) -> NoiseSchedule:
    """The file's `betas` when it has them (checked to be linear in sqrt(beta)), else the
    published config of the family."""
    default = {"ldm": LDM_SCHEDULER_CONFIG, "ldm-sr": LDM_SR_SCHEDULER_CONFIG}.get(
        family, LDM_TEXT2IM_SCHEDULER_CONFIG
    )
    if "betas" not in wf.shapes():
        return NoiseSchedule.from_config(default)
    betas = wf.read(["betas"])["betas"].double()  # (T,)
    start, end = _decimal(float(betas[0])), _decimal(float(betas[-1]))
    expected = torch.linspace(start**0.5, end**0.5, len(betas), dtype=torch.float64) ** 2
    if betas.ndim != 1 or not torch.allclose(betas, expected, rtol=1e-5, atol=1e-9):
        raise CheckpointError(
            f"{source}: 'betas' is not a schedule linear in sqrt(beta) (the LDM 'linear' one)"
        )
    return NoiseSchedule.from_config(
        {**default, "beta_start": start, "beta_end": end, "num_train_timesteps": len(betas)}
    )


def _check_keys(shapes: Mapping[str, Any], source: str, *, text: bool = False) -> None:
    """Every key is the UNet's, the first stage's, the text encoder's (`text`), a schedule
    buffer or ignored by name."""
    for key in shapes:
        if key.startswith("cond_stage_model.") and not (text and key.startswith(TEXT_PREFIX)):
            raise CheckpointError(
                f"{source}: '{key}': a conditional CompVis LDM of a kind that does not load "
                "from single files (unconditional, super-resolution and txt2img-f8-large do)"
            )
        known = key.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, *IGNORED_PREFIXES)) or (
            key in DERIVED_SCHEDULE_KEYS | {"betas", "scale_factor"}
        )
        if not known:
            raise CheckpointError(f"{source}: unexpected key '{key}' in a CompVis LDM file")


def load_ldm_vq_single_file(wf: WeightFile, device: torch.device, dtype: torch.dtype) -> Pipeline:
    """A CompVis unconditional or super-resolution LDM single file -> a text-free Pipeline."""
    path = Path(wf.path)
    source = str(path)
    shapes = wf.shapes()
    _check_keys(shapes, source)
    vae_keys = [
        k for k in shapes if k.startswith(VAE_PREFIX) and not k.startswith(IGNORED_PREFIXES)
    ]
    scale = (
        _decimal(float(wf.read(["scale_factor"])["scale_factor"]))
        if "scale_factor" in shapes
        else 1.0
    )
    vq = vq_from_ldm(
        wf.read(vae_keys, rename=lambda k: k.removeprefix(VAE_PREFIX), device=device, dtype=dtype),
        source=source, device=device, dtype=dtype, scaling_factor=scale,
    )  # fmt: skip
    latent = vq.config.net.embed_dim
    unet_keys = [k for k in shapes if k.startswith(UNET_PREFIX)]
    nhwc = prefers_channels_last(device)
    raw = wf.read(
        unet_keys, rename=lambda k: k.removeprefix(UNET_PREFIX), device=device, dtype=dtype,
        channels_last=nhwc,
    )  # fmt: skip
    unet_cfg, unet_sd = unet2d_from_original(raw, source=source, sample_size=LATENT_SIDE)
    del raw
    if unet_cfg.in_channels not in (latent, latent + 3) or unet_cfg.out_channels != latent:
        raise CheckpointError(
            f"{source}: '{UNET_PREFIX}input_blocks.0.0.weight' takes {unet_cfg.in_channels} "
            f"channels and 'out.2' gives {unet_cfg.out_channels}; the VQ latents have {latent} "
            f"(unconditional: {latent} in; super-resolution: {latent} + 3 low-res RGB in)"
        )
    family = "ldm" if unet_cfg.in_channels == latent else "ldm-sr"
    unet = build_module(
        lambda: UNet2DModel(unet_cfg), unet_sd, what="UNet", source=source, device=device,
        dtype=dtype,
    )  # fmt: skip
    log.info("loaded %s (CompVis %s, UNet %s) on %s/%s", source, family,
             unet_cfg.block_out_channels, device, dtype)  # fmt: skip
    return Pipeline(
        unet=unet,
        vae=vq,
        text=None,
        schedule=_schedule(wf, family, source),
        name=path.name,
        native_size=LATENT_SIDE * vq.downsampling_factor,
        family=family,
    )


TEXT2IM_LATENT_SIDE = 32  # txt2img-1p4B-eval.yaml image_size: native 256 at f=8
TEXT2IM_SCALE = 0.18215  # its scale_factor (a config value there, not a buffer)
BERT_TOKENIZER = "bert-base-uncased"  # what CompVis' BERTTokenizer loads


def _bert_tokenizer(path: Path, vocab_size: int) -> Any:
    """A `tokenizer/` folder beside the file (e.g. a diffusers ldm-text2im folder's), else
    bert-base-uncased's vocab.txt from the Hugging Face cache; never the network while loading.
    A tokenizer without a vocabulary, or with ids past the text encoder's table, is refused."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import BertTokenizer

    folder = path.parent / "tokenizer"
    cached = None if folder.is_dir() else try_to_load_from_cache(BERT_TOKENIZER, "vocab.txt")
    if not folder.is_dir() and not isinstance(cached, str):
        raise CheckpointError(
            f"{path}: no BERT tokenizer: put one in {folder}/ (a diffusers ldm-text2im "
            f"folder's tokenizer/) or '{BERT_TOKENIZER}' in the Hugging Face cache"
        )
    try:
        if isinstance(cached, str):
            tokenizer = BertTokenizer(cached, do_lower_case=True, model_max_length=77)
        else:
            tokenizer = BertTokenizer.from_pretrained(str(folder), model_max_length=77)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: cannot read the BERT tokenizer in {folder} ({exc})"
        ) from None
    if not len(tokenizer.all_special_ids) < len(tokenizer) <= vocab_size:
        raise CheckpointError(
            f"{path}: the BERT tokenizer has {len(tokenizer)} tokens; the text encoder "
            f"embeds {vocab_size}"
        )
    return tokenizer


def load_ldm_text_single_file(wf: WeightFile, device: torch.device, dtype: torch.dtype) -> Pipeline:
    """txt2img-f8-large (ldm-text2im-large-256) as one CompVis file: a KL first stage, the
    BERTEmbedder mapped onto LDMBert, the UNet in its own (SD) layout with 8 heads per level
    (the yaml's num_heads: 8, what model/unet_convert.py gives a conv-projection UNet)."""
    path = Path(wf.path)
    source = str(path)
    shapes = wf.shapes()
    _check_keys(shapes, source, text=True)
    text_keys = [k for k in shapes if k.startswith(TEXT_PREFIX)]
    text_sd = wf.read(text_keys, rename=lambda k: k.removeprefix(TEXT_PREFIX), device=device,
                      dtype=dtype)  # fmt: skip
    bert_cfg, bert_sd = ldmbert_from_compvis(text_sd, source=source)
    bert = build_module(lambda: LDMBert(bert_cfg), bert_sd, what="LDMBert", source=source,
                        device=device, dtype=dtype)  # fmt: skip
    unet_keys = [k for k in shapes if k.startswith(UNET_PREFIX)]
    unet_shapes = {k.removeprefix(UNET_PREFIX): shapes[k] for k in unet_keys}
    unet_cfg = unet_config_from_ldm(unet_shapes, source=source)
    if unet_cfg.context_dim != bert_cfg.d_model:
        raise CheckpointError(
            f"{source}: the UNet attends to {unet_cfg.context_dim}-d context; the text encoder "
            f"gives {bert_cfg.d_model}-d"
        )
    unet = build_module(
        lambda: UNetModel(unet_cfg),
        wf.read(unet_keys, rename=lambda k: k.removeprefix(UNET_PREFIX), device=device,
                dtype=dtype, channels_last=prefers_channels_last(device)),
        what="UNet", source=source, device=device, dtype=dtype, key_prefix=UNET_PREFIX,
    )  # fmt: skip
    scale = (
        _decimal(float(wf.read(["scale_factor"])["scale_factor"]))
        if "scale_factor" in shapes
        else TEXT2IM_SCALE
    )
    vae_keys = [k for k in shapes if k.startswith(VAE_PREFIX)]
    vae = vae_from_ldm(
        wf.read(vae_keys, rename=lambda k: k.removeprefix(VAE_PREFIX), device=device, dtype=dtype),
        source=source, device=device, dtype=dtype, scaling_factor=scale,
    )  # fmt: skip
    log.info("loaded %s (CompVis ldm-text2im) on %s/%s", source, device, dtype)
    return Pipeline(
        unet=unet,
        vae=vae,
        text=BertTextEncoder(bert, _bert_tokenizer(path, bert_cfg.vocab_size)),  # type: ignore[arg-type]
        schedule=_schedule(wf, "ldm-text2im", source),
        name=path.name,
        native_size=TEXT2IM_LATENT_SIDE * vae.downsampling_factor,
        family="ldm-text2im",
    )
