"""decode_image on real photos and on a bad-input corpus generated here (each case: its documented result)."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline_data.images import (
    DEFAULT_FORMATS,
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
)
from tests.utils.faces import FACES, MISSING, PHOTOS, needs_faces, require_faces


# --- corpus builders ---------------------------------------------------------------------------------------------
def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 48, h: int = 32) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=2).astype(np.uint8))


def _noise(w: int = 64, h: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(w: int, h: int, idat: bytes = b"") -> bytes:
    """A PNG whose header declares w x h greyscale pixels, with the given (possibly tiny) IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_bomb(side: int = 8000) -> bytes:
    """A real, valid all-black PNG: side^2 pixels (64 MP at 8000) in ~60 KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return png_declaring(side, side, data)


def jpeg_declaring(w: int, h: int) -> bytes:
    """A small JPEG with its SOF0 frame size patched to w x h."""
    raw = bytearray(_save(_gradient(16, 16), "JPEG"))
    i = raw.index(b"\xff\xc0")
    raw[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(raw)


def jpeg_destroyed_dqt() -> bytes:
    """A complete JPEG (ends with EOI) whose first quantisation table, length field included, is overwritten."""
    raw = bytearray(_save(_noise(), "JPEG", quality=90))
    i = raw.index(b"\xff\xdb")
    raw[i + 2 : i + 40] = b"\xff" * 38
    return bytes(raw)


def jpeg_damaged_scan() -> bytes:
    """A complete JPEG whose SOS header claims to run past the end of the file."""
    raw = bytearray(_save(_noise(), "JPEG", quality=90))
    i = raw.index(b"\xff\xda")
    raw[i + 2 : i + 4] = b"\xff\xf0"
    return bytes(raw)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 40x20 (landscape) JPEG, red on its left half, tagged with an EXIF orientation."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(a), "JPEG", exif=exif, quality=95)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    kw = {"save_all": True, "append_images": frames[1:], "duration": 100, "loop": 0}
    return _save(frames[0], fmt, **kw)


def cmyk_jpeg() -> bytes:
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    return _save(im, "JPEG", quality=95)


def png16_gray() -> bytes:
    a = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16).repeat(4, 0)
    return _save(Image.fromarray(a), "PNG")


def pgm16() -> bytes:
    a = np.array([[0, 32768, 65535, 1000]], dtype=">u2").repeat(4, 0)
    return b"P5 4 4 65535\n" + a.tobytes()


def pfm_float32() -> bytes:
    a = np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32).repeat(4, 0)
    return _save(Image.fromarray(a, mode="F"), "PPM")


def tiff_int32() -> bytes:
    a = np.array([[-5, 0, 100000, 5000]], dtype=np.int32).repeat(4, 0)
    return _save(Image.fromarray(a, mode="I"), "TIFF")


def rgba_png() -> bytes:
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :4] = (255, 0, 0, 255)  # opaque red left, fully transparent right
    return _save(Image.fromarray(a, "RGBA"), "PNG")


def palette_transparent_png() -> bytes:
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    return _save(im, "PNG", transparency=0)


def webp_lossless() -> bytes:
    return _save(_gradient(), "WEBP", lossless=True)


def gray_jpeg() -> bytes:
    return _save(_gradient().convert("L"), "JPEG", quality=95)


def real_jpeg() -> bytes:
    require_faces()
    return (PHOTOS / "obama_small.jpg").read_bytes()


# --- the documented result for every corpus entry ---------------------------------------------------------------
REFUSED = [
    # (case, bytes builder, decode kwargs, expected code)
    ("zero_bytes", lambda: b"", {}, "empty"),
    ("text", lambda: b"hello, this is not a photo\n" * 3, {}, "not_an_image"),
    ("random_bytes", lambda: np.random.default_rng(0).bytes(4096), {}, "not_an_image"),
    ("html", lambda: b"<html><body>hi</body></html>", {}, "not_an_image"),
    ("bomb_png_64mp", png_bomb, {}, "too_large"),
    ("huge_declared_png", lambda: png_declaring(100_000, 100_000), {}, "too_large"),
    (
        "huge_declared_png_over_pillow_cap",
        lambda: png_declaring(100_000, 100_000),
        {"max_pixels": 10**12},
        "too_large",
    ),
    ("huge_declared_jpeg", lambda: jpeg_declaring(30_000, 30_000), {}, "too_large"),
    ("small_cap", real_jpeg, {"max_pixels": 10_000}, "too_large"),
    ("byte_cap", real_jpeg, {"max_bytes": 1000}, "too_large"),
    ("truncated_jpeg", lambda: real_jpeg()[: len(real_jpeg()) // 2], {}, "truncated"),
    ("truncated_png", lambda: _save(_noise(), "PNG")[:6000], {}, "truncated"),
    ("truncated_webp", lambda: _save(_noise(), "WEBP")[:3000], {}, "truncated"),
    ("header_only_png", lambda: png_declaring(64, 64), {}, "truncated"),
    ("jpeg_destroyed_quant_table", jpeg_destroyed_dqt, {}, "corrupt"),
    ("jpeg_damaged_scan_complete_file", jpeg_damaged_scan, {}, "corrupt"),
    ("animated_gif", lambda: animated("GIF"), {}, "unsupported_format"),
    ("animated_gif_allowed", lambda: animated("GIF"), {"allow_formats": (*DEFAULT_FORMATS, "GIF")}, "animated"),
    ("animated_png", lambda: animated("PNG"), {}, "animated"),
    ("animated_webp", lambda: animated("WEBP"), {}, "animated"),
    ("bmp", lambda: _save(_gradient(), "BMP"), {}, "unsupported_format"),
    ("tiff", tiff_int32, {}, "unsupported_format"),
    ("still_gif", lambda: _save(_gradient(), "GIF"), {}, "unsupported_format"),
]


@pytest.mark.parametrize(("case", "build", "kw", "code"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_code(case, build, kw, code):
    data = build()
    t = time.perf_counter()
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(data, **kw)
    assert ei.value.code == code, f"{case}: {ei.value}"
    assert isinstance(ei.value, ValueError) and str(ei.value)
    if case.startswith(("bomb", "huge")):
        assert time.perf_counter() - t < 0.5  # refused from the header, nothing allocated


ACCEPTED = [
    # (case, bytes builder, decode kwargs, expected (H, W), check on the RGB array)
    ("gray_jpeg", gray_jpeg, {}, (32, 48), lambda a: np.all(a[..., 0] == a[..., 1])),
    ("cmyk_jpeg", cmyk_jpeg, {}, (16, 16), lambda a: a[8, 8, 0] > 200 and a[8, 8, 1] < 60 and a[8, 8, 2] < 60),
    ("png16_gray", png16_gray, {}, (4, 4), lambda a: list(a[0, :3, 0]) == [0, 128, 255] and a[0, 3, 0] == 4),
    ("pgm16", pgm16, {}, (4, 4), lambda a: list(a[0, :3, 0]) == [0, 128, 255]),
    ("pfm_float32", pfm_float32, {}, (4, 4), lambda a: list(a[0, :, 0]) == [0, 128, 255, 64]),
    ("tiff_int32_allowed", tiff_int32, {"allow_formats": ("TIFF",)}, (4, 4), lambda a: a[0, 0, 0] == 0),
    (
        "rgba_over_white",
        rgba_png,
        {},
        (8, 8),
        lambda a: tuple(a[0, 0]) == (255, 0, 0) and tuple(a[0, 7]) == (255,) * 3,
    ),
    ("palette_transparency", palette_transparent_png, {}, (8, 8), lambda a: tuple(a[0, 0]) == (0, 255, 0)),
    ("la_png", lambda: _save(_gradient().convert("LA"), "PNG"), {}, (32, 48), lambda a: a.std() > 10),
    (
        "bilevel_png",
        lambda: _save(_gradient().convert("1"), "PNG"),
        {},
        (32, 48),
        lambda a: set(np.unique(a)) <= {0, 255},
    ),
    ("webp", webp_lossless, {}, (32, 48), lambda a: abs(int(a[0, 0, 2]) - 255) < 3),
    ("exif_rotate_6", lambda: exif_rotated_jpeg(6), {}, (40, 20), lambda a: a[2, 10, 0] > 200 and a[37, 10, 2] > 200),
    ("exif_rotate_3", lambda: exif_rotated_jpeg(3), {}, (20, 40), lambda a: a[10, 37, 0] > 200 and a[10, 2, 2] > 200),
    ("exif_ignored", lambda: exif_rotated_jpeg(6), {"exif_transpose": False}, (20, 40), lambda a: a[10, 2, 0] > 200),
    ("max_side", real_jpeg, {"max_side": 100}, (75, 100), lambda a: a.mean() > 10),
    ("all_formats", lambda: _save(_gradient(), "BMP"), {"allow_formats": None}, (32, 48), lambda a: True),
]


@pytest.mark.parametrize(("case", "build", "kw", "shape", "check"), ACCEPTED, ids=[r[0] for r in ACCEPTED])
def test_accepted_converted_to_rgb(case, build, kw, shape, check):
    a = decode_image(build(), **kw)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape == (*shape, 3), a.shape
    assert check(a), f"{case}: {a[..., 0]}"


@needs_faces
@pytest.mark.parametrize("name", ["-"] if MISSING else sorted(p.name for p in PHOTOS.iterdir()))
def test_real_photos_decode(name):
    a = decode_image(PHOTOS / name)
    assert a.dtype == np.uint8 and a.shape[2] == 3 and min(a.shape[:2]) >= 200


@needs_faces
def test_dataset_samples_and_bytes_equal_path():
    for p in (FACES / "orl/s1/1.pgm", next((FACES / "lfw").glob("*/*.jpg")), next((FACES / "celeba").glob("*/*"))):
        a = decode_image(p)
        assert a.shape[2] == 3
        np.testing.assert_array_equal(a, decode_image(p.read_bytes()))
        np.testing.assert_array_equal(a, decode_image(str(p)))
    assert decode_image(FACES / "orl/s1/1.pgm").shape == (112, 92, 3)


def test_paths_that_cannot_be_read(tmp_path):
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(tmp_path / "missing.jpg")
    assert ei.value.code == "unreadable" and "missing.jpg" in str(ei.value)
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(tmp_path)
    assert ei.value.code == "unreadable"
    with pytest.raises(TypeError):
        decode_image(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(b"x", max_pixels=0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_every_truncation_is_a_typed_error_or_a_full_image(fmt):
    data = _save(_noise(64, 48), fmt)
    for cut in sorted({*range(0, len(data), max(1, len(data) // 25)), len(data) - 1}):
        try:
            a = decode_image(data[:cut])
        except ImageDecodeError as e:
            assert e.code in {"empty", "truncated", "corrupt", "not_an_image", "unsupported_format"}, (cut, e)
        else:
            assert a.shape == (48, 64, 3)  # only the end marker was missing


def test_random_corruption_never_escapes_as_another_exception():
    data = bytearray(real_jpeg())
    rng = np.random.default_rng(1)
    for _ in range(15):
        bad = bytearray(data)
        for i in rng.integers(2, len(bad), size=20):
            bad[i] = int(rng.integers(0, 256))
        try:
            decode_image(bytes(bad))
        except ImageDecodeError:
            pass


def test_error_classes_carry_codes():
    e = ImageTooLargeError("x")
    assert e.code == "too_large" and isinstance(e, ImageDecodeError) and isinstance(e, ValueError)
    assert ImageDecodeError("y", code="custom").code == "custom"
