"""Input images for the edit endpoints, turned into the native fields ``image`` / ``mask``.

The native mask is a greyscale PNG, white = repaint, black = keep (diffusers' convention).
OpenAI's edit mask is a PNG whose *fully transparent* pixels mark the area to repaint (its
colours mean nothing); AUTOMATIC1111's is already white = repaint, inverted when
``inpainting_mask_invert`` is 1. Every input is first checked by
:func:`service.image_input.decode_image` (size, format, bombs → 4xx) before Pillow reads it
again here. Pillow is imported lazily (the API's import footprint is tested).
"""

from __future__ import annotations

import base64
import io

from service.api_errors import ApiError
from service.image_input import decode_image
from service.settings import Settings


def _png_b64(image: object) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # type: ignore[attr-defined]
    return base64.b64encode(buf.getvalue()).decode()


def image_b64(raw: bytes, field: str, settings: Settings) -> tuple[str, tuple[int, int]]:
    """An uploaded picture, checked, as base64 (the native ``image`` field) and its size."""
    image = decode_image(raw, field=field, settings=settings, mode="RGB")
    return base64.b64encode(raw).decode(), image.size


def openai_mask(raw: bytes, settings: Settings, size: tuple[int, int] | None = None) -> str:
    """OpenAI mask (transparent = repaint) → native mask (base64 PNG, white = repaint)."""
    from PIL import Image

    decode_image(raw, field="mask", settings=settings, mode="L", resize_to=size)  # checks
    with Image.open(io.BytesIO(raw)) as opened:
        image = opened.convert("RGBA") if "transparency" in opened.info else opened
        if image.mode not in ("RGBA", "LA", "PA"):
            message = "mask: must be a PNG with an alpha channel (transparent = edit here)"
            raise ApiError(422, "invalid_mask", message, "mask")
        alpha = image.convert("RGBA").getchannel("A")
    mask = alpha.point(lambda a: 255 if a == 0 else 0)
    if size is not None and mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return _png_b64(mask)


def a1111_mask(data: str, settings: Settings, invert: bool) -> str:
    """A1111 mask (white = repaint; base64 or data URL) → native mask, inverted if asked."""
    from PIL import ImageOps

    mask = decode_image(data, field="mask", settings=settings, mode="L")
    return _png_b64(ImageOps.invert(mask) if invert else mask)
