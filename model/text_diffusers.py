"""Text encoders from diffusers / transformers folders: text_encoder/ weights + tokenizer/.

Kept apart from model/text.py (the encoder and the single-file layouts) so each file has one
job; the folder's own tokenizer is used when it has one, the bundled vocabulary otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTokenizer

from model.text import TextEncoder, _load, _pad_for, bundled_tokenizer
from model.weights import CheckpointError

log = logging.getLogger(__name__)


_WEIGHT_FILES = (  # diffusers/transformers names, single-file then sharded
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_FP16_FILES = (
    "model.fp16.safetensors",
    "model.safetensors.index.fp16.json",
    "pytorch_model.fp16.bin",
    "pytorch_model.bin.index.fp16.json",
)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file (or of every shard an index.json names), on the CPU."""
    if path.suffix == ".json":
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        merged: dict[str, torch.Tensor] = {}
        for shard in shards:
            merged.update(_read_weights(path.parent / shard))
        return merged
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _find_weights(folder: Path, dtype: torch.dtype) -> Path:
    """Full-precision weights first; fp16 variants first when fp16 is what we will run."""
    order = _FP16_FILES + _WEIGHT_FILES if dtype == torch.float16 else _WEIGHT_FILES + _FP16_FILES
    for name in order:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no text encoder weights (looked for {', '.join(order)})")


def text_encoder_from_diffusers(
    folder: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    encoder: str = "text_encoder",
    tokenizer: str = "tokenizer",
) -> TextEncoder:
    """Text encoder from a diffusers folder: text_encoder/{config.json, weights} + tokenizer/.

    The folder's own tokenizer (tokenizer.json, or vocab.json + merges.txt with the hub's
    special_tokens_map.json / tokenizer_config.json) is used when present; otherwise the
    bundled vocabulary, padding as the config's family does (gelu: SD 2.x '!', else 49407).
    `encoder` / `tokenizer` name other subfolders (SDXL's text_encoder_2/, tokenizer_2/).
    """
    text, _ = text_encoder_with_projection(
        folder, device=device, dtype=dtype, encoder=encoder, tokenizer=tokenizer, projection=False
    )
    return text


def text_encoder_with_projection(
    folder: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    encoder: str = "text_encoder",
    tokenizer: str = "tokenizer",
    projection: bool = True,
) -> tuple[TextEncoder, torch.Tensor | None]:
    """As text_encoder_from_diffusers, plus a CLIPTextModelWithProjection's `text_projection`
    weight (projection_dim, hidden) when `projection` (SDXL's pooled vector)."""
    folder = Path(folder)
    te = folder / encoder
    if not (te / "config.json").is_file():
        raise CheckpointError(f"{folder}: missing {encoder}/config.json")
    config = CLIPTextConfig.from_json_file(str(te / "config.json"))
    path = _find_weights(te, dtype)
    weights = {k.removeprefix("text_model."): v for k, v in _read_weights(path).items()}
    weights.pop("embeddings.position_ids", None)
    proj = None
    if projection:
        key = "text_projection.weight"
        if key not in weights:
            raise CheckpointError(f"{path}: text encoder weights are missing key '{key}'")
        proj = weights.pop(key)
    tok_dir = folder / tokenizer
    if (tok_dir / "tokenizer.json").is_file() or (
        (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file()
    ):
        tok, pad_id = _folder_tokenizer(tok_dir)
    else:
        log.info("%s: no %s/ folder, using the bundled CLIP vocabulary", folder, tokenizer)
        tok, pad_id = bundled_tokenizer(), _pad_for(config)
    what, source = "text encoder", str(path)
    text = _load(config, weights, tok, pad_id, what=what, source=source, device=device, dtype=dtype)
    return text, proj


def _folder_tokenizer(tok_dir: Path) -> tuple[CLIPTokenizer, int]:
    """(tokenizer padding with <|endoftext|>, the folder's declared pad id); see TextEncoder."""
    declared = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    if declared.pad_token_id in (None, declared.eos_token_id):
        return declared, int(declared.eos_token_id)
    plain = CLIPTokenizer.from_pretrained(
        str(tok_dir), local_files_only=True, pad_token=declared.eos_token
    )
    return plain, int(declared.pad_token_id)
