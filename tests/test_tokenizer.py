"""The bundled CLIP tokenizer: vocabulary derivation, BPE, padding and truncation."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from model.text import ASSETS, MAX_LENGTH, random_text_encoder, tiny_text_config
from tests.clip_reference import PROMPTS, reference_ids, reference_vocab

# open_clip_torch bundles OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT), the source the
# bundled vocabulary is derived from. Only the wheel file is fetched, never installed (its
# dependencies would pull a CUDA build of torch).
OPEN_CLIP_SPEC = "open_clip_torch==3.3.0"
OPEN_CLIP_WHEEL_NAME = "open_clip_torch-3.3.0-py3-none-any.whl"


@pytest.fixture(scope="session")
def open_clip_wheel(request: pytest.FixtureRequest) -> Path:
    """The wheel from LDMSERVE_OPEN_CLIP_WHEEL, pytest's cache, or `pip download` into it."""
    if given := os.environ.get("LDMSERVE_OPEN_CLIP_WHEEL"):
        return Path(given)
    cache = Path(request.config.cache.mkdir("open_clip"))
    wheel = cache / OPEN_CLIP_WHEEL_NAME
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache)]
        done = subprocess.run(
            [*cmd, OPEN_CLIP_SPEC], capture_output=True, text=True, timeout=240, check=False
        )
        assert wheel.is_file(), (
            f"could not fetch {OPEN_CLIP_SPEC} (needs the package index, or set "
            f"LDMSERVE_OPEN_CLIP_WHEEL to a downloaded wheel): {done.stderr[-2000:]}"
        )
    return wheel


def test_bundled_vocab_matches_clip_bpe_derivation() -> None:
    vocab = json.loads((ASSETS / "vocab.json").read_text("utf-8"))
    assert len(vocab) == 49408
    assert vocab == reference_vocab()[0]
    assert vocab["!"] == 0 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_merges_equal_open_clip_bpe_file(open_clip_wheel: Path) -> None:
    """The bundled merges are the first 48,894 of CLIP's own BPE file, byte for byte."""
    with zipfile.ZipFile(open_clip_wheel) as wheel:
        lines = (
            gzip.decompress(wheel.read("open_clip/bpe_simple_vocab_16e6.txt.gz"))
            .decode()
            .split("\n")
        )
    ours = (ASSETS / "merges.txt").read_text("utf-8").split("\n")
    assert ours[1:-1] == lines[1:48895]


def test_tokenizer_matches_reference_bpe_and_known_ids() -> None:
    enc = random_text_encoder(tiny_text_config())
    ids = enc.tokenize(PROMPTS)
    for prompt, row in zip(PROMPTS, ids.tolist(), strict=True):
        ref = reference_ids(prompt)
        assert row[: len(ref)] == ref, prompt
        assert set(row[len(ref) :]) <= {49407}
    # The ids SD 1.5 users see for these prompts.
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert reference_ids("an astronaut riding a horse") == [
        49406,
        550,
        18376,
        6765,
        320,
        4558,
        49407,
    ]


def test_padding_sd1_vs_sd2_and_truncation() -> None:
    sd1 = random_text_encoder(tiny_text_config())
    sd2 = random_text_encoder(tiny_text_config(hidden_act="gelu"))
    assert (sd1.pad_token_id, sd2.pad_token_id) == (49407, 0)
    a, b = sd1.tokenize(["a cat!!"]), sd2.tokenize(["a cat!!"])
    assert a.shape == b.shape == (1, MAX_LENGTH)
    # "!!" stays one ordinary token (748) under SD 2.x padding, as OpenCLIP tokenizes it.
    assert a[0, :5].tolist() == b[0, :5].tolist() == [49406, 320, 2368, 748, 49407]
    assert set(a[0, 5:].tolist()) == {49407} and set(b[0, 5:].tolist()) == {0}
    long = sd2.tokenize(["cat " * 200])[0].tolist()
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407 and set(long[1:-1]) == {2368}


# --- single-file loading, parity with diffusers' converters ---
