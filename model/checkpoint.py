"""`load_pipeline(source)`: single files, diffusers folders, hub repo ids and the demo model.

Each loader reads only the weights it needs, converted tensor by tensor to the target device
and dtype (see weight_files.py), and loads every network strictly; a bad checkpoint fails
with a CheckpointError naming the file and the reason.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from model.embeddings import install_embeddings
from model.ldm import is_ldm_folder, is_ldm_text_folder, load_ldm_folder, load_ldm_text_folder
from model.ldm_single_file import (
    is_ldm_text_single_file,
    is_ldm_vq_single_file,
    load_ldm_text_single_file,
    load_ldm_vq_single_file,
)
from model.pipeline import Pipeline
from model.samplers import SD15_SCHEDULER_CONFIG, NoiseSchedule
from model.schedules import SDXL_SCHEDULER_CONFIG
from model.sd_upscale import (
    X4_FAMILY,
    X4_NATIVE_SIZE,
    X4_SCHEDULER_CONFIG,
    X4_VAE_SCALING,
    LowResNoise,
    is_x4_folder,
    is_x4_unet,
    x4_folder_noise,
    x4_single_file_unet,
)
from model.text import TextEncoder
from model.text_diffusers import text_encoder_from_diffusers
from model.text_ldm import text_encoder_from_ldm
from model.text_sdxl import (
    SGM_PREFIX,
    SDXLTextEncoder,
    sdxl_text_from_diffusers,
    sdxl_text_from_ldm,
)
from model.unet import UNetModel, prefers_channels_last
from model.unet_convert import (
    LDM_PREFIX as UNET_PREFIX,
)
from model.unet_convert import (
    unet_config_from_diffusers,
    unet_config_from_ldm,
    unet_state_dict_from_diffusers,
)
from model.vae_convert import vae_from_diffusers, vae_from_ldm
from model.weight_files import WeightFile, find_weights, read_json
from model.weights import CheckpointError, build_module

log = logging.getLogger(__name__)

VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
SDXL_VAE_SCALING = 0.13025  # SDXL's VAE latent scale (its folders' vae/config.json say so too)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
    "low_res_scheduler/*.json",  # the x4 upscaler (model/sd_upscale.py)
    "vqvae/config.json",  # the LDM families (model/ldm.py)
    "bert/config.json",
    "bert/model.safetensors",
    "vqvae/diffusion_pytorch_model.safetensors",
]


def default_device() -> torch.device:
    """CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the usual way to run SD), fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(
    source: str,
    device: Any = None,
    dtype: Any = None,
    lora_dir: Any = None,
    embeddings_dir: Any = None,
) -> Pipeline:
    """Load a Pipeline from a .safetensors/.ckpt file, a diffusers folder, a hub repo id or 'demo'
    (`lora_dir`: the folder of LoRA adapters its requests may name; `embeddings_dir`: the
    textual-inversion embeddings its prompts may use by name)."""
    pipe = _load_source(source, device, dtype)
    pipe.lora_dir = Path(lora_dir).expanduser() if lora_dir is not None else None
    if embeddings_dir is not None:
        pipe.embeddings = install_embeddings(pipe.text, Path(embeddings_dir).expanduser())
    return pipe


def _load_source(source: str, device: Any, dtype: Any) -> Pipeline:
    dev = torch.device(device) if device is not None else default_device()
    dt = dtype if dtype is not None else default_dtype(dev)
    if source == "demo":
        from model.demo import build_demo

        return build_demo(dev, dt)
    path = Path(source).expanduser()
    if path.is_dir():
        return load_diffusers_folder(path, dev, dt)
    if path.is_file():
        return load_single_file(path, dev, dt)
    if _REPO_ID.match(source) and not source.endswith((".safetensors", ".ckpt", ".pt", ".pth")):
        return load_diffusers_folder(download_from_hub(source), dev, dt, name=source)
    raise CheckpointError(f"{source}: no such file or folder (nor a Hugging Face repo id)")


def download_from_hub(repo_id: str) -> Path:
    """Fetch a diffusers repo's inference files through huggingface_hub (honours its cache/offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{repo_id}: not in the Hugging Face cache and offline ({exc})"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{repo_id}: cannot download from the Hugging Face hub ({exc})"
        ) from None
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{repo_id}: not a diffusers pipeline repo (no model_index.json)")
    return folder


def _prediction_type_for(path: Path, metadata: dict[str, str]) -> str:
    """v-prediction when a sidecar `<name>.yaml` or the file's metadata says so (SD 2.x 768-v)."""
    for sidecar in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if sidecar.is_file() and re.search(
            r"parameterization:\s*[\"']?v[\"']?\s*$", sidecar.read_text(), re.M
        ):
            return "v_prediction"
    tag = metadata.get("modelspec.prediction_type", "") + metadata.get("prediction_type", "")
    return "v_prediction" if tag.startswith("v") else "epsilon"


def load_single_file(path: Path, device: torch.device, dtype: torch.dtype) -> Pipeline:
    """An original-layout single file (SD 1.x / 2.x, SDXL base / refiner, the x4 upscaler,
    CompVis' unconditional, super-resolution and text-to-image LDMs; EMA-only or full, `model_ema.*` ignored)."""
    source = str(path)
    wf = WeightFile(path)
    shapes = wf.shapes()
    if is_ldm_vq_single_file(shapes):  # a VQ first stage: model/ldm_single_file.py
        return load_ldm_vq_single_file(wf, device, dtype)
    if is_ldm_text_single_file(shapes):  # CompVis' BERTEmbedder: txt2img-f8-large
        return load_ldm_text_single_file(wf, device, dtype)
    sdxl = any(k.startswith(SGM_PREFIX) for k in shapes)
    unet_keys = [k for k in shapes if k.startswith(UNET_PREFIX)]
    if not unet_keys:
        raise CheckpointError(
            f"{source}: not a Stable Diffusion checkpoint (no UNet weights '{UNET_PREFIX}*')"
        )
    text_prefix = SGM_PREFIX if sdxl else TEXT_PREFIX
    for prefix, what in ((VAE_PREFIX, "VAE"), (text_prefix, "text encoder")):
        if not any(k.startswith(prefix) for k in shapes):
            raise CheckpointError(f"{source}: the checkpoint has no {what} weights ('{prefix}*')")

    text: TextEncoder | SDXLTextEncoder
    text_keys = [k for k in shapes if k.startswith(text_prefix)]
    text_sd = wf.read(text_keys, device=device, dtype=dtype)
    unet_shapes = {
        k.removeprefix(UNET_PREFIX): v for k, v in shapes.items() if k.startswith(UNET_PREFIX)
    }
    if sdxl:
        text = sdxl_text_from_ldm(text_sd, source=source, device=device, dtype=dtype)
        unet_cfg = unet_config_from_ldm(
            unet_shapes, source=source, label="text_time", addition_time_embed_dim=_time_embed_dim(
                unet_shapes, text, source
            ),
        )  # fmt: skip
    else:
        text = text_encoder_from_ldm(text_sd, source=source, device=device, dtype=dtype)
        unet_cfg = unet_config_from_ldm(unet_shapes, source=source)
    del text_sd
    quant = shapes.get(VAE_PREFIX + "post_quant_conv.weight")  # (z, z, 1, 1): latent channels
    x4 = not sdxl and quant is not None and is_x4_unet(unet_cfg.in_channels, int(quant.shape[0]))
    if x4:  # the conventions a single file leaves implicit: model/sd_upscale.py
        unet_cfg = x4_single_file_unet(unet_cfg)
    strip_unet = lambda k: k.removeprefix(UNET_PREFIX)  # noqa: E731
    nhwc = prefers_channels_last(device)  # read conv weights NHWC once (see Pipeline)
    unet = build_module(
        lambda: UNetModel(unet_cfg),
        wf.read(unet_keys, rename=strip_unet, device=device, dtype=dtype, channels_last=nhwc),
        what="UNet",
        source=source,
        device=device,
        dtype=dtype,
        key_prefix=UNET_PREFIX,
    )
    # SDXL's VAE: scaling 0.13025, and float32 under fp16 (it overflows there; force_upcast).
    vae_dtype = torch.float32 if sdxl and dtype == torch.float16 else dtype
    vae_keys = [k for k in shapes if k.startswith(VAE_PREFIX)]
    vae = vae_from_ldm(
        wf.read(
            vae_keys, rename=lambda k: k.removeprefix(VAE_PREFIX), device=device, dtype=vae_dtype
        ),
        source=source,
        device=device,
        dtype=vae_dtype,
        **({"scaling_factor": SDXL_VAE_SCALING} if sdxl else {}),
        **({"scaling_factor": X4_VAE_SCALING} if x4 else {}),
    )
    if x4:
        log.info("loaded %s (x4 upscaler, v_prediction) on %s/%s", source, device, dtype)
        return Pipeline(
            unet=unet, vae=vae, text=text, schedule=NoiseSchedule.from_config(X4_SCHEDULER_CONFIG),
            name=path.name, native_size=X4_NATIVE_SIZE, family=X4_FAMILY,
            low_res_noise=LowResNoise.from_config(),
        )  # fmt: skip
    prediction = _prediction_type_for(path, wf.metadata)
    base_schedule = SDXL_SCHEDULER_CONFIG if sdxl else SD15_SCHEDULER_CONFIG
    schedule = NoiseSchedule.from_config({**base_schedule, "prediction_type": prediction})
    log.info(
        "loaded %s (UNet %s, %s) on %s/%s", source, unet_cfg.channel_mult, prediction, device, dtype
    )
    if sdxl:  # the published SDXL folders' model_index: zeros for the base, not the refiner
        base = isinstance(text, SDXLTextEncoder) and text.first is not None
        return Pipeline(
            unet=unet, vae=vae, text=text, schedule=schedule, name=path.name, native_size=1024,
            family="sdxl" if base else "sdxl-refiner", zero_empty_negative=base,
        )  # fmt: skip
    # SD 2.x 768-v was trained at 768 px, every other SD 1.x / 2.x single file at 512.
    native = 768 if prediction == "v_prediction" else 512
    return Pipeline(
        unet=unet, vae=vae, text=text, schedule=schedule, name=path.name, native_size=native
    )


def _time_embed_dim(unet_shapes: dict[str, Any], text: SDXLTextEncoder, source: str) -> int:
    """Sinusoid channels per time id: what the label MLP's input leaves after the pooled
    vector, over 6 time ids (base) or 5 (the refiner, bigG only); 256 in SDXL's files."""
    key = "label_emb.0.0.weight"
    if key not in unet_shapes:
        raise CheckpointError(f"{source}: an SDXL UNet needs '{UNET_PREFIX}{key}'")
    ids = 6 if text.first is not None else 5
    dim, rest = divmod(int(unet_shapes[key].shape[1]) - text.pooled_dim, ids)
    if rest or dim <= 0:
        raise CheckpointError(
            f"{source}: '{UNET_PREFIX}{key}' takes {unet_shapes[key].shape[1]} inputs, not a "
            f"{text.pooled_dim}-d pooled vector and {ids} time ids"
        )
    return dim


def load_diffusers_folder(
    folder: Path, device: torch.device, dtype: torch.dtype, name: str | None = None
) -> Pipeline:
    """A diffusers pipeline folder: model_index.json plus unet/, vae/, text_encoder/, scheduler/
    (SDXL: text_encoder_2/ too; its refiner has text_encoder_2/ only)."""
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    if is_ldm_folder(folder):
        return load_ldm_folder(folder, device, dtype, name)
    if is_ldm_text_folder(folder):
        return load_ldm_text_folder(folder, device, dtype, name)
    index = read_json(folder / "model_index.json")
    unet_dir = folder / "unet"
    unet_json = read_json(unet_dir / "config.json")
    unet_cfg = unet_config_from_diffusers(unet_json, source=str(unet_dir))
    weights = WeightFile(find_weights(unet_dir, "diffusion_pytorch_model"))
    nhwc = prefers_channels_last(device)  # read conv weights NHWC once (see Pipeline)
    raw = weights.read(list(weights.shapes()), device=device, dtype=dtype, channels_last=nhwc)
    unet = build_module(
        lambda: UNetModel(unet_cfg),
        unet_state_dict_from_diffusers(raw, unet_cfg, source=str(weights.path)),
        what="UNet",
        source=str(weights.path),
        device=device,
        dtype=dtype,
    )
    del raw
    text: TextEncoder | SDXLTextEncoder
    if (folder / "text_encoder_2" / "config.json").is_file():
        text = sdxl_text_from_diffusers(folder, device=device, dtype=dtype)
        family: str | None = "sdxl" if text.first is not None else "sdxl-refiner"
        zero_negative = bool(index.get("force_zeros_for_empty_prompt", True))  # diffusers' default
        # SDXL's VAE overflows in fp16: where its config says so, it runs in float32.
        upcast = read_json(folder / "vae" / "config.json").get("force_upcast", True)
        vae_dtype = torch.float32 if upcast and dtype == torch.float16 else dtype
    else:
        text = text_encoder_from_diffusers(folder, device=device, dtype=dtype)
        family, zero_negative, vae_dtype = None, False, dtype
    x4 = is_x4_folder(folder)
    scaling = X4_VAE_SCALING if x4 else None  # diffusers' upscale pipeline fixes it
    vae = vae_from_diffusers(folder / "vae", device=device, dtype=vae_dtype, scaling_factor=scaling)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched_cfg = read_json(sched_path) if sched_path.is_file() else None
    schedule = NoiseSchedule.from_config(sched_cfg)
    log.info("loaded diffusers folder %s on %s/%s", folder, device, dtype)
    side = unet_json.get("sample_size") or 64  # latent side; a few configs give [h, w]
    native = int(side[0] if isinstance(side, list) else side) * vae.downsampling_factor
    return Pipeline(
        unet=unet,
        vae=vae,
        text=text,
        schedule=schedule,
        name=name or folder.name,
        native_size=native,
        family=X4_FAMILY if x4 else family,
        zero_empty_negative=zero_negative,
        low_res_noise=x4_folder_noise(folder) if x4 else None,
    )
