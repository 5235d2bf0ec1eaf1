"""Text encoders in single-file (original LDM / SD) checkpoints: SD 1.x's HF CLIPTextModel
keys below `cond_stage_model.transformer.`, SD 2.x's (and SDXL's) OpenCLIP keys converted to
that layout (q/k/v as views of in_proj, no copy), and the way back for writing checkpoints.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from model.text import (
    SD1_PAD_ID,
    SD2_PAD_ID,
    TextEncoder,
    _load,
    bundled_tokenizer,
    clip_text_config,
)
from model.weights import CheckpointError

log = logging.getLogger(__name__)

LDM_PREFIX = "cond_stage_model."
SD1_LAYOUT = "cond_stage_model.transformer.text_model."


def _require(sd: Mapping[str, torch.Tensor], key: str, *, source: str, prefix: str) -> torch.Tensor:
    """A tensor the architecture is read from; CheckpointError naming its full key if absent."""
    if key not in sd:
        raise CheckpointError(f"{source}: text encoder weights are missing key '{prefix}{key}'")
    return sd[key]


def _block_indices(keys: list[str], pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def _hf_config(sd: Mapping[str, torch.Tensor], *, source: str, prefix: str) -> CLIPTextConfig:
    """Architecture of a HF-layout (SD 1.x) tower, read from tensor shapes."""
    token = _require(sd, "embeddings.token_embedding.weight", source=source, prefix=prefix)
    pos = _require(sd, "embeddings.position_embedding.weight", source=source, prefix=prefix)
    fc1 = _require(sd, "encoder.layers.0.mlp.fc1.weight", source=source, prefix=prefix)
    layers = _block_indices(list(sd), r"encoder\.layers\.(\d+)\.")
    return clip_text_config(
        hidden=token.shape[1],
        layers=max(layers) + 1,
        intermediate=fc1.shape[0],
        max_positions=pos.shape[0],
        vocab=token.shape[0],
        hidden_act="quick_gelu",
    )


_OPEN_CLIP_MODULES = {  # resblock module -> CLIPEncoderLayer module (attn.in_proj is split)
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# In SD 2.x files but not used for conditioning: the pooled projection, CLIP's contrastive
# temperature and (in some exports) the constant causal mask.
_OPEN_CLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}


def _open_clip_to_hf(
    sd: Mapping[str, torch.Tensor], *, source: str, prefix: str, all_blocks: bool = False
) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    """OpenCLIP text tower (keys below `prefix`) -> CLIPTextModel layout minus its last block
    (SD 2.x conditions on the penultimate one), or with every block (SDXL's bigG, which also
    needs the last one for its pooled vector).

    q/k/v are row slices (views) of in_proj, so no weight is copied.
    """
    blocks = _block_indices(list(sd), r"transformer\.resblocks\.(\d+)\.")
    if len(blocks) < 2:
        raise CheckpointError(f"{source}: text tower below '{prefix}' has {len(blocks)} blocks")
    kept = blocks[-1] + 1 if all_blocks else blocks[-1]  # blocks converted
    params = [f"{m}.{p}" for m in ("attn.in_proj", *_OPEN_CLIP_MODULES) for p in ("weight", "bias")]
    expected = [f"transformer.resblocks.{i}.{p}" for i in range(blocks[-1] + 1) for p in params]
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", *expected):
        _require(sd, key.replace("in_proj.", "in_proj_"), source=source, prefix=prefix)
    token, fc = sd["token_embedding.weight"], sd["transformer.resblocks.0.mlp.c_fc.weight"]
    config = clip_text_config(
        hidden=token.shape[1],
        layers=kept,
        intermediate=fc.shape[0],
        max_positions=sd["positional_embedding"].shape[0],
        vocab=token.shape[0],
        hidden_act="gelu",
    )
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
        attn = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if key in _OPEN_CLIP_UNUSED or ((block or attn) and int((block or attn)[1]) >= kept):
            continue
        if key == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = value
        elif key in ("ln_final.weight", "ln_final.bias"):
            out["final_layer_norm." + key.split(".")[1]] = value
        elif attn and value.shape[0] % 3 == 0:
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{attn[1]}.self_attn.{name}_proj.{attn[2]}"] = part
        elif attn:
            raise CheckpointError(
                f"{source}: text encoder weight '{prefix}{key}' has shape {tuple(value.shape)}, "
                "expected (3 x width, ...)"
            )
        elif block and block[2] in _OPEN_CLIP_MODULES:
            out[f"encoder.layers.{block[1]}.{_OPEN_CLIP_MODULES[block[2]]}.{block[3]}"] = value
        else:
            raise CheckpointError(
                f"{source}: text encoder weights have unexpected key '{prefix}{key}'"
            )
    return config, out


def open_clip_state_dict(model: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights as OpenCLIP text-tower keys below `prefix` (the inverse of
    the single-file loader's conversion, for writing checkpoints: SDXL's bigG, SD 2.x)."""
    sd = model.state_dict()
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
    }
    for p in ("weight", "bias"):
        out[f"{prefix}ln_final.{p}"] = sd[f"final_layer_norm.{p}"]
    for i in range(model.config.num_hidden_layers):
        hf, block = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            qkv = [sd[f"{hf}self_attn.{n}_proj.{p}"] for n in "qkv"]
            out[f"{block}attn.in_proj_{p}"] = torch.cat(qkv)
            for theirs, ours in _OPEN_CLIP_MODULES.items():
                out[f"{block}{theirs}.{p}"] = sd[f"{hf}{ours}.{p}"]
    return out


def text_encoder_from_ldm(
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefix: str = LDM_PREFIX,
    all_blocks: bool = False,
) -> TextEncoder:
    """Text encoder from a whole single-file checkpoint; only keys below `prefix` are read.

    Layouts (detected from the keys):
    - SD 1.x: `{prefix}transformer.text_model.*` (or `{prefix}transformer.*`), HF CLIPTextModel
      keys; `embeddings.position_ids` (a constant buffer some files carry) is ignored.
    - SD 2.x: `{prefix}model.*`, OpenCLIP keys; converted, last block dropped, pad token '!';
      `text_projection`, `logit_scale` and `attn_mask` are ignored (unused for conditioning);
      `all_blocks` keeps the last block (SDXL's bigG).
    Heads are hidden / 64 (CLIP convention). Any other key below the chosen layout's prefix,
    or a missing or mis-shaped one, raises CheckpointError naming it.
    """
    hf_prefix, oc_prefix = prefix + "transformer.", prefix + "model."
    if any(k.startswith(hf_prefix + "text_model.") for k in state_dict):
        hf_prefix += "text_model."
    layouts = [p for p in (hf_prefix, oc_prefix) if any(k.startswith(p) for k in state_dict)]
    if not layouts:
        raise CheckpointError(
            f"{source}: no text encoder (no keys below '{hf_prefix}' or '{oc_prefix}')"
        )
    layout = layouts[0]
    if stray := [k for k in state_dict if k.startswith(prefix) and not k.startswith(layout)]:
        raise CheckpointError(f"{source}: text encoder weights have unexpected key '{stray[0]}'")
    sub = {k.removeprefix(layout): v for k, v in state_dict.items() if k.startswith(layout)}
    if layout == oc_prefix:
        config, converted = _open_clip_to_hf(
            sub, source=source, prefix=layout, all_blocks=all_blocks
        )
        log.debug("%s: SD 2.x OpenCLIP text encoder %s", source, config.to_diff_dict())
        what = f"text encoder (converted from OpenCLIP keys below '{layout}')"
        return _load(
            config, converted, bundled_tokenizer(), SD2_PAD_ID, what=what, source=source,
            device=device, dtype=dtype,
        )  # fmt: skip
    sub.pop("embeddings.position_ids", None)
    config = _hf_config(sub, source=source, prefix=layout)
    log.debug("%s: SD 1.x CLIP text encoder %s", source, config.to_diff_dict())
    return _load(
        config, sub, bundled_tokenizer(), SD1_PAD_ID, what="text encoder", key_prefix=layout,
        source=source, device=device, dtype=dtype,
    )  # fmt: skip


def text_state_dict_to_ldm(encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """Weights in the SD 1.x single-file layout (`cond_stage_model.transformer.text_model.*`).

    Only SD 1.x-style (quick_gelu) towers have that layout; an SD 2.x tower lost its last
    OpenCLIP block on loading and would reload with the wrong activation, so it is refused.
    """
    if encoder.model.config.hidden_act != "quick_gelu":
        raise ValueError(
            f"only quick_gelu (SD 1.x) text encoders have the SD 1.x layout, not {encoder.model.config.hidden_act}"
        )
    return {SD1_LAYOUT + k: v for k, v in encoder.model.state_dict().items()}
