"""SDXL's text conditioning: CLIP ViT-L and OpenCLIP ViT-bigG (Podell et al., 2023).

Both towers' penultimate hidden states (before the final layer norm) are concatenated along
the feature axis into the UNet's context (768 + 1280 = 2048 for the base model); bigG's pooled
output (final layer norm at the end-of-text token) through its `text_projection` is the
pooled vector of the added embedding. The refiner has bigG only. bigG is held as a
CLIPTextModel with all its blocks plus the projection as a bias-free Linear, so both towers
share `model.text.TextEncoder`'s tokenization and padding rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from model.text import TextEncoder
from model.text_diffusers import text_encoder_from_diffusers, text_encoder_with_projection


def projection_layer(weight: Tensor) -> nn.Linear:
    """A bias-free Linear holding `weight` (out, in) as it is (no copy)."""
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer.eval()


def hidden_and_pooled(encoder: TextEncoder, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """(penultimate hidden states (N, 77, D), pooled output (N, D)) of one tower."""
    ids = encoder.tokenize(prompts).to(encoder.device)
    with torch.inference_mode():
        out = encoder.model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[-2], out.pooler_output


@dataclass
class SDXLTextEncoder:
    """Prompts (and second prompts) in; (context (N, 77, D1 + D2), pooled (N, P)) out."""

    first: TextEncoder | None  # CLIP ViT-L/14; None: the refiner, which has bigG only
    second: TextEncoder  # OpenCLIP ViT-bigG/14, every block
    projection: nn.Linear  # bigG's text_projection

    @property
    def device(self) -> torch.device:
        return self.second.device

    @property
    def pooled_dim(self) -> int:
        return int(self.projection.out_features)

    @property
    def context_dim(self) -> int:
        return self.second.hidden_size + (0 if self.first is None else self.first.hidden_size)

    def encode(self, prompts: list[str], prompts_2: list[str]) -> tuple[Tensor, Tensor]:
        """The first tower reads `prompts`, bigG `prompts_2` (the refiner's bigG: `prompts`,
        as diffusers pairs prompts with the encoders it has)."""
        if self.first is None:
            hidden, pooled = hidden_and_pooled(self.second, prompts)
            return hidden, self._project(pooled)
        first, _ = hidden_and_pooled(self.first, prompts)
        hidden, pooled = hidden_and_pooled(self.second, prompts_2)
        return torch.cat([first, hidden.to(first.dtype)], dim=-1), self._project(pooled)

    def _project(self, pooled: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.projection(pooled.to(self.projection.weight.dtype))  # (N, P)


def sdxl_text_from_diffusers(
    folder: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> SDXLTextEncoder:
    """text_encoder/ + tokenizer/ (absent in refiners) and text_encoder_2/ + tokenizer_2/."""
    first = None
    if (Path(folder) / "text_encoder" / "config.json").is_file():
        first = text_encoder_from_diffusers(folder, device=device, dtype=dtype)
    second, weight = text_encoder_with_projection(
        folder, device=device, dtype=dtype, encoder="text_encoder_2", tokenizer="tokenizer_2"
    )
    assert weight is not None
    return SDXLTextEncoder(first, second, projection_layer(weight.to(device, dtype)))
