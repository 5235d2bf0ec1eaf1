"""Derive model/assets/vocab.json and merges.txt from OpenAI CLIP's BPE file.

Why: single-file Stable Diffusion checkpoints carry no tokenizer, and ldmserve must not
download one, so the CLIP vocabulary ships inside the package. Its source of truth is
`bpe_simple_vocab_16e6.txt.gz` (MIT licence, OpenAI CLIP; also bundled by open_clip_torch).
This script rebuilds the derived files exactly as CLIP's `SimpleTokenizer` builds its
vocabulary, so the bundled files can be re-checked against the original at any time:

    pip download --no-deps open_clip_torch -d /tmp/oc
    python scripts/make_clip_vocab.py /tmp/oc/open_clip_torch-*.whl          # write
    python scripts/make_clip_vocab.py /tmp/oc/open_clip_torch-*.whl --check  # verify

The argument may be the wheel (the .gz is read from inside it) or the .gz itself.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "model" / "assets"
WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges: vocab = 512 + merges + 2 = 49,408
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table, printable bytes first (CLIP's id order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}  # insertion order is the vocabulary order
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_bpe_lines(source: Path) -> list[str]:
    """Lines of the gzipped BPE file, read from the wheel or from the .gz directly."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(WHEEL_MEMBER)
    else:
        raw = source.read_bytes()
    return gzip.decompress(raw).decode("utf-8").split("\n")


def derive(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges as 'a b' strings) exactly as CLIP's SimpleTokenizer."""
    merges = lines[1 : N_MERGES + 1]  # line 0 is the '#version' header
    if len(merges) != N_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError("BPE file does not look like bpe_simple_vocab_16e6.txt")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += list(SPECIALS)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("derived vocabulary has duplicate tokens")
    return vocab, merges


def render(vocab: dict[str, int], merges: list[str]) -> tuple[str, str]:
    """File contents in the Hugging Face CLIPTokenizer layout."""
    vocab_text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n"
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return vocab_text, merges_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="open_clip_torch wheel or the BPE .txt.gz")
    parser.add_argument("--out", type=Path, default=ASSETS, help="output folder")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)

    vocab, merges = derive(read_bpe_lines(args.source))
    files = dict(zip(("vocab.json", "merges.txt"), render(vocab, merges), strict=True))
    if args.check:
        stale = [n for n, text in files.items() if (args.out / n).read_text("utf-8") != text]
        for name in stale:
            print(f"{args.out / name} differs from the derivation", file=sys.stderr)
        print("ok" if not stale else "stale")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
