"""AUTOMATIC1111's prompt syntax: emphasis weights, `BREAK` and backslash escapes.

Users write prompts for AUTOMATIC1111 (A1111) and expect the same reading everywhere:

- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1 (multiplies by
  1 / 1.1), `(text:1.4)` multiplies it by 1.4; brackets nest and multiply, innermost first.
- A bracket left open applies to the end of the prompt; a closing bracket with nothing open
  is literal text. `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters; a backslash
  before any other character is dropped (as A1111 does).
- `BREAK` (upper case, a whole word) ends the current 75-token chunk. Unlike A1111, where a
  `BREAK` inside brackets turns into the literal word with a negative weight, it breaks there
  too.
- Adjacent runs of equal weight are merged before tokenization, as A1111 merges them, so
  `(a)(b)` is tokenized as `ab`.

Prompt editing (`[a:b:0.5]`) and alternation (`[a|b]`) are not parsed: they read as
emphasis brackets and text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND = 1.1  # ( ... )
SQUARE = 1 / 1.1  # [ ... ]
ESCAPABLE = "()[]\\"
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")  # ":1.4)" closing a round bracket
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Span:
    """A run of prompt text and the weight its tokens get."""

    text: str
    weight: float


class _Break:
    """Marks a BREAK among the parsed runs (never weighted)."""


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_prompt(prompt: str) -> list[list[Span]]:
    """A prompt as its BREAK-separated parts, each a list of weighted text runs.

    Weights are multiplied in the order brackets close (innermost first; brackets left open
    at the end: round ones, then square ones, outermost first), which is A1111's order, so
    equal weights compare equal exactly when A1111's do.
    """
    items: list[list[float | str] | _Break] = []  # [text, weight] or a break
    rounds: list[int] = []  # index in items where each open "(" starts
    squares: list[int] = []
    text: list[str] = []

    def flush() -> None:
        if not text:
            return
        pieces = _BREAK.split("".join(text))
        for i, piece in enumerate(pieces):
            if i:
                items.append(_Break())
            items.append([piece, 1.0])
        text.clear()

    def scale(start: int, factor: float) -> None:
        for item in items[start:]:
            if not isinstance(item, _Break):
                item[1] = float(item[1]) * factor

    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\":
            if i + 1 < len(prompt) and prompt[i + 1] in ESCAPABLE:
                text.append(prompt[i + 1])
                i += 2
            else:
                i += 1
            continue
        weight = _WEIGHT.match(prompt, i) if c == ":" and rounds else None
        factor = _number(weight[1]) if weight else None
        if c in "([":
            flush()
            (rounds if c == "(" else squares).append(len(items))
        elif factor is not None and weight is not None:
            flush()
            scale(rounds.pop(), factor)
            i = weight.end()
            continue
        elif c == ")" and rounds:
            flush()
            scale(rounds.pop(), ROUND)
        elif c == "]" and squares:
            flush()
            scale(squares.pop(), SQUARE)
        else:
            text.append(c)
        i += 1
    flush()
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    return _parts(items)


def _parts(items: list[list[float | str] | _Break]) -> list[list[Span]]:
    """Split at breaks, drop empty runs, merge neighbours of equal weight."""
    parts: list[list[Span]] = [[]]
    for item in items:
        if isinstance(item, _Break):
            parts.append([])
            continue
        run, weight = str(item[0]), float(item[1])
        part = parts[-1]
        if not run:
            continue
        if part and part[-1].weight == weight:
            part[-1] = Span(part[-1].text + run, weight)
        else:
            part.append(Span(run, weight))
    return parts


def has_weights(parts: list[list[Span]]) -> bool:
    """Whether any run is weighted other than 1 (unweighted prompts skip the rescale)."""
    return any(span.weight != 1.0 for part in parts for span in part)
