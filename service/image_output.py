"""Result pixels to the bytes a job stores: PNG (with A1111's ``parameters`` text chunk when
given), JPEG or WebP. Runs in the worker's encoder threads, off the denoising loop."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, PngImagePlugin


def encode_images(
    images: list[np.ndarray], fmt: str, texts: Sequence[str] | None = None
) -> list[bytes]:
    """uint8 (H, W, 3) arrays -> PNG / JPEG / WebP bytes; PNGs get ``texts[i]`` as their
    A1111 ``parameters`` chunk."""
    out = []
    for i, pixels in enumerate(images):
        buf = io.BytesIO()
        image = Image.fromarray(pixels)
        if fmt == "jpeg":
            image.save(buf, format="JPEG", quality=92)
        elif fmt == "webp":
            image.save(buf, format="WEBP", quality=92)
        else:
            info = None
            if texts:
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", texts[i])
            image.save(buf, format="PNG", compress_level=4, pnginfo=info)
        out.append(buf.getvalue())
    return out
