"""An independent reference for AUTOMATIC1111's prompt handling, written from its description
(the wiki's "Attention/emphasis" and "Infinite prompt length" sections, and the behaviour
its prompt parser documents), not from model/prompt_syntax.py or model/prompt_encoding.py.

- Emphasis: `(x)` ×1.1, `[x]` ×(1/1.1), `(x:w)` ×w; the multiplier of a bracket is applied
  to everything inside it when it closes; brackets still open at the end apply to the end
  (round ones first, then square ones); a closer with nothing open is text; `\\(` etc. are
  literal; runs of equal weight are merged, then tokenized run by run.
- BREAK (outside brackets) ends the chunk.
- Chunks: tokens are appended one at a time; a full chunk (75) is closed when one more token
  comes; a BREAK closes the current chunk (even an empty one); at the end the open chunk is
  closed if it has tokens or if there is no chunk at all. A closed chunk is
  `BOS + tokens + EOS...` to 77 positions; positions after the first EOS hold the model's
  pad token (0 for OpenCLIP-trained SD 2.x).
- Encoding: every chunk through the text model separately; clip skip n takes the n-th
  hidden state from the end through the final layer norm; each token's vector is multiplied
  by its weight, then the chunk by (mean before / mean after); chunks concatenated.
- CFG: the shorter of cond / uncond gets chunks of the empty prompt's encoding appended.

Deliberately a different construction (token regex, one chunk object at a time, a plain
loop over chunks) from the product code, so the two cannot share a mistake.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

TOKEN = re.compile(
    r"\\[()\[\]\\]"  # escaped bracket or backslash
    r"|\\"  # any other backslash: dropped
    r"|\(|\["
    r"|:\s*(?P<w>[+-]?[.\d]+)\s*\)"  # ":1.4)"
    r"|\)|\]"
    r"|[^\\()\[\]:]+"
    r"|:"
)
BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")
BREAK_MARK = ("BREAK", None)


def ref_parse(text: str) -> list[tuple[str, float | None]]:
    """[(text, weight)] with BREAK_MARK entries, equal neighbours merged (as A1111)."""
    out: list[list[Any]] = []
    opened: list[tuple[str, int]] = []  # (kind, position in out)

    def close(kind: str, factor: float) -> bool:
        for i in range(len(opened) - 1, -1, -1):
            if opened[i][0] == kind:
                start = opened.pop(i)[1]
                for entry in out[start:]:
                    if entry[1] is not None:
                        entry[1] *= factor
                return True
        return False

    for m in TOKEN.finditer(text):
        tok = m.group(0)
        if tok.startswith("\\"):
            out.append([tok[1:], 1.0])
        elif tok in ("(", "["):
            opened.append((tok, len(out)))
        elif m.group("w") is not None and any(k == "(" for k, _ in opened):
            close("(", float(m.group("w")))
        elif (tok == ")" and close("(", 1.1)) or (tok == "]" and close("[", 1 / 1.1)):
            continue  # closed a bracket
        else:
            pieces = BREAK_RE.split(tok)
            for n, piece in enumerate(pieces):
                if n:
                    out.append(list(BREAK_MARK))
                out.append([piece, 1.0])
    for kind, factor in (("(", 1.1), ("[", 1 / 1.1)):
        for start in [at for k, at in opened if k == kind]:
            for entry in out[start:]:
                if entry[1] is not None:
                    entry[1] *= factor
    merged: list[list[Any]] = []
    for entry in out or [["", 1.0]]:
        if merged and merged[-1][1] is not None and merged[-1][1] == entry[1]:
            merged[-1][0] += entry[0]
        else:
            merged.append(list(entry))
    return [(t, w) for t, w in merged]


def ref_chunks(tokenizer: Any, prompt: str, pad_id: int) -> list[tuple[list[int], list[float]]]:
    """The prompt's chunks as (77 ids, 77 weights)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks: list[tuple[list[int], list[float]]] = []
    cur_ids: list[int] = []
    cur_w: list[float] = []

    def close() -> None:
        ids = [bos] + cur_ids + [eos] * (76 - len(cur_ids))
        w = [1.0] + cur_w + [1.0] * (76 - len(cur_w))
        first_eos = ids.index(eos, 1)
        ids = ids[: first_eos + 1] + [pad_id] * (76 - first_eos)
        chunks.append((ids, w))
        cur_ids.clear()
        cur_w.clear()

    for text, weight in ref_parse(prompt):
        if (text, weight) == BREAK_MARK:
            close()
            continue
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if len(cur_ids) == 75:
                close()
            cur_ids.append(token)
            cur_w.append(float(weight))  # type: ignore[arg-type]
    if cur_ids or not chunks:
        close()
    return chunks


@torch.no_grad()
def ref_encode(
    text_model: Any, tokenizer: Any, prompt: str, *, pad_id: int, clip_skip: int = 1
) -> Tensor:
    """(1, 77·k, D): every chunk encoded alone, weighted, mean-restored, concatenated."""
    parts = []
    for ids, weights in ref_chunks(tokenizer, prompt, pad_id):
        out = text_model(torch.tensor([ids]), output_hidden_states=True)
        if clip_skip == 1:
            z = out.last_hidden_state
        else:
            z = text_model.final_layer_norm(out.hidden_states[-clip_skip])
        original = z.mean()
        z = z * torch.tensor(weights)[None, :, None]
        z = z * (original / z.mean())
        parts.append(z)
    return torch.cat(parts, dim=1)


def ref_pair(
    text_model: Any, tokenizer: Any, prompt: str, negative: str, *, pad_id: int, clip_skip: int = 1
) -> tuple[Tensor, Tensor]:
    """(cond, uncond), the shorter padded with the empty prompt's chunk."""
    kw = {"pad_id": pad_id, "clip_skip": clip_skip}
    cond = ref_encode(text_model, tokenizer, prompt, **kw)
    uncond = ref_encode(text_model, tokenizer, negative, **kw)
    empty = ref_encode(text_model, tokenizer, "", **kw)
    while cond.shape[1] < uncond.shape[1]:
        cond = torch.cat([cond, empty], dim=1)
    while uncond.shape[1] < cond.shape[1]:
        uncond = torch.cat([uncond, empty], dim=1)
    return cond, uncond
