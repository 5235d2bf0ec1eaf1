"""LRU cache of text embeddings, so repeated prompts and the empty negative prompt cost nothing.

One cache belongs to one engine, which serves one model: the model is part of the key by
construction. The key is everything else that changes an embedding: the prompt text (its
weights and BREAKs are part of it), the clip_skip it is encoded with (None and 1 are the
same layer, so they share entries), the second prompt SDXL's second text encoder reads
(models with one encoder get the first twice, so it changes nothing for them) and the
text-encoder part of the job's LoRA adapters (file version and multiplier).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from model.conditioning import Conditioning
from model.lora_layers import AdapterSet
from model.lora_library import text_signature
from model.pipeline import Pipeline

PromptKey = tuple[str, int, str]  # (prompt, clip_skip, prompt_2)
CacheKey = tuple[str, int, str, tuple[tuple[str, float], ...]]  # + text-encoder adapters


def prompt_key(prompt: str, clip_skip: int | None = None, prompt_2: str | None = None) -> PromptKey:
    """The cache key of a prompt encoded at `clip_skip` (None = the model's default, 1), with
    SDXL's second prompt (None = the first, as diffusers)."""
    return (prompt, clip_skip or 1, prompt if prompt_2 is None else prompt_2)


class PromptCache:
    """key -> one row of text conditioning (context (1, 77·k, D), SDXL's pooled vector) on the
    pipeline's device, least recently used evicted."""

    def __init__(self, pipeline: Pipeline, capacity: int = 512) -> None:
        self.pipeline = pipeline
        self.capacity = capacity
        self._entries: OrderedDict[CacheKey, Conditioning] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_many(
        self, keys: Sequence[PromptKey], adapters: Sequence[AdapterSet] | None = None
    ) -> list[Conditioning]:
        """Embeddings for `keys` (each with its job's adapters), encoding the uncached ones in
        one batch per clip_skip, each prompt with its own text-encoder adapters."""
        sets = list(adapters) if adapters is not None else [()] * len(keys)
        full = [(*k, text_signature(a)) for k, a in zip(keys, sets, strict=True)]
        todo = {k: a for k, a in zip(full, sets, strict=True) if k not in self._entries}
        for skip in dict.fromkeys(k[1] for k in todo):
            group = [k for k in todo if k[1] == skip]
            encoded = self.pipeline.embed_prompts(
                [k[0] for k in group], skip, [k[2] for k in group], [todo[k] for k in group]
            )
            for key, emb in zip(group, encoded, strict=True):
                self._entries[key] = emb
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        out = []
        for key in full:
            self._entries.move_to_end(key)
            out.append(self._entries[key])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._entries)
