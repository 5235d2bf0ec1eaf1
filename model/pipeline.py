"""The LDM pipeline: encode prompts and images, batched denoising steps, decode — and generate().

The engine drives the pieces (`encode_prompts`, `begin`, `model.denoise.denoise_step`,
`finish`) itself to batch many jobs; `generate()` is the one-job loop over the same pieces, so
a job served by the engine and a `generate()` call with the same parameters give the same image.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model import prompt_encoding, samplers
from model.capabilities import Capabilities, describe
from model.compiled import BucketedUNet
from model.conditioning import Conditioning
from model.denoise import Blend, Row, denoise_step
from model.embeddings import expand_prompt
from model.first_stage import FirstStage, Posterior
from model.lora_files import LoraError
from model.lora_layers import AdapterSet
from model.lora_library import LoraLibrary
from model.text import TextEncoder
from model.unet import UNetModel, prefers_channels_last
from model.unet2d import UNet2DModel

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # diffusers' pipeline defaults
UPSCALE_INPUT_MULTIPLE = 32  # LDMSuperResolutionPipeline resizes its input down to multiples of 32


class GenerationError(ValueError):
    """A generation request the pipeline cannot run; the message says which parameter and why."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class JobStart:
    """A job ready to denoise: one row per image, and what `finish` needs afterwards."""

    rows: list[Row]
    source: np.ndarray | None = None  # (H, W, 3) uint8: kept pixels when keep_unmasked
    keep: np.ndarray | None = None  # (H, W, 1) bool: pixels to keep from `source`


def _pil_rgb(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image at the output size, resized as diffusers' VaeImageProcessor does (Lanczos)."""
    image = image.convert("RGB")
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


@dataclass
class Pipeline:
    """A loaded model: UNet, first stage, text encoder (None: unconditional or upscaler) and
    noise schedule on one device and dtype."""

    unet: UNetModel | UNet2DModel
    vae: FirstStage  # KL (model.vae) or VQ (model.vq) autoencoder
    text: TextEncoder | None
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
    _capabilities: Capabilities | None = field(default=None, init=False, repr=False)
    _compiled: BucketedUNet | None = field(default=None, init=False, repr=False)
    _loras: LoraLibrary | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if prefers_channels_last(self.device):  # loaders read conv weights NHWC already
            self.unet.use_channels_last()
            # The autoencoder too: its NCHW decode took 2.1x the channels_last one on CPU
            # (SD VAE, 256x256: 4.2 s vs 2.1 s; bench/generate.py's default layout).
            self.vae.to(memory_format=torch.channels_last)

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
        return next(self.vae.parameters()).dtype

    @property
    def takes_prompt(self) -> bool:
        return self.text is not None

    @property
    def upscaler(self) -> bool:
        """A text-free UNet taking the low-res RGB image as concat channels (LDM super-resolution)."""
        return self.text is None and self.unet.config.in_channels == self.latent_channels + 3

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
            w0, h0 = (f * (s - s % UPSCALE_INPUT_MULTIPLE) for s in image.size)
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
                {"unet": self.unet, **({"text": self.text.model} if self.text else {})},
                self.lora_dir,
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

    # ----------------------------------------------------------------- checks
    def check(
        self,
        *,
        width: int,
        height: int,
        steps: int,
        sampler: str,
        num_images: int,
        image: Image.Image | None,
        mask: Image.Image | None,
        strength: float | None,
        clip_skip: int | None = None,
        prompt: str = "",
    ) -> tuple[str, float | None]:
        """(mode, strength) of a request, or GenerationError naming the parameter."""
        self.latent_shape(width, height)
        layers = self.text.layers if self.text is not None else 0
        if clip_skip is not None and not 1 <= clip_skip <= layers:
            raise GenerationError(
                f"clip_skip must be in 1..{layers} for this model, got {clip_skip}"
                if layers
                else f"{self.name} has no text encoder: clip_skip does not apply",
                "clip_skip",
            )
        if num_images < 1:
            raise GenerationError(f"num_images must be at least 1, got {num_images}", "num_images")
        if mask is not None and image is None:
            raise GenerationError("a mask needs an image to inpaint", "mask")
        if prompt and not self.takes_prompt:
            raise GenerationError(f"{self.name} takes no prompt", "prompt")
        mode = self.mode_of(image, mask)
        if mode not in self.capabilities.modes:
            inpainter = mode == "img2img" and "inpaint" in self.capabilities.modes
            raise GenerationError(
                f"{self.name} cannot run {mode}; it runs {', '.join(self.capabilities.modes)}",
                "mask" if mode == "inpaint" or inpainter else "image",
            )
        if mask is not None and image is not None and mask.size != image.size:
            raise GenerationError(
                f"mask is {mask.size[0]}x{mask.size[1]} but image is "
                f"{image.size[0]}x{image.size[1]}; they must be the same size",
                "mask",
            )
        if mode == "upscale" and image is not None:
            expected = self.output_size(None, None, image)
            if (width, height) != expected or 0 in image.size:
                raise GenerationError(
                    f"an upscaler's output is {self.vae_scale_factor}x the input rounded down to "
                    f"multiples of {UPSCALE_INPUT_MULTIPLE}: {expected[0]}x{expected[1]} here, "
                    f"got {width}x{height}",
                    "width",
                )
            if width * height > self.max_upscale_pixels:
                raise GenerationError(
                    f"the output {width}x{height} exceeds {self.max_upscale_pixels} pixels", "image"
                )
        if mode not in DEFAULT_STRENGTH and strength is not None:
            raise GenerationError("strength needs an image (img2img or inpainting)", "strength")
        strength = DEFAULT_STRENGTH.get(mode) if strength is None else strength
        try:
            start = samplers.start_step(steps, strength) if mode in DEFAULT_STRENGTH else 0
            samplers.plan(sampler, steps, self.schedule, start)
        except ValueError as exc:
            name = (
                "strength"
                if "strength" in str(exc)
                else "sampler"
                if "sampler" in str(exc)
                else "steps"
            )
            raise GenerationError(str(exc), name) from None
        return mode, strength

    def probe_inputs(self, side: int) -> dict[str, Any]:
        """`generate()` keywords for a throwaway job of this model's first mode with a
        side x side output (warm-up, call-cost measurement): whatever inputs the mode needs."""
        f = self.vae_scale_factor
        side = max(f, side // f * f)
        mode = self.capabilities.modes[0]
        if mode == "upscale":
            low = max(UPSCALE_INPUT_MULTIPLE, side // f)
            image = Image.new("RGB", (low, low))
            width, height = self.output_size(None, None, image)
            return {"image": image, "width": width, "height": height}
        kw: dict[str, Any] = {"width": side, "height": side}
        if mode == "inpaint":
            kw |= {
                "image": Image.new("RGB", (side, side)),
                "mask": Image.new("L", (side, side), 255),
            }
        elif mode == "img2img":
            kw["image"] = Image.new("RGB", (side, side))
        if self.takes_prompt:
            kw["prompt"] = "warm-up"
        return kw

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
        adapters: Sequence[AdapterSet] | None = None,
    ) -> list[torch.Tensor]:
        """Each prompt's text embedding (1, 77·k, D) in the UNet's dtype: A1111's 75-token
        chunks and weights (model.prompt_encoding), not padded; one encoder call per adapter
        set (`adapters`: each prompt's LoRAs, their text-encoder parts applied); textual
        inversion words expanded. A text-free model gets (1, 0, 0) per prompt."""
        if self.text is None:
            return [torch.zeros((1, 0, 0), device=self.device, dtype=self.dtype) for _ in prompts]
        prompts = list(prompts)
        if self.embeddings:
            prompts = [expand_prompt(p, self.embeddings, self.text) for p in prompts]
        sets = list(adapters) if adapters else [()] * len(prompts)
        out: list[torch.Tensor | None] = [None] * len(prompts)
        for adapter_set in dict.fromkeys(sets):  # prompts sharing adapters encode together
            idx = [i for i, a in enumerate(sets) if a == adapter_set]
            chunks = [prompt_encoding.chunk_prompt(self.text, prompts[i]) for i in idx]
            rows = sum(c.count for c in chunks)  # the encoder call's batch: every chunk
            scope = (
                self.loras.applied("text", [adapter_set] * rows)
                if adapter_set
                else contextlib.nullcontext()
            )
            with scope:
                embs = prompt_encoding.encode_chunks(self.text, chunks, clip_skip=clip_skip or 1)
            for i, e in zip(idx, embs, strict=True):
                out[i] = e.hidden.to(self.device, self.dtype)
        return out  # type: ignore[return-value]

    def encode_prompts(
        self,
        prompts: Sequence[str],
        clip_skip: int | None = None,
        adapters: Sequence[AdapterSet] | None = None,
    ) -> torch.Tensor:
        """Text embeddings (N, 77·k, D) in the UNet's dtype, shorter prompts padded with
        empty-prompt chunks to the longest (so CFG's rows batch); (N, 0, 0) without text."""
        if self.text is None:
            return torch.zeros((len(prompts), 0, 0), device=self.device, dtype=self.dtype)
        sets = list(adapters) if adapters else [()] * len(prompts)
        pad_set = sets[0] if sets and all(a == sets[0] for a in sets) else ()  # a job's own
        *embs, empty = self.embed_prompts([*prompts, ""], clip_skip, [*sets, pad_set])
        return torch.cat(prompt_encoding.pad_to_longest(embs, empty))

    @torch.inference_mode()
    def unet_forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One UNet call; float32 latents in, float32 model output out."""
        x, t, cond = x.to(self.device), t.to(self.device), cond.to(self.device, self.dtype)
        if cond.loras is None:
            unet = self._compiled or self.unet
            return unet(x, t, cond).float()
        with self.loras.applied("unet", cond.loras):  # eager: adapters change per call
            return self.unet(x, t, cond).float()

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
        emb = self.encode_prompts([""])
        concat = None
        extra = self.unet.config.in_channels - self.latent_channels
        if extra > 0:
            concat = torch.zeros(1, extra, h, w, device=self.device, dtype=self.dtype)
        return self._compiled.warm((c, h, w), Conditioning(emb, concat=concat))

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> Posterior:
        """First-stage posterior of (1, 3, H, W) pixels in [-1, 1], in float32 (unscaled)."""
        return self.vae.encode(pixels.to(self.device, self.vae_dtype)).float()

    @torch.inference_mode()
    def begin(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        *,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        sampler: str,
        seed: int,
        num_images: int,
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        strength: float | None = None,
        keep_unmasked: bool = False,
        adapters: AdapterSet = (),
    ) -> JobStart:
        """Rows for one job's images (prompt embeddings (1, N, D) given), following the noise
        convention: image i draws from Generator("cpu").manual_seed(seed + i), in the order the
        diffusers pipeline of the mode draws (source posterior, noise, masked-image posterior)."""
        mode, strength = self.check(
            width=width, height=height, steps=steps, sampler=sampler, num_images=num_images,
            image=image, mask=mask, strength=strength,
        )  # fmt: skip
        shape = self.latent_shape(width, height)
        start = samplers.start_step(steps, strength) if mode in DEFAULT_STRENGTH else 0
        traj = samplers.plan(sampler, steps, self.schedule, start)
        sf = self.vae.scaling_factor
        size = (width, height) if mode != "upscale" else shape[:1:-1]  # the low-res input's
        source = _pil_rgb(image, *size) if image is not None else None
        pixels = None
        if source is not None:
            arr = np.asarray(source, dtype=np.float32) / 255.0  # (H, W, 3)
            pixels = torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W)
        pure_noise = mode not in DEFAULT_STRENGTH or (mode == "inpaint" and strength == 1.0)
        blend = mode == "inpaint" and not self.concat_inpainting
        posterior = (
            self.encode_image(pixels) if pixels is not None and (not pure_noise or blend) else None
        )
        mask_px = masked = mask_lat = None
        if mode == "inpaint":
            gray = mask.convert("L")  # type: ignore[union-attr]
            if gray.size != (width, height):
                gray = gray.resize((width, height), Image.LANCZOS)
            mask_px = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None, None]
            mask_px = (mask_px >= 0.5).float()  # binarised as diffusers' mask processor does
            masked = self.encode_image(pixels * (mask_px < 0.5))  # type: ignore[operator]
            mask_lat = F.interpolate(mask_px, size=shape[2:]).to(self.device)  # nearest
        guided = guidance_scale > 1.0 and self.takes_prompt  # as diffusers: no CFG at or below 1
        lowres = pixels.to(self.device) if mode == "upscale" else None  # type: ignore[union-attr]
        rows = []
        for i in range(num_images):
            gen = torch.Generator("cpu").manual_seed(seed + i)
            clean = posterior.sample(gen) * sf if posterior is not None else None
            noise = torch.randn(shape, generator=gen, dtype=torch.float32).to(self.device)
            if pure_noise:
                state = samplers.from_noise(traj, noise, gen)
            else:
                state = samplers.start_noised(traj, clean, noise, gen)  # type: ignore[arg-type]
            concat = lowres  # (1, 3, h, w) for an upscaler, else None
            if masked is not None:
                masked_lat = masked.sample(gen) * sf
                if self.concat_inpainting:
                    concat = torch.cat([mask_lat, masked_lat], dim=1)  # type: ignore[list-item]
            c = Conditioning(
                cond, concat=concat, scale_concat=mode == "upscale",
                loras=(adapters,) if adapters else None,
            )  # fmt: skip
            u = c.with_text(uncond) if guided and uncond is not None else None
            b = Blend(mask_lat, clean, noise) if blend else None  # type: ignore[arg-type]
            rows.append(Row(traj, state, c, u, float(guidance_scale), b))
        if keep_unmasked and mask_px is not None and source is not None:
            keep = (mask_px[0, 0] < 0.5).numpy()[:, :, None]
            return JobStart(rows, np.asarray(source, dtype=np.uint8), keep)
        return JobStart(rows)

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Final latents (B, C, h, w) -> uint8 images (B, H, W, 3), as diffusers converts them;
        latents larger than `decode_tile` squared decode in tiles of that side (bounded memory)."""
        chunks = []
        h, w = latents.shape[2:]
        tile = self.decode_tile if h * w > self.decode_tile**2 else None
        for part in latents.split(self.decode_chunk):
            z = part.to(self.device, self.vae_dtype) / self.vae.scaling_factor
            images = self.vae.decode(z, tile=tile).float()  # (b, 3, H, W) in [-1, 1]
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
        clip_skip: int | None = None,
        loras: Sequence[Mapping[str, Any]] = (),
    ) -> list[Image.Image]:
        """Text-to-image, img2img (image) or inpainting (image + mask, white = repaint) for one
        prompt; unconditional models take no prompt, upscalers the low-res `image`; image i
        uses the generator seeded with seed + i; `loras` [{"name", "scale"}] (a name in
        lora_dir, or a .safetensors path)."""
        width, height = self.output_size(width, height, image)
        self.check(
            width=width, height=height, steps=steps, sampler=sampler, num_images=num_images,
            image=image, mask=mask, strength=strength, clip_skip=clip_skip, prompt=prompt,
        )  # fmt: skip
        guided = guidance_scale > 1.0
        adapters = self.adapter_set(loras)
        texts = [prompt, negative_prompt] if guided else [prompt]
        cond, *rest = self.encode_prompts(texts, clip_skip, [adapters] * len(texts)).split(1)
        uncond = rest[0] if rest else None
        job = self.begin(
            cond, uncond, width=width, height=height, steps=steps,
            guidance_scale=guidance_scale, sampler=sampler, seed=seed, num_images=num_images,
            image=image, mask=mask, strength=strength, keep_unmasked=keep_unmasked,
            adapters=adapters,
        )  # fmt: skip
        rows = job.rows
        while not rows[0].finished:
            for row, state in zip(rows, denoise_step(self.unet_forward, rows), strict=True):
                row.state = state
        pixels = self.finish(job, self.decode_latents(torch.cat([r.state.x for r in rows])))
        return [Image.fromarray(p) for p in pixels]
