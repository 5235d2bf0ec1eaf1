"""Long and weighted prompts through any CLIP-style text encoder (AUTOMATIC1111's convention).

A CLIP tower reads 77 positions, so a prompt is cut into chunks of 75 tokens, each framed
by BOS ... EOS and padded, encoded separately, and the hidden states concatenated along the
sequence: a prompt of k chunks conditions the UNet on (1, 77·k, D). `BREAK` ends a chunk
early. Weights (`model.prompt_syntax`) scale each token's hidden state after the encoder,
then each chunk is rescaled so its mean equals the unweighted mean (A1111's "original"
emphasis), per prompt. A prompt without weights and of at most 75 tokens is one chunk with
exactly the ids the plain tokenizer gives, so its embedding is unchanged.

Prompts of different chunk counts that must share a UNet call (CFG's conditional and
unconditional rows) are padded with chunks of the empty prompt's embedding (`pad_to_longest`).

Encoder-agnostic: anything with the `ChunkEncoder` methods works (each of SDXL's two towers
too); `pooled` carries the first chunk's pooled output when the encoder gives one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from model.prompt_syntax import parse_prompt

CHUNK_TOKENS = 75  # tokens per chunk between BOS and EOS
CHUNK_LENGTH = CHUNK_TOKENS + 2  # positions per chunk (CLIP's 77)


class ChunkEncoder(Protocol):
    """What chunked encoding needs from a text encoder."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_token_id(self) -> int: ...

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text: no BOS/EOS, never truncated."""
        ...

    def encode_ids(self, ids: Tensor, *, clip_skip: int = 1) -> tuple[Tensor, Tensor | None]:
        """(N, 77) ids -> hidden states (N, 77, D) of the chosen layer, pooled (N, P) or None."""
        ...


@dataclass(frozen=True)
class TokenChunks:
    """One prompt as encoder input: k chunks of ids and each token's weight."""

    ids: Tensor  # (k, 77) long
    weights: Tensor  # (k, 77) float32; 1 at BOS, EOS and padding

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())


@dataclass(frozen=True)
class PromptEmbedding:
    """One prompt's conditioning: hidden states of all chunks, pooled output of the first."""

    hidden: Tensor  # (1, 77·k, D)
    pooled: Tensor | None = None  # (1, P) of chunk 0, unweighted (as A1111), if the encoder has one

    @property
    def chunks(self) -> int:
        return int(self.hidden.shape[1]) // CHUNK_LENGTH


def chunk_prompt(encoder: ChunkEncoder, prompt: str) -> TokenChunks:
    """Parse, tokenize and cut a prompt into 75-token chunks framed by BOS/EOS.

    Every BREAK-separated part starts a new chunk; an empty part gives an all-padding chunk,
    except at the end of a prompt that already has chunks (A1111's rule). Nothing is cut off.
    """
    parts = parse_prompt(prompt)
    texts = [span.text for part in parts for span in part]
    tokenized = iter(encoder.token_ids(texts) if texts else [])
    rows: list[tuple[list[int], list[float]]] = []
    for n, part in enumerate(parts):
        ids: list[int] = []
        weights: list[float] = []
        for span in part:
            tokens = next(tokenized)
            ids += tokens
            weights += [span.weight] * len(tokens)
        if not ids:
            if n < len(parts) - 1 or not rows:
                rows.append(([], []))
            continue
        for start in range(0, len(ids), CHUNK_TOKENS):
            rows.append((ids[start : start + CHUNK_TOKENS], weights[start : start + CHUNK_TOKENS]))
    framed_ids, framed_weights = [], []
    for ids, weights in rows:
        fill = CHUNK_TOKENS - len(ids)
        framed_ids.append([encoder.bos_id, *ids, encoder.eos_id] + [encoder.pad_token_id] * fill)
        framed_weights.append([1.0, *weights, 1.0] + [1.0] * fill)
    return TokenChunks(
        torch.tensor(framed_ids, dtype=torch.long),
        torch.tensor(framed_weights, dtype=torch.float32),
    )


MEAN_TOLERANCE = 1e-6  # a chunk mean below this share of its mean |value| is float noise: zero


def apply_weights(hidden: Tensor, weights: Tensor) -> Tensor:
    """(k, 77, D) hidden states scaled per token, each chunk rescaled to its unweighted mean.

    The rescale (A1111's) divides by the weighted mean; where either mean is numerically
    zero (an encoder whose final layer norm is the identity, e.g. the demo model's) it is
    undefined and skipped, so weights never turn into NaN or inf. Computed in float32,
    returned in the input's dtype.
    """
    h = hidden.float()
    w = weights.to(h.device)[:, :, None]  # (k, 77, 1)
    scaled = h * w
    before = h.mean(dim=(1, 2), keepdim=True)  # (k, 1, 1)
    after = scaled.mean(dim=(1, 2), keepdim=True)
    size = scaled.abs().mean(dim=(1, 2), keepdim=True) * MEAN_TOLERANCE
    defined = (before.abs() > size) & (after.abs() > size)
    factor = torch.where(defined, before / torch.where(defined, after, 1.0), 1.0)
    return (scaled * factor).to(hidden.dtype)


@torch.inference_mode()
def encode_chunks(
    encoder: ChunkEncoder, prompts: Sequence[TokenChunks], *, clip_skip: int = 1
) -> list[PromptEmbedding]:
    """Encode the chunks of several prompts in one encoder call; weights applied per chunk."""
    if not prompts:
        return []
    ids = torch.cat([p.ids for p in prompts])  # (sum k, 77)
    hidden, pooled = encoder.encode_ids(ids, clip_skip=clip_skip)  # (sum k, 77, D)
    out, start = [], 0
    for p in prompts:
        h = hidden[start : start + p.count]
        if p.weighted:
            h = apply_weights(h, p.weights)
        first = None if pooled is None else pooled[start : start + 1]
        out.append(PromptEmbedding(h.reshape(1, -1, h.shape[-1]), first))
        start += p.count
    return out


def encode_prompts(
    encoder: ChunkEncoder, prompts: Sequence[str], *, clip_skip: int = 1
) -> list[PromptEmbedding]:
    """Each prompt's embedding (1, 77·k, D), not padded; one encoder call for all chunks."""
    return encode_chunks(encoder, [chunk_prompt(encoder, p) for p in prompts], clip_skip=clip_skip)


def pad_to_chunks(hidden: Tensor, chunks: int, empty: Tensor) -> Tensor:
    """(1, 77·k, D) extended to `chunks` chunks with the empty prompt's (1, 77, D) embedding."""
    have = hidden.shape[1] // CHUNK_LENGTH
    if have >= chunks:
        return hidden
    filler = empty.to(hidden.device, hidden.dtype).expand(1, -1, -1)
    return torch.cat([hidden, *([filler] * (chunks - have))], dim=1)


def pad_to_longest(hiddens: Sequence[Tensor], empty: Tensor) -> list[Tensor]:
    """Every (1, 77·k_i, D) padded with empty-prompt chunks to the longest of them."""
    longest = max(h.shape[1] // CHUNK_LENGTH for h in hiddens)
    return [pad_to_chunks(h, longest, empty) for h in hiddens]


def encode_prompt_pair(
    encoder: ChunkEncoder, prompt: str, negative: str, *, clip_skip: int = 1
) -> tuple[PromptEmbedding, PromptEmbedding]:
    """CFG's (conditional, unconditional) embeddings, padded to one length in one call.

    The empty prompt is encoded in the same call when padding is needed.
    """
    chunks = [chunk_prompt(encoder, prompt), chunk_prompt(encoder, negative)]
    if chunks[0].count != chunks[1].count:
        chunks.append(chunk_prompt(encoder, ""))
    embs = encode_chunks(encoder, chunks, clip_skip=clip_skip)
    if len(embs) == 2:
        return embs[0], embs[1]
    cond, uncond = pad_to_longest([embs[0].hidden, embs[1].hidden], embs[2].hidden)
    return PromptEmbedding(cond, embs[0].pooled), PromptEmbedding(uncond, embs[1].pooled)
