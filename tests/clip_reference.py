"""An independent reference for CLIP's tokenizer: OpenAI CLIP's simple_tokenizer algorithm.

Why: the bundled tokenizer is `transformers.CLIPTokenizer` over files this project derives
(scripts/make_clip_vocab.py); checking it against a second implementation, written from the
algorithm's description, catches a wrong derivation that a round trip through the same
files would not.
"""

from __future__ import annotations

import functools
import itertools

import regex

from model.text import ASSETS

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on Mars, 4k, trending on ArtStation!!",
    "  don't   stop; it's   1999 -- naïve café, Ωmega, 東京, 🐱🚀  ",
    "",
]


def _byte_chars() -> list[str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(rest)}
    return [table[b] for b in range(256)]


@functools.cache
def reference_vocab() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    merges = (ASSETS / "merges.txt").read_text("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    byte_table = _byte_chars()
    printable_first = [byte_table[b] for b in [*range(33, 127), *range(161, 173), *range(174, 256)]]
    printable_first += [c for c in byte_table if c not in printable_first]
    tokens = printable_first + [c + "</w>" for c in printable_first] + ["".join(p) for p in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, {p: i for i, p in enumerate(pairs)}


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(word) > 1:
        pairs = set(itertools.pairwise(word))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return list(word)


def reference_ids(text: str) -> list[int]:
    vocab, ranks = reference_vocab()
    byte_table = _byte_chars()
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    text = regex.sub(r"\s+", " ", text).strip().lower()
    ids = [vocab["<|startoftext|>"]]
    for piece in regex.findall(pattern, text, regex.IGNORECASE):
        chars = [byte_table[b] for b in piece.encode("utf-8")]
        ids += [vocab[t] for t in _bpe((*chars[:-1], chars[-1] + "</w>"), ranks)]
    return [*ids, vocab["<|endoftext|>"]]
