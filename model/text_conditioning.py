"""Prompts to the UNet's text conditioning rows, for any model family a Pipeline holds.

A1111's 75-token chunks and weights (model.prompt_encoding) for CLIP towers, both towers for
SDXL (model.text_sdxl), textual-inversion words expanded (model.embeddings), each prompt's
LoRA adapters applied to the text encoder while it is encoded; a text-free model (an
unconditional or super-resolution LDM) gets an empty context. Rows that share a UNet call
must hold one context length, so `encode` and `pad_texts` pad shorter prompts with the empty
prompt's chunks, as `generate()` and the engine both do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from model import prompt_encoding
from model.conditioning import Conditioning
from model.embeddings import expand_prompt
from model.lora_layers import AdapterSet
from model.text_sdxl import SDXLTextEncoder

if TYPE_CHECKING:
    from model.pipeline import Pipeline


def pad_texts(texts: Sequence[Conditioning], empty: Conditioning) -> list[Conditioning]:
    """Text conditionings whose contexts are padded with the empty prompt's chunks to the
    longest (rows that share a UNet call hold one context length); pooled vectors stay."""
    padded = prompt_encoding.pad_to_longest([t.crossattn for t in texts], empty.crossattn)
    return [replace(t, crossattn=h) for t, h in zip(texts, padded, strict=True)]


def embed(
    pipe: Pipeline,
    prompts: Sequence[str],
    clip_skip: int | None = None,
    prompts_2: Sequence[str] | None = None,
    adapters: Sequence[AdapterSet] | None = None,
) -> list[Conditioning]:
    """Each prompt's text conditioning (one row: context (1, 77·k, D) in the UNet's dtype,
    and SDXL's pooled vector), not padded; one encoder call per adapter set (`adapters`: each
    prompt's LoRAs, their text-encoder parts applied). SDXL's second encoder reads
    `prompts_2` (default: `prompts`). A text-free model gets a (1, 0, 0) context."""
    skip = clip_skip or 1
    if pipe.text is None:
        empty = torch.zeros((1, 0, 0), device=pipe.device, dtype=pipe.dtype)
        return [Conditioning(empty) for _ in prompts]
    sdxl = isinstance(pipe.text, SDXLTextEncoder)
    second = list(prompts if prompts_2 is None else prompts_2)
    if pipe.embeddings:  # both SDXL towers hold the same words
        tower = pipe.text.second if sdxl else pipe.text  # type: ignore[union-attr]
        prompts, second = ([expand_prompt(p, pipe.embeddings, tower) for p in ps]  # type: ignore[arg-type]
                           for ps in (prompts, second))  # fmt: skip
    sets = list(adapters) if adapters else [()] * len(prompts)
    out: list[Conditioning | None] = [None] * len(prompts)
    for adapter_set in dict.fromkeys(sets):  # prompts sharing adapters encode together
        idx = [i for i, a in enumerate(sets) if a == adapter_set]
        mine = [prompts[i] for i in idx]
        scope = pipe.loras.text_applied(adapter_set) if adapter_set else contextlib.nullcontext()
        with scope:
            if sdxl:
                pairs = pipe.text.embed(mine, [second[i] for i in idx], clip_skip=skip)  # type: ignore[union-attr]
            else:
                embs = prompt_encoding.encode_prompts(pipe.text, mine, clip_skip=skip)  # type: ignore[arg-type]
                pairs = [(e.hidden, None) for e in embs]
        for i, (h, pooled) in zip(idx, pairs, strict=True):
            out[i] = Conditioning(h, pooled=pooled).to(pipe.device, pipe.dtype)
    return out  # type: ignore[return-value]


def encode(
    pipe: Pipeline,
    prompts: Sequence[str],
    clip_skip: int | None = None,
    prompts_2: Sequence[str] | None = None,
    adapters: Sequence[AdapterSet] | None = None,
) -> Conditioning:
    """The text part of N rows' conditioning, shorter prompts padded with empty-prompt
    chunks to the longest (so CFG's rows batch); a (N, 0, 0) context without text."""
    if pipe.text is None:
        empty = torch.zeros((len(prompts), 0, 0), device=pipe.device, dtype=pipe.dtype)
        return Conditioning(empty)
    sets = list(adapters) if adapters else [()] * len(prompts)
    pad_set = sets[0] if sets and all(a == sets[0] for a in sets) else ()  # a job's own
    second = None if prompts_2 is None else [*prompts_2, ""]
    *embs, empty = embed(pipe, [*prompts, ""], clip_skip, second, [*sets, pad_set])
    return Conditioning.cat(pad_texts(embs, empty))


def unconditional(
    pipe: Pipeline, negative_prompt: str, cond: Conditioning, encoded: Conditioning
) -> Conditioning:
    """CFG's unconditional text: the encoded negative prompt (padded as `cond`), or zeros
    shaped like `cond` where the model asks for them for an empty one (SDXL's
    force_zeros_for_empty_prompt)."""
    if pipe.zero_empty_negative and negative_prompt == "":
        return Conditioning(
            torch.zeros_like(cond.crossattn),
            pooled=None if cond.pooled is None else torch.zeros_like(cond.pooled),
        )
    return encoded
