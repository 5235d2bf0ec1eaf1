"""Edit-endpoint masks → the native mask (greyscale PNG, white = repaint), with real PNGs."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.api_errors import ApiError
from service.compat.masks import a1111_mask, image_b64, openai_mask
from service.settings import Settings

S = Settings()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.mode == "L" and image.format == "PNG"
    return np.asarray(image)


def half_transparent(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Left half fully transparent (OpenAI: edit here), right half opaque; colours random."""
    rgba = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    rgba[:, : size[0] // 2, 3] = 0
    rgba[:, size[0] // 2 :, 3] = np.maximum(rgba[:, size[0] // 2 :, 3], 1)  # not transparent
    return Image.fromarray(rgba, "RGBA")


def test_openai_transparent_pixels_become_white() -> None:
    mask = pixels(openai_mask(png(half_transparent()), S))
    assert (mask[:, :32] == 255).all() and (mask[:, 32:] == 0).all()


def test_openai_mask_is_resized_to_the_image_without_new_grey_levels() -> None:
    mask = pixels(openai_mask(png(half_transparent((128, 128))), S, size=(64, 96)))
    assert mask.shape == (96, 64) and set(np.unique(mask)) == {0, 255}


def test_openai_mask_with_a_transparent_palette_entry() -> None:
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 64, 16))  # palette index 0 = transparent
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=0)
    mask = pixels(openai_mask(buf.getvalue(), S))
    assert (mask[:16] == 255).all() and (mask[16:] == 0).all()


def test_openai_mask_without_alpha_is_refused() -> None:
    with pytest.raises(ApiError) as err:
        openai_mask(png(Image.new("RGB", (64, 64), "white")), S)
    assert err.value.status == 422 and err.value.field == "mask"


def test_hostile_bytes_are_the_image_checks_4xx() -> None:
    with pytest.raises(ApiError) as err:
        openai_mask(b"\x89PNG\r\n\x1a\nnot really", S)
    assert err.value.status == 422 and err.value.code == "invalid_image"
    with pytest.raises(ApiError) as err:
        image_b64(b"GIF89a....", "image", S)
    assert err.value.field == "image"


def test_a1111_mask_passes_white_and_inverts_on_request() -> None:
    grey = np.zeros((64, 64), dtype=np.uint8)
    grey[:, :10] = 255
    data = "data:image/png;base64," + base64.b64encode(png(Image.fromarray(grey, "L"))).decode()
    assert (pixels(a1111_mask(data, S, invert=False)) == grey).all()
    assert (pixels(a1111_mask(data, S, invert=True)) == 255 - grey).all()


def test_image_b64_returns_the_checked_size() -> None:
    data, size = image_b64(png(Image.new("RGB", (64, 96), "gray")), "image", S)
    assert size == (64, 96) and base64.b64decode(data).startswith(b"\x89PNG")
