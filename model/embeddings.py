"""Textual-inversion embeddings: new words whose token vectors come from files.

A file `<name>.<ext>` in the embeddings directory adds the word `name` (and, for an n-vector
embedding, `name_1` ... `name_{n-1}`, which a prompt's `name` expands to) to the tokenizer and
its vectors as new rows of the text encoder's token embedding, as diffusers'
`load_textual_inversion` does; any prompt that uses the word gets it. Formats:
AUTOMATIC1111 `.pt` (`string_to_param["*"]`, read by `torch.load(weights_only=True)` only)
and `.safetensors` (`emb_params`), diffusers `learned_embeds` (one `{token: vectors}` entry,
`.safetensors` or `.bin`). A file that cannot be used is logged and left out, naming the file
and key; the other embeddings load.
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

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".bin", ".safetensors")


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; the message names the file and key."""


def read_embedding(path: Path, width: int) -> Tensor:
    """The file's vectors (n, width), float32."""
    try:
        if path.suffix == ".safetensors":
            data: object = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise EmbeddingError(f"{path}: unreadable embedding file ({exc})") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    if "string_to_param" in data:  # AUTOMATIC1111 .pt
        table = data["string_to_param"]
        key, value = "string_to_param.*", table.get("*") if isinstance(table, dict) else None
    elif "emb_params" in data:  # AUTOMATIC1111 .safetensors
        key, value = "emb_params", data["emb_params"]
    elif len(data) == 1:  # diffusers learned_embeds: {token: vectors}
        key, value = next(iter(data.items()))
    else:
        keys = ", ".join(sorted(map(str, data))[:4])
        raise EmbeddingError(f"{path}: no embedding in keys {keys} (SDXL clip_l/clip_g: not yet)")
    if not isinstance(value, Tensor):
        raise EmbeddingError(f"{path}: key '{key}' is not a tensor")
    vectors = value[None] if value.ndim == 1 else value
    if vectors.ndim != 2 or vectors.shape[1] != width or vectors.shape[0] == 0:
        raise EmbeddingError(
            f"{path}: key '{key}' has shape {tuple(value.shape)}; this text encoder takes "
            f"(n, {width}) vectors"
        )
    return vectors.float()


def word_tokens(name: str, n: int) -> list[str]:
    """The tokens of an n-vector embedding named `name`, in order."""
    return [name] + [f"{name}_{i}" for i in range(1, n)]


def install_embeddings(text: TextEncoder, directory: Path) -> dict[str, int]:
    """Add every usable embedding in `directory`; {name: number of vectors}."""
    files = sorted(p for p in directory.iterdir() if p.suffix in SUFFIXES and p.is_file())
    added: dict[str, tuple[list[str], Tensor]] = {}
    vocab = text.tokenizer.get_vocab()
    for path in files:
        try:
            vectors = read_embedding(path, text.hidden_size)
        except EmbeddingError as exc:
            log.error("embedding left out: %s", exc)
            continue
        tokens = word_tokens(path.stem, vectors.shape[0])
        if taken := [t for t in tokens if t in vocab or t in added]:
            log.error("embedding left out: %s: the word %r is taken", path, taken[0])
            continue
        added[path.stem] = (tokens, vectors)
    if not added:
        return {}
    tokens = [t for words, _ in added.values() for t in words]
    text.tokenizer.add_tokens(tokens)
    text.model.resize_token_embeddings(len(text.tokenizer))
    table = text.model.get_input_embeddings().weight
    with torch.no_grad():
        for words, vectors in added.values():
            ids = text.tokenizer.convert_tokens_to_ids(words)
            table[ids] = vectors.to(table.device, table.dtype)
    log.info("embeddings: %s", ", ".join(f"{n} ({len(w)})" for n, (w, _) in added.items()))
    return {name: len(words) for name, (words, _) in added.items()}


def expand_prompt(prompt: str, counts: dict[str, int], text: TextEncoder) -> str:
    """Each multi-vector embedding's word in the prompt followed by its further tokens."""
    present = set(text.tokenizer.tokenize(prompt))
    for name, n in counts.items():
        if n > 1 and name in present:
            prompt = prompt.replace(name, " ".join(word_tokens(name, n)))
    return prompt
