"""Random LoRA adapter files, written in the kohya-ss and diffusers/PEFT layouts, for tests.

The tensors' shapes come from the layers named (taken from the network passed in), never
from the reader under test; kohya LoCon convolutions use the layer's own kernel for `down`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn


def layers(root: nn.Module, *, kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> list[str]:
    """Names of the layers of `root` an adapter can target."""
    return [n for n, m in root.named_modules() if n and isinstance(m, kinds)]


def _pair(layer: nn.Module, rank: int, gen: torch.Generator, std: float) -> tuple[Tensor, Tensor]:
    if isinstance(layer, nn.Linear):
        down = torch.randn(rank, layer.in_features, generator=gen) * std
        up = torch.randn(layer.out_features, rank, generator=gen) * std
    elif isinstance(layer, nn.Conv2d):
        down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=gen) * std
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=gen) * std
    else:
        raise TypeError(type(layer).__name__)
    return down, up


def kohya_tensors(
    networks: Mapping[str, tuple[nn.Module, list[str]]],
    *,
    rank: int,
    alpha: float | None,
    seed: int,
    std: float = 0.2,
) -> dict[str, Tensor]:
    """{"lora_unet_" or "lora_te_": (network, layer names)} -> kohya keys (`.` as `_`)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for prefix, (root, names) in networks.items():
        for name in names:
            down, up = _pair(root.get_submodule(name), rank, gen, std)
            base = prefix + name.replace(".", "_")
            out[f"{base}.lora_down.weight"] = down
            out[f"{base}.lora_up.weight"] = up
            if alpha is not None:
                out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return out


def peft_tensors(
    networks: Mapping[str, tuple[nn.Module, list[str]]],
    *,
    rank: int,
    seed: int,
    std: float = 0.2,
) -> dict[str, Tensor]:
    """{"unet" or "text_encoder": (network, layer names)} -> `<part>.<name>.lora_A/B.weight`."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for part, (root, names) in networks.items():
        for name in names:
            down, up = _pair(root.get_submodule(name), rank, gen, std)
            out[f"{part}.{name}.lora_A.weight"] = down
            out[f"{part}.{name}.lora_B.weight"] = up
    return out


def peft_metadata(targets: Mapping[str, list[str]], *, rank: int, alpha: float) -> dict[str, str]:
    """The `lora_adapter_metadata` diffusers writes: each part's LoraConfig fields."""
    meta: dict[str, object] = {}
    for part, names in targets.items():
        meta[f"{part}.r"] = rank
        meta[f"{part}.lora_alpha"] = alpha
        meta[f"{part}.target_modules"] = sorted(names)
    return {"format": "pt", "lora_adapter_metadata": json.dumps(meta)}


def write(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def kohya_unet_and_text(
    unet: nn.Module, text: nn.Module, *, rank: int, alpha: float | None, seed: int
) -> dict[str, Tensor]:
    """kohya LoCon over every UNet Linear / Conv2d and every text-encoder Linear, named as
    files name them (`lora_te_text_model_...`); the UNet in whatever spelling `unet` has."""
    return kohya_tensors(
        {
            "lora_unet_": (unet, layers(unet)),
            "lora_te_text_model_": (text, layers(text, kinds=(nn.Linear,))),
        },
        rank=rank,
        alpha=alpha,
        seed=seed,
    )


def write_demo_loras(pipe: Any, folder: Path) -> Path:
    """For the demo model: `ink` (kohya, LDM spelling, UNet + text), `neon` (PEFT, UNet
    attention) and `broken` (not safetensors)."""
    unet, te = pipe.unet, pipe.text.model
    kohya = kohya_unet_and_text(unet, te, rank=4, alpha=2.0, seed=3)
    attn = [n for n in layers(unet) if ".attn" in n]
    write(folder / "ink.safetensors", kohya)
    write(folder / "neon.safetensors", peft_tensors({"unet": (unet, attn)}, rank=8, seed=4))
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    return folder


def text_layers(text: nn.Module) -> list[str]:
    """A CLIP text tower's Linear layers below `text_model.` (as files name them; transformers
    5's CLIPTextModel has no `text_model` submodule, CLIPTextModelWithProjection does), without
    bigG's `text_projection`, which kohya does not train."""
    names = [n.removeprefix("text_model.") for n in layers(text, kinds=(nn.Linear,))]
    return [n for n in names if n != "text_projection"]


class _TextView(nn.Module):
    """`text_model.<name>` of a tower, whichever way transformers nests it (for the writers)."""

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.text = text

    def get_submodule(self, target: str) -> nn.Module:
        name = target.removeprefix("text_model.")
        return self.text.get_submodule(
            name if hasattr(self.text, "encoder") else f"text_model.{name}"
        )


def kohya_sdxl(
    unet_ldm: nn.Module, te1: nn.Module, te2: nn.Module, *, rank: int, alpha: float, seed: int
) -> dict[str, Tensor]:
    """kohya LoCon for SDXL as sd-scripts writes it: every UNet Linear / Conv2d in the original
    layout (`lora_unet_input_blocks_4_1_...`: `unet_ldm` must be a UNet with those names) and
    every Linear of both towers (`lora_te1_text_model_...`, `lora_te2_text_model_...`)."""
    return kohya_tensors(
        {
            "lora_unet_": (unet_ldm, layers(unet_ldm)),
            "lora_te1_text_model_": (_TextView(te1), text_layers(te1)),
            "lora_te2_text_model_": (_TextView(te2), text_layers(te2)),
        },
        rank=rank,
        alpha=alpha,
        seed=seed,
    )


def peft_sdxl(
    unet: nn.Module, te1: nn.Module, te2: nn.Module, unet_names: list[str], text_suffixes: tuple
) -> tuple[dict[str, list[str]], dict[str, tuple[nn.Module, list[str]]]]:
    """(metadata targets, peft_tensors networks) for an SDXL diffusers/PEFT file: `unet.`,
    `text_encoder.text_model.` and `text_encoder_2.text_model.` keys."""
    towers = {"text_encoder": te1, "text_encoder_2": te2}
    keys = {p: [f"text_model.{n}" for n in text_layers(t) if n.endswith(text_suffixes)]
            for p, t in towers.items()}  # fmt: skip
    own = {p: [n for n in layers(t, kinds=(nn.Linear,)) if n.endswith(text_suffixes)]
           for p, t in towers.items()}  # fmt: skip  # PEFT's target_modules: the tower's names
    networks = {
        "unet": (unet, unet_names),
        **{p: (_TextView(t), keys[p]) for p, t in towers.items()},
    }
    return {"unet": unet_names, **own}, networks


@contextmanager
def reference_adapters(
    ref: Any, files: Mapping[str, Path], weights: Mapping[str, float]
) -> Iterator[None]:
    """A diffusers pipeline with adapter files loaded by `load_lora_weights` and weighted by
    `set_adapters` (unfused: the oracle of the parity tests); unloaded afterwards."""
    ref.unload_lora_weights()
    for name, path in files.items():
        with warnings.catch_warnings():  # PEFT warns that a second adapter is a second adapter
            warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
            ref.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    if weights:
        ref.set_adapters(list(weights), list(weights.values()))
    try:
        yield
    finally:
        ref.unload_lora_weights()
