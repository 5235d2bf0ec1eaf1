"""SDXL's text conditioning: CLIP ViT-L and OpenCLIP ViT-bigG (Podell et al., 2023).

Both towers' penultimate hidden states (before the final layer norm) are concatenated along
the feature axis into the UNet's context (768 + 1280 = 2048 for the base model); bigG's pooled
output (final layer norm at the end-of-text token) through its `text_projection` is the
pooled vector of the added embedding. The refiner has bigG only. bigG is held as a
CLIPTextModel with all its blocks plus the projection as a bias-free Linear, so both towers
share `model.text.TextEncoder`'s tokenization and padding rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from model.prompt_encoding import encode_prompts, pad_to_chunks
from model.text import TextEncoder
from model.text_diffusers import text_encoder_from_diffusers, text_encoder_with_projection
from model.text_ldm import open_clip_state_dict, text_encoder_from_ldm
from model.weights import CheckpointError

SGM_PREFIX = "conditioner.embedders."  # SDXL single files: embedders.0 (ViT-L), .1 (bigG)


def projection_layer(weight: Tensor) -> nn.Linear:
    """A bias-free Linear holding `weight` (out, in) as it is (no copy)."""
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer.eval()


class SDXLTower:
    """One SDXL text tower as a `model.prompt_encoding.ChunkEncoder`: SDXL conditions on the
    penultimate block's output without the final layer norm (clip_skip n: the n-th block
    output before that, as diffusers' clip_skip = n - 1); bigG's pooled output (final layer
    norm at the first end-of-text token) goes through its projection."""

    def __init__(self, encoder: TextEncoder, projection: nn.Linear | None = None) -> None:
        self.encoder = encoder
        self.projection = projection

    @property
    def bos_id(self) -> int:
        return self.encoder.bos_id

    @property
    def eos_id(self) -> int:
        return self.encoder.eos_id

    @property
    def pad_token_id(self) -> int:
        return self.encoder.pad_token_id

    @property
    def layers(self) -> int:
        """The largest clip_skip: every block output below the last one."""
        return self.encoder.layers - 1

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoder.token_ids(texts)

    def encode_ids(self, ids: Tensor, *, clip_skip: int = 1) -> tuple[Tensor, Tensor | None]:
        """(N, 77) ids -> (hidden states (N, 77, D), projected pooled (N, P) or None)."""
        if not 1 <= clip_skip <= self.layers:
            raise ValueError(f"clip_skip must be in 1..{self.layers} for this text encoder")
        with torch.inference_mode():
            out = self.encoder.model(
                input_ids=ids.to(self.encoder.device), output_hidden_states=True
            )
            hidden = out.hidden_states[-(clip_skip + 1)]  # (N, 77, D)
            if self.projection is None:
                return hidden, None
            pooled = out.pooler_output.to(self.projection.weight.dtype)
            return hidden, self.projection(pooled)  # (N, P)


@dataclass
class SDXLTextEncoder:
    """Prompts (and second prompts) in; per prompt (context (1, 77·k, D1 + D2), pooled (1, P))."""

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

    def towers(self) -> tuple[SDXLTower | None, SDXLTower]:
        first = None if self.first is None else SDXLTower(self.first)
        return first, SDXLTower(self.second, self.projection)

    @property
    def layers(self) -> int:
        """The largest clip_skip both towers honour."""
        return min(t.layers for t in self.towers() if t is not None)

    def embed(
        self, prompts: list[str], prompts_2: list[str], *, clip_skip: int = 1
    ) -> list[tuple[Tensor, Tensor | None]]:
        """Each prompt's (context, pooled), long and weighted prompts chunked per tower
        (model.prompt_encoding): the first tower reads `prompts`, bigG `prompts_2` (the
        refiner's bigG: `prompts`, as diffusers pairs prompts with the encoders it has)."""
        first, second = self.towers()
        if first is None:
            return [
                (e.hidden, e.pooled) for e in encode_prompts(second, prompts, clip_skip=clip_skip)
            ]
        *small, small_empty = encode_prompts(first, [*prompts, ""], clip_skip=clip_skip)
        *big, big_empty = encode_prompts(second, [*prompts_2, ""], clip_skip=clip_skip)
        out = []
        for a, b in zip(small, big, strict=True):
            chunks = max(a.chunks, b.chunks)  # a prompt and its second prompt may differ
            h1 = pad_to_chunks(a.hidden, chunks, small_empty.hidden)
            h2 = pad_to_chunks(b.hidden, chunks, big_empty.hidden)
            out.append((torch.cat([h1, h2.to(h1.dtype)], dim=-1), b.pooled))
        return out


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


def _embedders(keys: list[str]) -> list[tuple[str, str]]:
    """(prefix, layout) per text embedder of an SDXL single file: "hf" (CLIP ViT-L as
    `transformer.text_model.*`) or "open_clip" (bigG as `model.*`), in embedder order."""
    found = sorted(
        {k[len(SGM_PREFIX) :].split(".", 1)[0] for k in keys if k.startswith(SGM_PREFIX)}
    )
    out = []
    for index in found:
        prefix = f"{SGM_PREFIX}{index}."
        if any(k.startswith(prefix + "transformer.") for k in keys):
            out.append((prefix, "hf"))
        elif any(k.startswith(prefix + "model.") for k in keys):
            out.append((prefix, "open_clip"))
        else:
            raise CheckpointError(f"{prefix}*: an SDXL text embedder of unknown layout")
    return out


def sdxl_text_from_ldm(
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SDXLTextEncoder:
    """SDXL's text towers from a single file: base (ViT-L at embedders.0, bigG at .1) or
    refiner (bigG alone); bigG keeps every block and its `text_projection` (width, P)."""
    layouts = _embedders(list(state_dict))
    kinds = [kind for _, kind in layouts]
    if kinds not in (["hf", "open_clip"], ["open_clip"]):
        raise CheckpointError(
            f"{source}: SDXL text embedders {[p for p, _ in layouts]} are not ViT-L + bigG "
            "(base) or bigG (refiner)"
        )
    first = None
    if kinds[0] == "hf":
        prefix = layouts[0][0]
        first = text_encoder_from_ldm(
            state_dict, source=source, device=device, dtype=dtype, prefix=prefix
        )
    prefix = layouts[-1][0]
    second = text_encoder_from_ldm(
        state_dict, source=source, device=device, dtype=dtype, prefix=prefix, all_blocks=True
    )
    key = prefix + "model.text_projection"
    if key not in state_dict:
        raise CheckpointError(f"{source}: text encoder weights are missing key '{key}'")
    projection = state_dict[key].to(device, dtype).T.contiguous()  # OpenCLIP: x @ P, (width, P)
    return SDXLTextEncoder(first, second, projection_layer(projection))


def sdxl_text_state_dict_to_ldm(text: SDXLTextEncoder) -> dict[str, Tensor]:
    """Our towers in the SDXL single-file layout (for writing checkpoints): ViT-L as HF keys
    below embedders.0.transformer.text_model., bigG as OpenCLIP keys below embedders.N.model."""
    out: dict[str, Tensor] = {}
    index = 0
    if text.first is not None:
        hf = f"{SGM_PREFIX}0.transformer.text_model."
        out.update({hf + k: v for k, v in text.first.model.state_dict().items()})
        index = 1
    oc = f"{SGM_PREFIX}{index}.model."
    out.update(open_clip_state_dict(text.second.model, oc))
    out[oc + "text_projection"] = text.projection.weight.T.contiguous()
    return out
