"""LRU cache of text embeddings, so repeated prompts and the empty negative prompt cost nothing.

One cache belongs to one engine, which serves one model: the model is part of the key by
construction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from model.pipeline import Pipeline


class PromptCache:
    """prompt -> (1, 77, D) embedding on the pipeline's device, least recently used evicted."""

    def __init__(self, pipeline: Pipeline, capacity: int = 512) -> None:
        self.pipeline = pipeline
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_many(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Embeddings for `prompts`, encoding every uncached one in a single batch."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._entries))
        if missing:
            encoded = self.pipeline.encode_prompts(missing)  # (M, 77, D)
            for prompt, emb in zip(missing, encoded.split(1), strict=True):
                self._entries[prompt] = emb
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        out = []
        for prompt in prompts:
            self._entries.move_to_end(prompt)
            out.append(self._entries[prompt])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._entries)
