"""The one image decoder shared by the data pipeline and the service.

``decode_image`` turns bytes or a path into an RGB ``uint8`` array ``(H, W, 3)``. It refuses anything that is not a
still photo in an allow-listed format, checks the pixel count from the header *before* decoding (so a decompression
bomb is refused without allocating it), applies the EXIF orientation and converts every Pillow mode to RGB.

Every refusal is an :class:`ImageDecodeError` (a ``ValueError``) with a stable ``code`` the service maps to HTTP 4xx:

==================== ======================================================================
code                 meaning
==================== ======================================================================
``empty``            zero bytes
``too_large``        pixel count (from the header) or byte size over the cap
``not_an_image``     not an image at all (text, random bytes, ...)
``unsupported_format`` an image, but not in ``allow_formats`` (GIF, BMP, TIFF, HEIC, ...)
``animated``         more than one frame (animated PNG / WebP / GIF)
``truncated``        the data ends before the image does
``corrupt``          the image data is damaged in some other way
``unsupported_mode`` a pixel mode with no RGB conversion (e.g. LAB)
``unreadable``       a path that cannot be read (missing, a directory, no permission)
==================== ======================================================================
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "AnimatedImageError",
    "CorruptImageError",
    "EmptyImageError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "NotAnImageError",
    "TruncatedImageError",
    "UnreadableImageError",
    "UnsupportedFormatError",
    "UnsupportedModeError",
    "decode_image",
    "to_rgb_array",
]

# Pillow format names accepted by default; "PPM" also covers PGM/PBM/PFM (dataset folders such as ORL).
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "PPM")
DEFAULT_MAX_PIXELS = 40_000_000  # ~40 MP: any face photo fits; a 14000x14000 bomb does not
DEFAULT_MAX_BYTES = 50 * 1024 * 1024  # byte-size cap for inputs (paths are checked before reading)
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white

# Magic numbers of image formats Pillow may not be asked to open; used to tell "unsupported_format" from junk.
_KNOWN_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"8BPS", 0, "PSD"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG2000"),
    (b"\xffO\xffQ", 0, "JPEG2000"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"%PDF", 0, "PDF"),
    (b"<svg", 0, "SVG"),
)


class ImageDecodeError(ValueError):
    """An input that is not an acceptable photo. ``code`` is a stable machine-readable reason."""

    code = "invalid_image"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class EmptyImageError(ImageDecodeError):
    code = "empty"


class ImageTooLargeError(ImageDecodeError):
    code = "too_large"


class NotAnImageError(ImageDecodeError):
    code = "not_an_image"


class UnsupportedFormatError(ImageDecodeError):
    code = "unsupported_format"


class AnimatedImageError(ImageDecodeError):
    code = "animated"


class TruncatedImageError(ImageDecodeError):
    code = "truncated"


class CorruptImageError(ImageDecodeError):
    code = "corrupt"


class UnsupportedModeError(ImageDecodeError):
    code = "unsupported_mode"


class UnreadableImageError(ImageDecodeError):
    code = "unreadable"


def _sniff(head: bytes) -> str | None:
    """Name the image format from its first bytes, or None."""
    for magic, offset, name in _KNOWN_MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456fF":
        return "PPM"
    return None


def _read_source(data: bytes | bytearray | memoryview | str | Path, max_bytes: int) -> tuple[bytes, str]:
    """Return (bytes, label) for bytes or a path; the label names the input in error messages."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        label = "image"
    elif isinstance(data, (str, Path)):
        path = Path(data)
        label = str(path)
        try:
            size = path.stat().st_size
            if path.is_dir():
                raise UnreadableImageError(f"{label}: is a directory, not an image file")
            if size > max_bytes:
                raise ImageTooLargeError(f"{label}: file is {size:,} bytes, over the {max_bytes:,}-byte limit")
            raw = path.read_bytes()
        except ImageDecodeError:
            raise
        except OSError as e:
            raise UnreadableImageError(f"{label}: cannot read ({e.strerror or e})") from None
    else:
        raise TypeError(f"decode_image expects bytes or a path, got {type(data).__name__}")
    if len(raw) == 0:
        raise EmptyImageError(f"{label}: empty input (0 bytes)")
    if len(raw) > max_bytes:
        raise ImageTooLargeError(f"{label}: {len(raw):,} bytes, over the {max_bytes:,}-byte limit")
    return raw, label


def _scale_to_uint8(arr: np.ndarray, *, full_scale: float | None) -> np.ndarray:
    """Map a single-channel int/float array to uint8: by ``full_scale`` when known, else min-max."""
    a = arr.astype(np.float64)
    if full_scale is None:
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    else:
        a = a * (255.0 / full_scale)
    return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any common mode to an RGB uint8 array ``(H, W, 3)``.

    * ``1``/``L``/``P``/``CMYK``/``YCbCr``/``HSV``/``RGB``: Pillow's conversion.
    * ``LA``/``PA``/``RGBA``/``RGBa``/``La`` and palette transparency: composited over white.
    * ``I;16*`` (16-bit): full scale 65535. ``I`` (32-bit int): 16-bit full scale when all values fit in
      0..65535 (Pillow's mode for 16-bit PGM), else min-max. ``F`` (32-bit float): full scale 1.0 when all
      values lie in [0, 1], else min-max.
    """
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float64)  # (H, W)
        g = _scale_to_uint8(arr, full_scale=65535.0)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "I":
        arr = np.asarray(im)
        fits16 = arr.size == 0 or (int(arr.min()) >= 0 and int(arr.max()) <= 65535)
        g = _scale_to_uint8(arr, full_scale=65535.0 if fits16 else None)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        finite = arr[np.isfinite(arr)]
        unit = finite.size == 0 or (float(finite.min()) >= 0.0 and float(finite.max()) <= 1.0)
        g = _scale_to_uint8(arr, full_scale=1.0 if unit else None)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    elif mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"), dtype=np.uint8).copy()
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (ValueError, OSError) as e:
        raise UnsupportedModeError(f"pixel mode {mode!r} cannot be converted to RGB ({e})") from None


def _declared_short(raw: bytes) -> bool:
    """True when a container states a length longer than the data (RIFF/WebP)."""
    if raw[:4] == b"RIFF" and len(raw) >= 8:
        return struct.unpack("<I", raw[4:8])[0] + 8 > len(raw)
    return False


def _ends_complete(raw: bytes) -> bool:
    """True when the data ends with its format's end marker (JPEG EOI), so it is complete: a segment that claims to
    run past the end is then a damaged length field (corrupt), not a cut-off file (truncated)."""
    return raw[:3] == b"\xff\xd8\xff" and raw.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _load_error(e: BaseException, label: str, raw: bytes = b"") -> ImageDecodeError:
    msg = str(e)
    low = msg.lower()
    words = ("truncated", "broken data stream", "end of file", "eof", "not enough data", "buffer")
    if any(s in low for s in words) or _declared_short(raw):
        if _ends_complete(raw):
            return CorruptImageError(f"{label}: damaged image data (the file is complete but a segment or table "
                                     f"runs past its end: {msg})")  # fmt: skip
        return TruncatedImageError(f"{label}: truncated image data ({msg})")
    return CorruptImageError(f"{label}: damaged image data ({msg})")


def decode_image(
    data: bytes | bytearray | memoryview | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_formats: tuple[str, ...] | list[str] | None = DEFAULT_FORMATS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_side: int | None = None,
    exif_transpose: bool = True,
) -> np.ndarray:
    """Decode a still photo to RGB uint8 ``(H, W, 3)``.

    Args:
        data: encoded bytes, or a path to a file.
        max_pixels: refuse images whose header declares more pixels than this (before decoding).
        allow_formats: Pillow format names to accept (``None`` = anything Pillow reads).
        max_bytes: refuse inputs larger than this many bytes.
        max_side: if set, downscale so the longer side is at most this (JPEGs decode at reduced size).
        exif_transpose: apply the EXIF orientation tag.

    Raises:
        ImageDecodeError: a subclass whose ``code`` says what was wrong (see the module docstring).
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    raw, label = _read_source(data, max_bytes)
    formats = None if allow_formats is None else [f.upper() for f in allow_formats]
    with warnings.catch_warnings():
        # Our own cap replaces Pillow's global one; Pillow's bomb *error* (2x its limit) is still mapped below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = _open_checked(raw, label, formats, max_pixels)
        _load_checked(im, raw, label, max_side)
    if exif_transpose:
        try:
            im = ImageOps.exif_transpose(im) or im
        except Exception:  # noqa: BLE001 - a malformed EXIF block must not make a good photo unusable
            pass
    return _downscaled(to_rgb_array(im), max_side)


def _open_checked(raw: bytes, label: str, formats: list[str] | None, max_pixels: int) -> Image.Image:
    """Open (header only) and check what the header declares: a known, allowed format, a size within the pixel
    cap, a still image. Nothing is decoded yet."""
    sniffed = _sniff(raw[:16])
    try:
        im = Image.open(io.BytesIO(raw), formats=formats)
    except Image.DecompressionBombError:  # declared size over twice Pillow's own cap: far over ours too
        raise ImageTooLargeError(
            f"{label}: declared size is over the {max_pixels:,}-pixel limit (a decompression bomb?)"
        ) from None
    except UnidentifiedImageError:
        if sniffed and formats is not None and sniffed not in formats:
            allowed = ", ".join(formats)
            raise UnsupportedFormatError(f"{label}: {sniffed} images are not accepted (allowed: {allowed})") from None
        if sniffed:
            raise CorruptImageError(f"{label}: looks like {sniffed} but its header cannot be parsed") from None
        raise NotAnImageError(f"{label}: not an image (unrecognised data, {len(raw):,} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _load_error(e, label, raw) from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise CorruptImageError(f"{label}: declares an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{label}: {w}x{h} = {w * h:,} pixels, over the {max_pixels:,}-pixel limit")
    fmt = im.format or "?"
    n_frames = getattr(im, "n_frames", 1)
    if fmt != "MPO" and (getattr(im, "is_animated", False) or n_frames > 1):
        # MPO (camera JPEG with a preview frame) is a still photo: its first frame is the picture.
        raise AnimatedImageError(f"{label}: animated {fmt} with {n_frames} frames; send a still photo")
    return im


def _load_checked(im: Image.Image, raw: bytes, label: str, max_side: int | None) -> None:
    """Decode the pixels (JPEGs at reduced size when ``max_side`` allows); a partial image is an error."""
    w, h = im.size
    if max_side is not None and im.format == "JPEG" and max(w, h) > max_side:
        im.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale: far less work and memory
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone relaxed Pillow globally; we never accept partial images
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; refusing to decode untrusted images")
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{label}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise _load_error(e, label, raw) from None


def _downscaled(arr: np.ndarray, max_side: int | None) -> np.ndarray:
    """``arr`` (H, W, 3) resized (Lanczos) so its longer side is at most ``max_side``."""
    if max_side is not None and max(arr.shape[:2]) > max_side:
        hh, ww = arr.shape[:2]
        s = max_side / max(hh, ww)
        size = (max(1, round(ww * s)), max(1, round(hh * s)))
        arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS), dtype=np.uint8)
    return arr
