"""LRU cache of text embeddings, so repeated prompts and the empty negative prompt cost nothing.

One cache belongs to one engine, which serves one model: the model is part of the key by
construction. The text-encoder part of a job's LoRA adapters (file version and multiplier)
is part of the key, since it changes the embedding.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from model.lora_layers import AdapterSet
from model.lora_library import text_signature
from model.pipeline import Pipeline

Key = tuple[str, tuple[tuple[str, float], ...]]  # prompt, text-encoder adapters


class PromptCache:
    """(prompt, adapters) -> (1, 77, D) embedding on the pipeline's device, LRU evicted."""

    def __init__(self, pipeline: Pipeline, capacity: int = 512) -> None:
        self.pipeline = pipeline
        self.capacity = capacity
        self._entries: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_many(
        self, prompts: Sequence[str], adapters: Sequence[AdapterSet] | None = None
    ) -> list[torch.Tensor]:
        """Embeddings for `prompts` (each with its job's adapters), encoding every uncached one
        in a single batch, each row with its own text-encoder adapters."""
        sets = list(adapters) if adapters is not None else [()] * len(prompts)
        keys = [(p, text_signature(a)) for p, a in zip(prompts, sets, strict=True)]
        todo = {k: a for k, a in zip(keys, sets, strict=True) if k not in self._entries}
        if todo:
            encoded = self.pipeline.encode_prompts(
                [k[0] for k in todo], [a for k, a in todo.items()]
            )  # (M, 77, D)
            for key, emb in zip(todo, encoded.split(1), strict=True):
                self._entries[key] = emb
        self.misses += len(todo)
        self.hits += len(prompts) - len(todo)
        out = []
        for key in keys:
            self._entries.move_to_end(key)
            out.append(self._entries[key])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._entries)
