"""Untrusted image input for every endpoint that takes one (img2img init images, inpainting masks).

Images arrive as hostile bytes aimed at C decoders, so one function turns them into a
checked ``PIL.Image`` or an :class:`~service.api_errors.ApiError` (4xx) — never a 5xx, never
a PIL, zlib or base64 exception. Endpoints only call it::

    from service.image_input import decode_image

    # in the route, off the event loop (decoding a 16 Mpx image takes a CPU-bound moment):
    init = await run_in_threadpool(
        decode_image, body.init_image, field="init_image", settings=settings, mode="RGB"
    )
    mask = await run_in_threadpool(
        decode_image, body.mask_image, field="mask_image", settings=settings, mode="L",
        resize_to=(init.width, init.height),
    )

then re-encode what they got (PNG) for the job record, so workers only ever read images
this module produced. JSON bodies carry base64 (``str``); a future multipart upload passes
the file's ``bytes``. Routes taking images need a request body limit above
``max_image_bytes`` * 4/3 (``max_body_bytes`` is sized for prompts).

Decisions (each answer has status, stable ``code`` and ``field`` = the caller's field name):

- Size: more than ``max_image_bytes`` → 413 ``payload_too_large``. Base64 text is measured
  before decoding (``4 * ceil(max_image_bytes / 3)`` characters, whitespace not counted).
- Input forms: raw ``bytes``; base64 ``str`` (standard or URL-safe alphabet, padding
  optional, line breaks allowed); ``data:image/{png,jpeg,webp}[;params];base64,`` URLs. A
  data URL's media type must name an accepted format but the bytes decide the format
  (a PNG labelled image/jpeg is read as the PNG it is). Bad base64 / data URL → 422
  ``invalid_image``.
- Formats: PNG, JPEG (MPO camera files: their first picture) and WebP only, chosen by
  content; Pillow's other parsers never see the bytes. Anything else → 422
  ``invalid_image`` naming the format when it is recognisable (GIF, BMP, ...). Not 415:
  415 is about the request's media type, which is JSON here.
- Truncated or corrupt data → 422 ``invalid_image``: pixels are decoded eagerly
  (``load()``) with ``ImageFile.LOAD_TRUNCATED_IMAGES`` False (a process that sets it True
  gets a RuntimeError here rather than silently accepting half images).
- Decompression bombs: width x height from the header is checked against
  ``max_image_pixels`` before any pixel is decoded → 422 ``image_too_large``; Pillow's own
  DecompressionBombError/Warning (raised while opening, for sizes above its larger
  threshold) map to the same answer. Metadata bombs (PNG zTXt/iTXt/iCCP chunks) are
  bounded by Pillow's ``MAX_TEXT_CHUNK`` (1 MiB decompressed per chunk) and
  ``MAX_TEXT_MEMORY``, whose ValueError → 422 ``invalid_image``.
- Sides: without ``resize_to`` both sides must lie in [min(min_side, min_input_side),
  max_side] (an upscaler's input is smaller than its output; outputs are checked against
  min_side once resolved) and be multiples of ``side_multiple`` → else 422
  ``invalid_image_size`` (checked on the header,
  before decoding). With ``resize_to=(w, h)`` (itself held to the same rules) any image
  within the pixel limit is stretched to exactly (w, h): Lanczos for pictures, nearest
  for masks so no new grey levels appear at stroke edges.
- Orientation: EXIF orientation is applied (``ImageOps.exif_transpose``), so the pixels
  are what the user saw; unreadable EXIF leaves the image as stored.
- Animation (APNG, animated WebP): the first frame is used, as still-image viewers show.
- Transparency: ``mode="RGB"`` composites over white (what a page shows; dropping alpha
  would expose whatever colour hides under transparent pixels); ``mode="L"`` (masks)
  composites over black, so transparent = not painted = keep. 16-bit greyscale is scaled
  to 8 bits, not clipped.

Pillow is imported inside the functions: ``service.api`` may import this module without
paying for Pillow at start (tests/test_api.py checks the API's import footprint).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import warnings
from typing import TYPE_CHECKING, Literal

from service.api_errors import ApiError
from service.settings import Settings

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

Mode = Literal["RGB", "L"]

_PIL_FORMATS = ("PNG", "JPEG", "WEBP")  # Image.open(formats=...): JPEG may come back as MPO
_ACCEPTED = frozenset({"PNG", "JPEG", "MPO", "WEBP"})
_DATA_URL_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp"})
_MAX_DATA_URL_HEADER = 256  # "data:image/png;name=...;base64," — generous, bounded
# Only to name a refused format in the message; the decision itself is Pillow's detection.
_KNOWN_OTHERS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"%PDF", "PDF"),
    (0, b"8BPS", "PSD"),
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
)
_B64_WHITESPACE = str.maketrans("", "", " \t\r\n")
_B64_URLSAFE = str.maketrans("-_", "+/")


def max_base64_chars(settings: Settings) -> int:
    """Longest base64 text (without whitespace) whose decoded size can be within the limit."""
    return 4 * math.ceil(settings.max_image_bytes / 3)


def decode_image(
    data: str | bytes,
    *,
    field: str,
    settings: Settings,
    mode: Mode = "RGB",
    resize_to: tuple[int, int] | None = None,
) -> Image.Image:
    """Checked, fully decoded, upright image in ``mode`` from raw bytes or base64 text.

    Raises ApiError (413/422) for anything a client can get wrong; see the module docstring.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    if resize_to is not None:
        _check_sides(resize_to, settings, field, what="resize target")
    raw = data if isinstance(data, bytes) else _from_text(data, field, settings)
    if len(raw) > settings.max_image_bytes:
        raise _too_big(field, settings)
    if not raw:
        raise ApiError(422, "invalid_image", f"{field}: empty image", field)
    image = _open_checked(raw, field, settings, check_sides=resize_to is None)
    return _finish(image, field, mode, resize_to)


def _too_big(field: str, settings: Settings) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"{field}: image exceeds {settings.max_image_bytes} bytes",
        field,
    )


def _invalid_base64(field: str, why: str) -> ApiError:
    return ApiError(422, "invalid_image", f"{field}: not valid base64 image data ({why})", field)


def _from_text(text: str, field: str, settings: Settings) -> bytes:
    """Base64 (or a base64 data URL) → bytes, refusing oversize text before decoding it."""
    limit = max_base64_chars(settings)
    # O(1) first: even with MIME line breaks (2 per 76 chars) valid text stays below this.
    if len(text) > limit + limit // 32 + _MAX_DATA_URL_HEADER:
        raise _too_big(field, settings)
    payload = text.strip()
    if payload[:5].lower() == "data:":
        header, comma, payload = payload.partition(",")
        if not comma or len(header) > _MAX_DATA_URL_HEADER:
            raise _invalid_base64(field, "malformed data URL")
        params = [p.strip().lower() for p in header[5:].split(";")]
        if params[-1] != "base64":
            raise _invalid_base64(field, "data URL must be base64-encoded")
        if params[0] not in _DATA_URL_TYPES:
            raise ApiError(
                422,
                "invalid_image",
                f"{field}: data URL media type {params[0] or '(none)'!r} is not "
                "image/png, image/jpeg or image/webp",
                field,
            )
    payload = payload.translate(_B64_WHITESPACE)
    if len(payload) > limit:
        raise _too_big(field, settings)
    if len(payload) % 4 == 1:
        raise _invalid_base64(field, "bad length")
    payload = payload.translate(_B64_URLSAFE) + "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters
        raise _invalid_base64(field, "unexpected characters or padding") from exc


def _format_name(raw: bytes) -> str | None:
    for offset, magic, name in _KNOWN_OTHERS:
        if raw[offset : offset + len(magic)] == magic:
            return name
    return None


def _check_sides(size: tuple[int, int], settings: Settings, field: str, what: str) -> None:
    """Sides within the request limits. An input image's sides need not be a multiple of
    ``side_multiple`` (the output size rounds them down, as diffusers does); a resize
    target's must, like a request's width/height."""
    lo, hi, multiple = settings.min_side, settings.max_side, settings.side_multiple
    width, height = size
    step = multiple if what == "resize target" else 1
    if what != "resize target":  # an upscaler's low-res input may be smaller than any output
        lo = min(lo, settings.min_input_side)
    if all(lo <= s <= hi and s % step == 0 for s in (width, height)):
        return
    rule = f" and a multiple of {multiple}" if step > 1 else ""
    raise ApiError(
        422,
        "invalid_image_size",
        f"{field}: {what} is {width}x{height}; each side must be between {lo} and {hi}{rule}",
        field,
    )


def _open_checked(raw: bytes, field: str, settings: Settings, check_sides: bool) -> Image.Image:
    """Header checks first (format, pixels, sides), then every pixel decoded."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated input passes")
    invalid = ApiError(422, "invalid_image", f"{field}: not a valid PNG, JPEG or WebP image", field)
    too_large = ApiError(
        422,
        "image_too_large",
        f"{field}: image exceeds {settings.max_image_pixels} pixels",
        field,
    )
    # Pillow warns (not raises) between its two bomb thresholds; make that an answer too.
    # catch_warnings is process-wide on Python < 3.14; under a race the warning is merely
    # shown and our own stricter pixel check below refuses the image just the same.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw), formats=_PIL_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise too_large from exc
        except UnidentifiedImageError as exc:
            name = _format_name(raw)
            if name is not None:
                raise ApiError(
                    422,
                    "invalid_image",
                    f"{field}: {name} images are not accepted; send PNG, JPEG or WebP",
                    field,
                ) from exc
            raise invalid from exc
        except Exception as exc:  # any parser failure on hostile header bytes
            log.debug("image header rejected: %r", exc)
            raise invalid from exc
    if image.format not in _ACCEPTED:  # defensive: formats= already restricts detection
        raise invalid
    width, height = image.size
    if width < 1 or height < 1:
        raise invalid
    if width * height > settings.max_image_pixels:
        raise too_large
    if check_sides:
        # EXIF rotation only swaps the sides, and the rules are the same for both.
        _check_sides((width, height), settings, field, what="image")
    try:
        image.load()  # Pillow is lazy: truncation and corrupt data show up only here
    except Exception as exc:  # truncated / corrupt streams: OSError, SyntaxError, ValueError...
        log.debug("image data rejected: %r", exc)
        raise ApiError(
            422, "invalid_image", f"{field}: image data is truncated or corrupt", field
        ) from exc
    return image


def _upright(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a broken EXIF block is metadata, not a reason to refuse."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF (Pillow raises assorted errors)
        log.debug("EXIF orientation ignored: %r", exc)
        return image


def _to_mode(image: Image.Image, mode: Mode) -> Image.Image:
    """8-bit RGB or L, transparency composited (white for pictures, black for masks)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale PNG: scale, not clip
        image = image.convert("I").point(lambda v: v / 257).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB", "1") and "transparency" in image.info
    )
    if has_alpha:
        background = (255, 255, 255, 255) if mode == "RGB" else (0, 0, 0, 255)
        image = Image.alpha_composite(
            Image.new("RGBA", image.size, background), image.convert("RGBA")
        )
    elif image.mode == "P":
        image = image.convert("RGB")
    return image if image.mode == mode else image.convert(mode)


def _finish(
    image: Image.Image, field: str, mode: Mode, resize_to: tuple[int, int] | None
) -> Image.Image:
    """Orientation, mode and size: the image as the endpoint will use it."""
    from PIL import Image

    try:
        image = _to_mode(_upright(image), mode)
        if resize_to is not None and image.size != resize_to:
            resample = Image.Resampling.LANCZOS if mode == "RGB" else Image.Resampling.NEAREST
            image = image.resize(resize_to, resample)
    except Exception as exc:  # exotic pixel layouts Pillow cannot convert
        log.debug("image conversion failed: %r", exc)
        raise ApiError(422, "invalid_image", f"{field}: unsupported pixel format", field) from exc
    return image
