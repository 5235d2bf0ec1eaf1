"""LRU cache of text embeddings, so repeated prompts and the empty negative prompt cost nothing.

One cache belongs to one engine, which serves one model: the model is part of the key by
construction. A key is the (prompt, second prompt) pair: SDXL's second text encoder reads the
second one; models with one encoder are given the first twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from model.conditioning import Conditioning
from model.pipeline import Pipeline

PromptPair = tuple[str, str]


class PromptCache:
    """(prompt, prompt_2) -> one row of text conditioning on the pipeline's device, least
    recently used evicted."""

    def __init__(self, pipeline: Pipeline, capacity: int = 512) -> None:
        self.pipeline = pipeline
        self.capacity = capacity
        self._entries: OrderedDict[PromptPair, Conditioning] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_many(self, prompts: Sequence[PromptPair]) -> list[Conditioning]:
        """Embeddings for `prompts`, encoding every uncached one in a single batch."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._entries))
        if missing:
            encoded = self.pipeline.encode_prompts([a for a, _ in missing], [b for _, b in missing])
            for pair, emb in zip(missing, encoded.split(), strict=True):
                self._entries[pair] = emb
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        out = []
        for pair in prompts:
            self._entries.move_to_end(pair)
            out.append(self._entries[pair])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._entries)
