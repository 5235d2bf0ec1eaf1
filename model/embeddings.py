"""Textual-inversion embeddings: new words whose token vectors come from files.

A file `<name>.<ext>` in the embeddings directory adds the word `name` (and, for an n-vector
embedding, `name_1` ... `name_{n-1}`, which a prompt's `name` expands to) to the tokenizer and
its vectors as new rows of the text encoder's token embedding, as diffusers'
`load_textual_inversion` does; any prompt that uses the word gets it. Formats:
AUTOMATIC1111 `.pt` (`string_to_param["*"]`, read by `torch.load(weights_only=True)` only)
and `.safetensors` (`emb_params`), diffusers `learned_embeds` (one `{token: vectors}` entry,
`.safetensors` or `.bin`). SDXL: AUTOMATIC1111's `.safetensors` with `clip_l` (n, 768) and
`clip_g` (n, 1280) vectors, one set per tower under the same words, as diffusers'
`load_textual_inversion` called once per text encoder and tokenizer (the refiner, bigG only,
reads `clip_g`). A file that cannot be used is logged and left out, naming the file and key;
the other embeddings load.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from model.text import TextEncoder
from model.text_sdxl import SDXLTextEncoder

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")  # A1111's SDXL files: ViT-L's vectors, bigG's


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; the message names the file and key."""


def _load(path: Path) -> dict[str, object]:
    try:
        if path.suffix == ".safetensors":
            data: object = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise EmbeddingError(f"{path}: unreadable embedding file ({exc})") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data


def _vectors(path: Path, key: str, value: object, width: int) -> Tensor:
    """(n, width) float32 vectors of one key, or EmbeddingError naming it."""
    if not isinstance(value, Tensor):
        raise EmbeddingError(f"{path}: key '{key}' is not a tensor")
    vectors = value[None] if value.ndim == 1 else value
    if vectors.ndim != 2 or vectors.shape[1] != width or vectors.shape[0] == 0:
        raise EmbeddingError(
            f"{path}: key '{key}' has shape {tuple(value.shape)}; this text encoder takes "
            f"(n, {width}) vectors"
        )
    return vectors.float()


def read_embedding(path: Path, width: int) -> Tensor:
    """The file's vectors (n, width), float32, for a model with one text encoder."""
    data = _load(path)
    if "string_to_param" in data:  # AUTOMATIC1111 .pt
        table = data["string_to_param"]
        key, value = "string_to_param.*", table.get("*") if isinstance(table, dict) else None
    elif "emb_params" in data:  # AUTOMATIC1111 .safetensors
        key, value = "emb_params", data["emb_params"]
    elif any(k in data for k in SDXL_KEYS):
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_l / clip_g); this model is not SDXL")
    elif len(data) == 1:  # diffusers learned_embeds: {token: vectors}
        key, value = next(iter(data.items()))
    else:
        keys = ", ".join(sorted(map(str, data))[:4])
        raise EmbeddingError(f"{path}: no embedding in keys {keys}")
    return _vectors(path, key, value, width)


def read_sdxl_embedding(path: Path, widths: dict[str, int]) -> dict[str, Tensor]:
    """An SDXL file's vectors per key of `widths` (`clip_l` and/or `clip_g`: the towers the
    model has), all with the same number of vectors."""
    data = _load(path)
    if missing := [k for k in widths if k not in data]:
        have = ", ".join(sorted(map(str, data))[:4])
        raise EmbeddingError(
            f"{path}: an SDXL model needs {' and '.join(widths)} vectors; the file has no "
            f"'{missing[0]}' (keys: {have})"
        )
    out = {k: _vectors(path, k, data[k], w) for k, w in widths.items()}
    if len({v.shape[0] for v in out.values()}) > 1:
        counts = ", ".join(f"{k}: {v.shape[0]}" for k, v in out.items())
        raise EmbeddingError(f"{path}: keys {counts} vectors; the towers need the same number")
    return out


def _towers(text: TextEncoder | SDXLTextEncoder) -> dict[str, TextEncoder]:
    """File key -> the tower its vectors go to ("" for a one-encoder model)."""
    if not isinstance(text, SDXLTextEncoder):
        return {"": text}
    return {**({"clip_l": text.first} if text.first is not None else {}), "clip_g": text.second}


def _read_for(path: Path, towers: dict[str, TextEncoder]) -> dict[str, Tensor]:
    if "" in towers:
        return {"": read_embedding(path, towers[""].hidden_size)}
    return read_sdxl_embedding(path, {k: t.hidden_size for k, t in towers.items()})


def word_tokens(name: str, n: int) -> list[str]:
    """The tokens of an n-vector embedding named `name`, in order."""
    return [name] + [f"{name}_{i}" for i in range(1, n)]


def install_embeddings(text: TextEncoder | SDXLTextEncoder, directory: Path) -> dict[str, int]:
    """Add every usable embedding in `directory` (to each SDXL tower its own vectors);
    {name: number of vectors}."""
    towers = _towers(text)
    files = sorted(p for p in directory.iterdir() if p.suffix in SUFFIXES and p.is_file())
    added: dict[str, tuple[list[str], dict[str, Tensor]]] = {}
    vocabs = [t.tokenizer.get_vocab() for t in towers.values()]
    for path in files:
        try:
            vectors = _read_for(path, towers)
        except EmbeddingError as exc:
            log.error("embedding left out: %s", exc)
            continue
        tokens = word_tokens(path.stem, next(iter(vectors.values())).shape[0])
        if taken := [t for t in tokens if t in added or any(t in v for v in vocabs)]:
            log.error("embedding left out: %s: the word %r is taken", path, taken[0])
            continue
        added[path.stem] = (tokens, vectors)
    if not added:
        return {}
    tokens = [t for words, _ in added.values() for t in words]
    for key, tower in towers.items():
        tower.tokenizer.add_tokens(tokens)
        tower.model.resize_token_embeddings(len(tower.tokenizer))
        table = tower.model.get_input_embeddings().weight
        with torch.no_grad():
            for words, vectors in added.values():
                ids = tower.tokenizer.convert_tokens_to_ids(words)
                table[ids] = vectors[key].to(table.device, table.dtype)
    log.info("embeddings: %s", ", ".join(f"{n} ({len(w)})" for n, (w, _) in added.items()))
    return {name: len(words) for name, (words, _) in added.items()}


def expand_prompt(prompt: str, counts: dict[str, int], text: TextEncoder) -> str:
    """Each multi-vector embedding's word in the prompt followed by its further tokens."""
    present = set(text.tokenizer.tokenize(prompt))
    for name, n in counts.items():
        if n > 1 and name in present:
            prompt = prompt.replace(name, " ".join(word_tokens(name, n)))
    return prompt
