"""The LDM pipeline: encode prompts and images, batched denoising steps, decode — and generate().

The engine drives the pieces (`encode_prompts`, `begin`, `model.denoise.denoise_step`,
`finish`) itself to batch many jobs; `generate()` is the one-job loop over the same pieces, so
a job served by the engine and a `generate()` call with the same parameters give the same image.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model import samplers, text_conditioning
from model.capabilities import Capabilities, describe
from model.compiled import BucketedUNet
from model.conditioning import Conditioning
from model.denoise import ConditioningCache, denoise_step
from model.first_stage import FirstStage, Posterior
from model.first_stage_guard import FiniteFirstStage, dtype_of
from model.generation_checks import (
    GenerationError,
    check_generation,
)
from model.job_start import JobStart, begin_job
from model.lora_files import LoraError
from model.lora_layers import AdapterSet
from model.lora_library import LoraLibrary, adaptable_networks
from model.micro_conditioning import time_id_count, time_ids
from model.sd_upscale import LowResNoise
from model.text import TextEncoder
from model.text_sdxl import SDXLTextEncoder
from model.unet import UNetModel, prefers_channels_last
from model.unet2d import UNet2DModel

log = logging.getLogger(__name__)


UPSCALE_INPUT_MULTIPLE = 32  # LDMSuperResolutionPipeline resizes its input down to multiples of 32


@dataclass
class Pipeline:
    """A loaded model: UNet, first stage, text encoder (None: unconditional or upscaler) and
    noise schedule on one device and dtype."""

    unet: UNetModel | UNet2DModel
    vae: FirstStage  # KL (model.vae) or VQ (model.vq) autoencoder
    text: TextEncoder | SDXLTextEncoder | None
    schedule: samplers.NoiseSchedule
    name: str = "model"
    decode_chunk: int = 4  # images decoded per VAE call: bounds activation memory at 512x512+
    native_size: int = 512  # the side the model was trained at (a request without a size)
    family: str | None = None  # None: told from the text context width (sd1 / sd2)
    decode_tile: int = 128  # latents with more positions than this squared decode in tiles
    max_upscale_pixels: int = 2048 * 2048  # an upscaler's largest output (UNet memory bound)
    lora_dir: Path | None = None  # where request-named LoRA adapters live
    lora_cache_bytes: int = 1 << 30  # adapter weights kept in memory (LRU beyond)
    embeddings: dict[str, int] = field(default_factory=dict)  # textual inversion: word -> vectors
    # SDXL's model_index.json: an empty negative prompt conditions on zeros, not on "".
    zero_empty_negative: bool = False
    # The x4 upscaler (model.sd_upscale): its low-res image is noised and labelled per row.
    low_res_noise: LowResNoise | None = None
    _capabilities: Capabilities | None = field(default=None, init=False, repr=False)
    _guard: FiniteFirstStage = field(init=False, repr=False)  # the float32 retry
    _compiled: BucketedUNet | None = field(default=None, init=False, repr=False)
    _loras: LoraLibrary | None = field(default=None, init=False, repr=False)
    time_id_count: int = field(default=0, init=False)  # SDXL: 6, its refiner: 5

    def __post_init__(self) -> None:
        self._guard = FiniteFirstStage(self.name)
        if prefers_channels_last(self.device):  # loaders read conv weights NHWC already
            self.unet.use_channels_last()
            # The decoder too: its NCHW decode took 2.1x the channels_last one on CPU (SD
            # VAE, 256x256: 4.2 s vs 2.1 s). Not the encoder: channels_last convolutions round
            # differently with the thread count, and an img2img trajectory starts from the
            # encoding (31/255 apart between 1 and 2 threads on the demo model).
            decoder = getattr(self.vae, "decoder", None)
            if isinstance(decoder, torch.nn.Module):
                decoder.to(memory_format=torch.channels_last)
        if self.low_res_noise is not None:
            self.low_res_noise = self.low_res_noise.within(self.unet.config.num_classes)
        pooled = self.text.pooled_dim if isinstance(self.text, SDXLTextEncoder) else 0
        if isinstance(self.unet, UNetModel):
            self.time_id_count = time_id_count(self.unet.config, pooled, self.name)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsampling_factor

    @property
    def vae_dtype(self) -> torch.dtype:
        return dtype_of(self.vae)

    @property
    def model_fields(self) -> tuple[str, ...]:
        """The MODEL_FIELDS this model reads: SDXL base's second prompts (its second text
        encoder), the refiner's aesthetic scores (its time ids)."""
        fields: tuple[str, ...] = ()
        if isinstance(self.text, SDXLTextEncoder) and self.text.first is not None:
            fields += ("prompt_2", "negative_prompt_2")
        if self.time_id_count == 5:
            fields += ("aesthetic_score", "negative_aesthetic_score")
        if self.low_res_noise is not None:
            fields += ("noise_level",)
        return fields

    @property
    def takes_prompt(self) -> bool:
        return self.text is not None

    @property
    def upscaler(self) -> bool:
        """A UNet taking the low-res RGB image as concat channels: the x4 upscaler, or a
        text-free one (LDM super-resolution)."""
        lowres = self.unet.config.in_channels == self.latent_channels + 3
        return lowres and (self.text is None or self.low_res_noise is not None)

    @property
    def upscale_input_multiple(self) -> int:
        """What an upscaler's input is rounded down to: the VAE factor for the x4 upscaler
        (its VaeImageProcessor), 32 for LDM super-resolution."""
        return self.vae_scale_factor if self.low_res_noise is not None else UPSCALE_INPUT_MULTIPLE

    @property
    def concat_inpainting(self) -> bool:
        """An inpainting UNet: latents + mask + masked-image latents as its input channels."""
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    @property
    def capabilities(self) -> Capabilities:
        """What this model can run; the service publishes it and checks requests against it."""
        if self._capabilities is None:
            self._capabilities = describe(self)
        return self._capabilities

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(1, C, H/f, W/f) of one image, after checking the size divides by f."""
        f = self.vae_scale_factor
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % f:
                raise GenerationError(
                    f"{name} must be a positive multiple of {f}, got {value}", name
                )
        return (1, self.latent_channels, height // f, width // f)

    def output_size(
        self, width: int | None, height: int | None, image: Image.Image | None
    ) -> tuple[int, int]:
        """The requested size, else the input image's rounded down to the latent factor,
        else the model's native size."""
        f = self.vae_scale_factor
        if image is not None and self.upscaler:
            m = self.upscale_input_multiple
            w0, h0 = (f * (s - s % m) for s in image.size)
        elif image is not None:
            w0, h0 = (s - s % f for s in image.size)
        else:
            w0 = h0 = self.native_size
        return (width or w0, height or h0)

    @property
    def loras(self) -> LoraLibrary:
        """This model's LoRA adapters (made on first use, so a model without any pays nothing)."""
        if self._loras is None:
            self._loras = LoraLibrary(
                adaptable_networks(self.unet, self.text), self.lora_dir,
                budget_bytes=self.lora_cache_bytes, device=self.device, dtype=self.dtype,
            )  # fmt: skip
        return self._loras

    def adapter_set(
        self, specs: Sequence[Mapping[str, Any]], *, allow_paths: bool = True
    ) -> AdapterSet:
        """A job's [{"name", "scale"}] loaded; GenerationError on `loras` naming file and key."""
        if not specs:
            return ()
        try:
            return self.loras.adapter_set(specs, allow_paths=allow_paths)
        except LoraError as exc:
            raise GenerationError(str(exc), "loras") from None

    def check(self, **request: Any) -> tuple[str, float | None]:
        """(mode, strength) of a request, or GenerationError naming the parameter
        (model.generation_checks.check_generation)."""
        return check_generation(self, **request)

    def mode_of(self, image: Image.Image | None, mask: Image.Image | None) -> str:
        """The mode a request's inputs ask for on this model."""
        modes = self.capabilities.modes
        if image is None:
            return "unconditional" if "unconditional" in modes else "txt2img"
        if mask is None:
            return "upscale" if "upscale" in modes else "img2img"
        return "inpaint"

    # ----------------------------------------------------------------- pieces
    def embed_prompts(
        self,
        prompts: Sequence[str],
        clip_skip: int | None = None,
        prompts_2: Sequence[str] | None = None,
        adapters: Sequence[AdapterSet] | None = None,
    ) -> list[Conditioning]:
        """Each prompt's text conditioning, not padded (model.text_conditioning.embed)."""
        return text_conditioning.embed(self, prompts, clip_skip, prompts_2, adapters)

    def encode_prompts(
        self,
        prompts: Sequence[str],
        clip_skip: int | None = None,
        prompts_2: Sequence[str] | None = None,
        adapters: Sequence[AdapterSet] | None = None,
    ) -> Conditioning:
        """N rows' text conditioning, padded to one length (model.text_conditioning.encode)."""
        return text_conditioning.encode(self, prompts, clip_skip, prompts_2, adapters)

    def unconditional(
        self, negative_prompt: str, cond: Conditioning, encoded: Conditioning
    ) -> Conditioning:
        """CFG's unconditional text (model.text_conditioning.unconditional)."""
        return text_conditioning.unconditional(self, negative_prompt, cond, encoded)

    @torch.inference_mode()
    def unet_forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One UNet call; float32 latents in, float32 model output out."""
        x, t, cond = x.to(self.device), t.to(self.device), cond.to(self.device, self.dtype)
        if cond.loras is None:
            unet = self._compiled or self.unet
            return unet(x, t, cond).float()
        with self.loras.applied("unet", cond.loras):  # eager: adapters change per call
            return self.unet(x, t, cond).float()

    @property
    def compiled_unet(self) -> BucketedUNet | None:
        """The compiled UNet (`compile_unet`), or None: eager."""
        return self._compiled

    def compile_unet(
        self, buckets: Sequence[int], mode: str | None = None, backend: str = "inductor"
    ) -> BucketedUNet:
        """Run the UNet through torch.compile at bucketed batch sizes (model.compiled); call
        `warm_compiled` to compile before serving. Calls with LoRA rows stay eager."""
        self._compiled = BucketedUNet(self.unet, buckets, mode, backend)
        return self._compiled

    def warm_compiled(self, width: int, height: int) -> float:
        """Compile every bucket at this image size; seconds it took (0 when not compiled)."""
        if self._compiled is None:
            return 0.0
        c, h, w = self.latent_shape(width, height)[1:]
        text = self.encode_prompts([""])
        concat = None
        extra = self.unet.config.in_channels - self.latent_channels
        if extra > 0:
            concat = torch.zeros(1, extra, h, w, device=self.device, dtype=self.dtype)
        ids = time_ids(self.time_id_count, width, height)
        ids_row = None if ids is None else ids[0].to(self.device)
        labels = None
        if self.low_res_noise is not None:
            labels = self.low_res_noise.labels(self.low_res_noise.level(None)).to(self.device)
        warm = replace(text, concat=concat, time_ids=ids_row, class_labels=labels)
        return self._compiled.warm((c, h, w), warm)

    @property
    def first_stage_guard(self) -> FiniteFirstStage:
        """The first stage's float32 retry (model.first_stage_guard)."""
        return self._guard

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> Posterior:
        """First-stage posterior of (1, 3, H, W) pixels in [-1, 1], in float32 (unscaled); a
        non-finite half-precision encoding is redone in float32 (NonFiniteDecodeError if that
        does not fix it)."""
        return self._guard.encode(self.vae, pixels.to(self.device))

    def begin(self, cond: Conditioning, uncond: Conditioning | None, **request: Any) -> JobStart:
        """Rows for one job's images from one row of text conditioning (`encode_prompts`,
        `unconditional`), by the noise convention (model.job_start.begin_job)."""
        return begin_job(self, cond, uncond, **request)

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Final latents (B, C, h, w) -> uint8 images (B, H, W, 3), as diffusers converts them;
        latents larger than `decode_tile` squared decode in tiles of that side (bounded memory)."""
        chunks, sf = [], self.vae.scaling_factor
        h, w = latents.shape[2:]
        tile = self.decode_tile if h * w > self.decode_tile**2 else None
        for part in latents.split(self.decode_chunk):
            images = self._guard.decode(self.vae, part.to(self.device), sf, tile)
            images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            chunks.append((images * 255).round().astype(np.uint8))
        return np.concatenate(chunks)

    @staticmethod
    def finish(job: JobStart, pixels: np.ndarray) -> np.ndarray:
        """Decoded images (n, H, W, 3) of a job; the source pixels kept where asked."""
        if job.source is None or job.keep is None:
            return pixels
        return np.where(job.keep[None], job.source[None], pixels)

    # ----------------------------------------------------------------- one job
    def generate(
        self,
        prompt: str = "",
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = 30,
        guidance_scale: float = 7.5,
        sampler: str = "euler_a",
        seed: int = 0,
        num_images: int = 1,
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        strength: float | None = None,
        keep_unmasked: bool = False,
        prompt_2: str | None = None,
        negative_prompt_2: str | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        noise_level: int | None = None,
        clip_skip: int | None = None,
        loras: Sequence[Mapping[str, Any]] = (),
    ) -> list[Image.Image]:
        """Text-to-image, img2img (image) or inpainting (image + mask, white = repaint) for one
        prompt; unconditional models take no prompt, upscalers the low-res `image`; image i
        uses the generator seeded with seed + i; `loras` [{"name", "scale"}] (a name in
        lora_dir, or a .safetensors path). SDXL's second text encoder reads `prompt_2` /
        `negative_prompt_2` (default: the first ones, as diffusers); the refiner's time ids
        `aesthetic_score` / `negative_aesthetic_score` (default 6.0 / 2.5); the x4 upscaler's
        `noise_level` (default 20)."""
        width, height = self.output_size(width, height, image)
        self.check(
            width=width, height=height, steps=steps, sampler=sampler, num_images=num_images,
            image=image, mask=mask, strength=strength, clip_skip=clip_skip, prompt=prompt,
            prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
            noise_level=noise_level,
        )  # fmt: skip
        guided = guidance_scale > 1.0 and self.takes_prompt
        adapters = self.adapter_set(loras)
        texts = [prompt, negative_prompt] if guided else [prompt]
        texts_2 = [prompt_2 or prompt, negative_prompt_2 or negative_prompt][: len(texts)]
        cond, *rest = self.encode_prompts(
            texts, clip_skip, texts_2, [adapters] * len(texts)
        ).split()
        uncond = self.unconditional(negative_prompt, cond, rest[0]) if rest else None
        job = self.begin(
            cond, uncond, width=width, height=height, steps=steps,
            guidance_scale=guidance_scale, sampler=sampler, seed=seed, num_images=num_images,
            image=image, mask=mask, strength=strength, keep_unmasked=keep_unmasked,
            adapters=adapters, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score, noise_level=noise_level,
        )  # fmt: skip
        rows, cache = job.rows, ConditioningCache(1)  # the same rows every step
        while not rows[0].finished:
            states = denoise_step(self.unet_forward, rows, cache)
            for row, state in zip(rows, states, strict=True):
                row.state = state
        pixels = self.finish(job, self.decode_latents(torch.cat([r.state.x for r in rows])))
        return [Image.fromarray(p) for p in pixels]
