"""service.image_input: every bad image is a 4xx with a stable code and the caller's field.

Images are built in memory (small, or crafted PNG chunks for the bombs), so the file runs in
about a second and needs no Redis, torch or model.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable

import pytest
from PIL import Image, ImageFile, PngImagePlugin

from service.api_errors import ApiError
from service.image_input import decode_image, max_base64_chars
from service.settings import Settings

FIELD = "init_image"
SETTINGS = Settings(max_image_bytes=10 * 1024 * 1024, max_image_pixels=4096 * 4096)


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _picture(
    size: tuple[int, int] = (64, 80), color: tuple[int, int, int] = (200, 30, 60)
) -> Image.Image:
    return Image.new("RGB", size, color)


def _noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """Incompressible pixels: files big enough that cutting them loses real image data."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)


def _black_png(width: int, height: int) -> bytes:
    """A real, complete 1-bit black PNG streamed through zlib: huge pixels, tiny file."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return _png_header(width, height, bit_depth=1) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _with_chunk_before_idat(png: bytes, chunk: bytes) -> bytes:
    """Insert an ancillary chunk right after IHDR (8 signature + 25 IHDR bytes)."""
    return png[:33] + chunk + png[33:]


def _patched_ihdr(png: bytes, width: int, height: int) -> bytes:
    """Claim another size in a valid PNG's IHDR, CRC recomputed so the header parses."""
    data = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + data + struct.pack(">I", zlib.crc32(b"IHDR" + data)) + png[33:]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _refused(
    data: str | bytes, status: int, code: str, settings: Settings = SETTINGS, **kwargs: object
) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_image(data, field=FIELD, settings=settings, **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert (err.status, err.code, err.field) == (status, code, FIELD), err.message
    assert err.message.startswith(f"{FIELD}: ")
    return err


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="session")
def bomb_png() -> bytes:
    """20000 x 20000 black pixels (400 Mpx) in a few tens of KiB; built once."""
    return _black_png(20000, 20000)


# ----------------------------------------------------------------------------- accepted


FORMATS: dict[str, Callable[[Image.Image], bytes]] = {
    "PNG": lambda im: _encode(im, "PNG"),
    "JPEG": lambda im: _encode(im, "JPEG", quality=95),
    "WEBP": lambda im: _encode(im, "WEBP", lossless=True),
}
MEDIA = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
FORMS: dict[str, Callable[[bytes, str], str | bytes]] = {
    "raw": lambda raw, fmt: raw,
    "base64": lambda raw, fmt: _b64(raw),
    "data_url": lambda raw, fmt: f"data:{MEDIA[fmt]};base64,{_b64(raw)}",
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_valid_images_in_every_form(fmt: str, form: str) -> None:
    raw = FORMATS[fmt](_picture())
    image = decode_image(FORMS[form](raw, fmt), field=FIELD, settings=SETTINGS)
    assert (image.mode, image.size) == ("RGB", (64, 80))
    assert _close(image.getpixel((10, 10)), (200, 30, 60))


def test_lenient_base64_spellings() -> None:
    """Line-wrapped (MIME), URL-safe and unpadded base64 all mean the same bytes."""
    raw = _encode(_noise((64, 64), seed=3), "PNG")
    want = decode_image(raw, field=FIELD, settings=SETTINGS).tobytes()
    for text in (
        base64.encodebytes(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        f"  data:IMAGE/PNG;name=x.png;base64,{_b64(raw)}\n",
    ):
        assert decode_image(text, field=FIELD, settings=SETTINGS).tobytes() == want


def test_mpo_camera_file_gives_its_first_picture() -> None:
    raw = _encode(_picture(color=(0, 200, 0)), "MPO", save_all=True, append_images=[_picture()])
    assert Image.open(io.BytesIO(raw)).format == "MPO"
    image = decode_image(raw, field=FIELD, settings=SETTINGS)
    assert _close(image.getpixel((5, 5)), (0, 200, 0))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animation_gives_the_first_frame(fmt: str) -> None:
    frames = [_picture(color=(250, 0, 0)), _picture(color=(0, 0, 250))]
    raw = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
    assert getattr(Image.open(io.BytesIO(raw)), "n_frames", 1) == 2
    image = decode_image(raw, field=FIELD, settings=SETTINGS)
    assert _close(image.getpixel((5, 5)), (250, 0, 0))


def test_exif_orientation_is_applied() -> None:
    """Stored 128x64 with a red top-left; orientation 6 shows it 64x128, red top-right."""
    stored = Image.new("RGB", (128, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    raw = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(raw, field=FIELD, settings=SETTINGS)
    assert image.size == (64, 128)
    assert _close(image.getpixel((56, 8)), (255, 0, 0), tol=30)
    assert _close(image.getpixel((8, 8)), (0, 0, 255), tol=30)


def test_transparency_composited_over_white_for_pictures_and_black_for_masks() -> None:
    stroke = Image.new("RGBA", (64, 64), (255, 255, 255, 0))  # invisible white
    stroke.paste((255, 255, 255, 255), (0, 0, 16, 16))  # painted
    stroke.paste((0, 0, 0, 0), (32, 32, 48, 48))  # invisible black
    raw = _encode(stroke, "PNG")
    mask = decode_image(raw, field=FIELD, settings=SETTINGS, mode="L")
    assert mask.mode == "L"
    assert (mask.getpixel((4, 4)), mask.getpixel((40, 4)), mask.getpixel((40, 40))) == (255, 0, 0)
    picture = decode_image(raw, field=FIELD, settings=SETTINGS, mode="RGB")
    assert picture.getpixel((40, 40)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    raw = _encode(Image.new("I;16", (64, 64), 300), "PNG")  # 300/65535: nearly black
    assert decode_image(raw, field=FIELD, settings=SETTINGS, mode="L").getpixel((0, 0)) == 1


def test_resize_to_stretches_any_size_to_the_target() -> None:
    raw = _encode(_picture((100, 37)), "PNG")
    image = decode_image(raw, field=FIELD, settings=SETTINGS, resize_to=(64, 128))
    assert image.size == (64, 128)
    mask = decode_image(raw, field=FIELD, settings=SETTINGS, mode="L", resize_to=(64, 64))
    low, high = mask.getextrema()
    assert mask.size == (64, 64) and low == high  # nearest: no new grey levels


# ----------------------------------------------------------------------------- refused


def test_truncated_png() -> None:
    raw = _encode(_noise(), "PNG")
    err = _refused(raw[: len(raw) * 6 // 10], 422, "invalid_image")
    assert "truncated" in err.message


def test_truncated_jpeg() -> None:
    raw = _encode(_noise(), "JPEG", quality=95)
    _refused(raw[: len(raw) // 2], 422, "invalid_image")
    _refused(_b64(raw[: len(raw) // 2]), 422, "invalid_image")


def test_truncated_webp() -> None:
    raw = _encode(_noise(), "WEBP", lossless=True)
    _refused(raw[: len(raw) // 2], 422, "invalid_image")


@pytest.mark.parametrize(
    "raw",
    [random.Random(1).randbytes(4096), b"hello, this is a text file\n", b"\x89PNG\r\n\x1a\n"],
    ids=["random", "text", "png-signature-only"],
)
def test_not_an_image(raw: bytes) -> None:
    _refused(raw, 422, "invalid_image")
    _refused(_b64(raw), 422, "invalid_image")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_unsupported_formats_are_named(fmt: str) -> None:
    err = _refused(_encode(_picture(), fmt), 422, "invalid_image")
    assert fmt in err.message and "PNG, JPEG or WebP" in err.message


def test_empty() -> None:
    _refused(b"", 422, "invalid_image")
    _refused("", 422, "invalid_image")


@pytest.mark.parametrize(
    "text",
    ["not base64!!", "QUJD=RA==", "QUJDR", "aGVsbG8gw6k=é"],
    ids=["chars", "pad", "len", "ascii"],
)
def test_invalid_base64(text: str) -> None:
    err = _refused(text, 422, "invalid_image")
    assert "base64" in err.message


@pytest.mark.parametrize(
    "prefix",
    ["data:image/gif;base64,", "data:text/plain;base64,", "data:;base64,", "data:image/png,"],
)
def test_data_url_with_wrong_media_type_or_encoding(prefix: str) -> None:
    """The media type must name an accepted format (the PNG bytes themselves are fine)."""
    _refused(prefix + _b64(_encode(_picture(), "PNG")), 422, "invalid_image")


def test_oversized_bytes() -> None:
    settings = Settings(max_image_bytes=4096)
    raw = _encode(_noise((64, 64)), "PNG")
    assert len(raw) > 4096
    _refused(raw, 413, "payload_too_large", settings)
    _refused(_b64(raw), 413, "payload_too_large", settings)


def test_oversized_base64_refused_before_decoding() -> None:
    """Text of '!' is not base64 at all: a 413 (not 422) shows only its length was read."""
    limit = max_base64_chars(SETTINGS)
    assert limit == 4 * -(-SETTINGS.max_image_bytes // 3)
    _refused("!" * (limit + 4), 413, "payload_too_large")
    _refused("data:image/png;base64," + "!" * (limit + 4), 413, "payload_too_large")
    _refused("!" * (20 * limit), 413, "payload_too_large")  # O(1) path: huge strings
    # Exactly at the limit is not "too large": it gets decoded (and fails as base64).
    _refused("!" * limit, 422, "invalid_image")


def test_png_header_claiming_100000_squared() -> None:
    tiny = _encode(Image.new("L", (8, 8)), "PNG")
    err = _refused(_patched_ihdr(tiny, 100_000, 100_000), 422, "image_too_large")
    assert isinstance(err.__cause__, Image.DecompressionBombError)  # Pillow's, while opening


def test_compressed_black_png_bomb(bomb_png: bytes) -> None:
    assert len(bomb_png) < 200_000  # 400 Mpx behind a small file: the point of a bomb
    err = _refused(bomb_png, 422, "image_too_large")
    assert isinstance(err.__cause__, Image.DecompressionBombError)
    _refused(_b64(bomb_png), 422, "image_too_large")


def test_size_between_pillows_warning_and_error_thresholds() -> None:
    """100 Mpx: Pillow only warns while opening; still a 422, whatever the warning filter."""
    settings = Settings(max_image_pixels=89_478_485)
    raw = _black_png(10_000, 10_000)
    err = _refused(raw, 422, "image_too_large", settings)
    assert isinstance(err.__cause__, Image.DecompressionBombWarning)


def test_pixel_limit_checked_on_the_header_before_decoding() -> None:
    """5000x5000 is under Pillow's limits but over ours; truncated data proves no decode."""
    raw = _black_png(5000, 5000)
    assert _refused(raw, 422, "image_too_large").__cause__ is None  # our check, not Pillow's
    _refused(raw[: len(raw) // 2], 422, "image_too_large")


def test_png_text_chunk_bomb() -> None:
    """A zTXt chunk inflating past Pillow's MAX_TEXT_CHUNK is refused, not expanded."""
    inflated = PngImagePlugin.MAX_TEXT_CHUNK * 2
    ztxt = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * inflated, 9))
    assert len(ztxt) < 10_000
    raw = _with_chunk_before_idat(_encode(_picture((64, 64)), "PNG"), ztxt)
    err = _refused(raw, 422, "invalid_image")
    assert "MAX_TEXT_CHUNK" in str(err.__cause__)


def test_png_iccp_chunk_bomb() -> None:
    inflated = PngImagePlugin.MAX_TEXT_CHUNK * 2
    iccp = _chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * inflated, 9))
    raw = _with_chunk_before_idat(_encode(_picture((64, 64)), "PNG"), iccp)
    err = _refused(raw, 422, "invalid_image")
    assert "MAX_TEXT_CHUNK" in str(err.__cause__)


@pytest.mark.parametrize(
    ("size", "ok"),
    [
        ((64, 64), True),
        ((2048, 64), True),
        ((100, 67), True),  # input sides need not be multiples: the output size rounds down
        ((56, 64), True),  # below min_side, above min_input_side: an upscaler's input
        ((31, 64), False),
        ((64, 2056), False),
    ],
)
def test_side_rules_without_resize(size: tuple[int, int], ok: bool) -> None:
    raw = _encode(Image.new("L", size), "PNG")
    if ok:
        assert decode_image(raw, field=FIELD, settings=SETTINGS).size == size
    else:
        err = _refused(raw, 422, "invalid_image_size")
        assert f"{size[0]}x{size[1]}" in err.message and "between 32 and 2048" in err.message


def test_side_rules_checked_before_decoding() -> None:
    raw = _encode(_noise((31, 64)), "PNG")
    _refused(raw[: len(raw) // 2], 422, "invalid_image_size")


def test_resize_target_follows_the_side_rules() -> None:
    raw = _encode(_picture((64, 64)), "PNG")
    _refused(raw, 422, "invalid_image_size", resize_to=(65, 64))


def test_truncated_loading_must_stay_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError):
        decode_image(_encode(_picture(), "PNG"), field=FIELD, settings=SETTINGS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupted_files_never_escape_as_other_errors(fmt: str) -> None:
    """Seeded byte flips and cuts: each result is an image or an ApiError 4xx, nothing else."""
    raw = FORMATS[fmt](_noise((64, 64), seed=7))
    rng = random.Random(fmt)
    for _ in range(150):
        damaged = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        if rng.random() < 0.3:
            damaged = damaged[: rng.randrange(len(damaged))]
        try:
            decode_image(bytes(damaged), field=FIELD, settings=SETTINGS)
        except ApiError as err:
            assert 400 <= err.status < 500 and err.field == FIELD


def test_module_import_does_not_load_pillow() -> None:
    """service.api can import it without Pillow at start (tests/test_api.py import budget)."""
    code = "import sys, service.image_input; assert 'PIL' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
