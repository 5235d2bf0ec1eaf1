"""The latent diffusion model: UNet, VAE, CLIP text encoder, samplers and checkpoint loading."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.pipeline import Pipeline

__all__ = ["Pipeline", "load_pipeline"]


def load_pipeline(
    source: str,
    device: Any = None,
    dtype: Any = None,
    lora_dir: Any = None,
    embeddings_dir: Any = None,
) -> Pipeline:
    """Load a pipeline from a checkpoint file, a diffusers folder, a hub repo id or "demo";
    `lora_dir` holds the LoRA adapters requests may name, `embeddings_dir` the textual-inversion
    embeddings prompts may use."""
    from model.checkpoint import load_pipeline as _load

    return _load(
        source, device=device, dtype=dtype, lora_dir=lora_dir, embeddings_dir=embeddings_dir
    )
