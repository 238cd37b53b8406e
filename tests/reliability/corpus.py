"""The hostile-upload corpus: every case is generated in memory from one real face photo (never copied into the repo).

A :class:`Case` says what to post to ``POST /v1/identities`` and what the service must answer: the HTTP status, the
top-level error code and, for a refused photo, the per-photo code in ``error.details[0].code``. Shared by
``tests/reliability/test_hostile_uploads.py`` (in-process) and ``bench/reliability.py`` (a real server).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from PIL import Image, ImageOps

from pipeline_data.photos import faces_dir

PHOTOS = faces_dir() / "photos"
FACE = PHOTOS / "obama.jpg"  # one clear frontal face
OTHER = PHOTOS / "alex_lacamoire_img1.jpg"  # a second person (several-faces collage)
SIDE = 320  # face photos are downscaled to this longest side: fast face detection on a shared CPU
MAX_BODY = 4 * 1024 * 1024  # the body cap the corpus assumes (oversize case sends more)
MAX_PHOTOS = 10  # the service default


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], dict]  # -> httpx request kwargs for client.post("/v1/identities", **kw)
    status: int  # expected HTTP status
    code: str | None = None  # expected error.code (None for 2xx)
    photo_code: str | None = None  # expected error.details[0].code (a refused photo)
    accepted: int | None = None  # for 201: photos_used
    notes: str = field(default="", compare=False)


# ---------------------------------------------------------------- image builders (cached: built once per process)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@cache
def face_image() -> Image.Image:
    im = ImageOps.exif_transpose(Image.open(FACE)).convert("RGB")
    im.thumbnail((SIDE, SIDE))
    return im


@cache
def face_jpeg() -> bytes:
    return _encode(face_image(), "JPEG", quality=90)


def face_png() -> bytes:
    return _encode(face_image(), "PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 14_000) -> bytes:
    """A real, complete 1-bit PNG of side x side zero pixels: a few tens of KB that decode to ``side**2`` pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_huge_header(w: int = 100_000, h: int = 100_000) -> bytes:
    """A PNG that declares w x h RGB pixels but carries a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_bomb(w: int = 60_000, h: int = 60_000) -> bytes:
    """The small face JPEG with its SOF header patched to declare w x h (3.6 G pixels): decoding would allocate
    gigabytes of pixel buffer from 20 KB of data."""
    data = bytearray(_encode(Image.new("L", (64, 64), 128), "JPEG"))
    i = 2
    while i < len(data):
        marker, seglen = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", h, w)
            return bytes(data)
        i += 2 + seglen
    raise AssertionError("no SOF marker")


def png_bad_crc() -> bytes:
    data = bytearray(face_png())
    data[29] ^= 0xFF  # IHDR CRC (8 magic + 4 len + 4 type + 13 data = 29)
    return bytes(data)


def jpeg_corrupt_header() -> bytes:
    data = bytearray(face_jpeg())
    i = data.index(b"\xff\xdb")  # first quantization table: destroy it
    data[i + 2 : i + 40] = b"\xff" * 38
    return bytes(data)


def png_text_bomb() -> bytes:
    """A valid small PNG with a zTXt chunk that inflates to 100 MB (over Pillow's MAX_TEXT_CHUNK)."""
    png = _encode(Image.new("RGB", (8, 8)), "PNG")
    comp = zlib.compressobj(9)
    payload = b"".join(comp.compress(b"A" * (1 << 20)) for _ in range(100)) + comp.flush()
    ztxt = _png_chunk(b"zTXt", b"Comment\x00\x00" + payload)
    return png[:33] + ztxt + png[33:]


def face_with_exif(orientation: int) -> bytes:
    """The face stored so that applying EXIF ``orientation`` shows it upright (what a phone camera writes)."""
    inverse = {
        1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
    }[orientation]  # fmt: skip
    im = face_image() if inverse is None else face_image().transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(im, "JPEG", quality=90, exif=exif.tobytes())


def face_rotated_without_exif() -> bytes:
    return _encode(face_image().transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90)


def face_16bit_png() -> bytes:
    import numpy as np

    g = np.asarray(face_image().convert("L"), dtype=np.uint16) * 257  # (H, W) full 16-bit range
    return _encode(Image.fromarray(g), "PNG")


def face_32bit_float_pfm() -> bytes:
    import numpy as np

    f = np.asarray(face_image().convert("L"), dtype=np.float32) / 255.0  # (H, W) in [0, 1]
    return _encode(Image.fromarray(f), "PPM")


def face_cmyk_jpeg() -> bytes:
    return _encode(face_image().convert("CMYK"), "JPEG", quality=90)


def face_tiff_float() -> bytes:
    return _encode(face_image().convert("F"), "TIFF")


def _frames(n: int = 3) -> list[Image.Image]:
    base = face_image()
    return [base.rotate(10 * k) for k in range(n)]


def animated(fmt: str) -> bytes:
    fr = _frames()
    kw = {"save_all": True, "append_images": fr[1:], "duration": 100, "loop": 0}
    return _encode(fr[0].convert("P") if fmt == "GIF" else fr[0], fmt, **kw)


def no_face() -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)  # (H, W, 3)
    return _encode(Image.fromarray(noise), "JPEG", quality=90)


def collage(*paths: Path, tiny: int | None = None) -> bytes:
    """Faces side by side on a grey canvas; with ``tiny`` one face shrunk to that many pixels wide."""
    ims = []
    for p in paths:
        im = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        im.thumbnail((tiny or SIDE, tiny or SIDE))
        ims.append(im)
    canvas = Image.new("RGB", (max(SIDE, sum(i.width for i in ims) + 20), SIDE), (128, 128, 128))
    x = 10
    for im in ims:
        canvas.paste(im, (x, (SIDE - im.height) // 2))
        x += im.width
    return _encode(canvas, "JPEG", quality=90)


def jpeg_html_polyglot() -> bytes:
    """A valid face JPEG with an HTML/script payload appended after EOI (browsers sniffing it see HTML)."""
    return face_jpeg() + b"<html><script>alert(document.cookie)</script></html>"


def gif_js_polyglot() -> bytes:
    """``GIF89a`` header that is also a JavaScript expression (the classic GIFAR/JS polyglot)."""
    return b"GIF89a/*\x01\x00\x01\x00\x00\x00\x00;*/=1;alert(1);//" + b"\x00" * 16


# ---------------------------------------------------------------- request builders


def one(data_fn: Callable[[], bytes], filename: str = "photo.jpg", ctype: str = "image/jpeg") -> Callable[[], dict]:
    return lambda: {"files": [("photos", (filename, data_fn(), ctype))]}


def refused(name: str, data_fn: Callable[[], bytes], photo_code: str, **kw) -> Case:
    """A single photo that the decoder / face finder must refuse: 422 no_usable_face naming the photo's problem."""
    return Case(name, one(data_fn, **kw), 422, "no_usable_face", photo_code)


def accepted(name: str, data_fn: Callable[[], bytes], n: int = 1, **kw) -> Case:
    return Case(name, one(data_fn, **kw), 201, accepted=n)


def _many(n: int) -> dict:
    return {"files": [("photos", (f"p{i}.jpg", face_jpeg(), "image/jpeg")) for i in range(n)]}


def _multipart_bad_boundary() -> dict:
    body = b'--abc\r\nContent-Disposition: form-data; name="photos"; filename="a.jpg"\r\n\r\nxx'  # never closed
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=zzz"}}


EVIL_NAMES = {
    "path_traversal_posix": "../../../../etc/passwd.jpg",
    "path_traversal_windows": "..\\..\\windows\\system32\\evil.jpg",
    "absolute_path": "/srv/difflora/identities/evilabs.jpg",
    "long_name_300": "evillong" + "a" * 300 + ".jpg",
    "control_chars_name": "evil\r\nX-Injected: 1\x00.jpg",
    "unicode_rtl_name": "evil\u202egpj.exe",
}


CASES: list[Case] = [
    # --- not an image / broken
    refused("zero_bytes", lambda: b"", "empty"),
    refused("text_renamed_jpg", lambda: b"hello, I am a text file\n" * 20, "not_an_image", ctype="text/plain"),
    refused(
        "html_renamed_jpg",
        lambda: b"<!doctype html><html><body><script>alert(1)</script></body></html>",
        "not_an_image",
    ),  # fmt: skip
    refused("random_bytes", lambda: bytes(range(256)) * 64, "not_an_image", ctype="application/octet-stream"),
    refused("truncated_jpeg", lambda: face_jpeg()[: len(face_jpeg()) // 2], "truncated"),
    refused("truncated_png", lambda: face_png()[: len(face_png()) // 2], "truncated", filename="p.png"),
    refused("jpeg_magic_only", lambda: b"\xff\xd8\xff", "corrupt"),
    refused("png_bad_crc", png_bad_crc, "corrupt", filename="p.png"),
    refused("jpeg_corrupt_tables", jpeg_corrupt_header, "corrupt"),
    refused("png_magic_then_html", lambda: b"\x89PNG\r\n\x1a\n<html>hi</html>", "corrupt", filename="p.png"),
    # --- resource bombs and huge declared sizes
    refused("png_decompression_bomb_14k", png_bomb, "too_large", filename="bomb.png"),
    refused("jpeg_decompression_bomb_60k", jpeg_bomb, "too_large"),
    refused("png_huge_declared_100k", png_huge_header, "too_large", filename="huge.png"),
    refused("png_ztxt_text_bomb", png_text_bomb, "corrupt", filename="t.png"),
    # --- formats and modes
    refused("gif_static", lambda: _encode(face_image().convert("P"), "GIF"), "unsupported_format", filename="a.gif"),
    refused("gif_animated", lambda: animated("GIF"), "unsupported_format", filename="a.gif"),
    refused("png_animated_apng", lambda: animated("PNG"), "animated", filename="a.png"),
    refused("webp_animated", lambda: animated("WEBP"), "animated", filename="a.webp"),
    refused("tiff_32bit_float", face_tiff_float, "unsupported_format", filename="a.tif"),
    refused("bmp", lambda: _encode(face_image(), "BMP"), "unsupported_format", filename="a.bmp"),
    refused("gif_js_polyglot", gif_js_polyglot, "unsupported_format"),
    accepted("png_16bit_grey", face_16bit_png, filename="a.png"),
    accepted("pfm_32bit_float", face_32bit_float_pfm, filename="a.pfm"),
    accepted("jpeg_cmyk", face_cmyk_jpeg),
    accepted("webp_still", lambda: _encode(face_image(), "WEBP"), filename="a.webp"),
    accepted("jpeg_html_polyglot", jpeg_html_polyglot),
    # --- EXIF orientation 1..8: every one upright after transpose, so every one has a face
    *[accepted(f"exif_orientation_{o}", lambda o=o: face_with_exif(o)) for o in range(1, 9)],
    # --- faces
    refused("no_face_noise", no_face, "no_face"),
    refused("face_rotated_90_no_exif", face_rotated_without_exif, "no_face"),
    refused("tiny_face_16px", lambda: collage(FACE, tiny=16), "no_face"),
    accepted("several_faces", lambda: collage(FACE, OTHER)),
    Case(
        "face_plus_garbage",
        lambda: {
            "files": [
                ("photos", ("a.jpg", face_jpeg(), "image/jpeg")),
                ("photos", ("b.jpg", b"garbage", "image/jpeg")),
            ]
        },
        201,
        accepted=1,
    ),
    # --- client file names (must never reach the disk)
    *[accepted(f"name_{k}", face_jpeg, filename=v) for k, v in EVIL_NAMES.items()],
    # --- request shape
    Case(
        "name_5000_chars",
        one(face_jpeg, filename="x" * 5000 + ".jpg"),
        400,
        "bad_request",
        notes="the multipart parser refuses the over-long part header; the message says the file name is too long",
    ),  # fmt: skip
    Case("too_many_files", lambda: _many(MAX_PHOTOS + 1), 422, "too_many_photos"),
    Case("no_files", lambda: {"data": {"name": "x"}}, 422, "invalid_request"),
    Case(
        "wrong_field_name",
        lambda: {"files": [("photo", ("a.jpg", face_jpeg(), "image/jpeg"))]},
        422,
        "invalid_request",
    ),  # fmt: skip
    Case("name_too_long", lambda: {"files": _many(1)["files"], "data": {"name": "n" * 500}}, 422, "invalid_request"),
    Case(
        "oversize_body",
        lambda: {"files": [("photos", ("big.jpg", b"\xff\xd8\xff" + b"\0" * MAX_BODY, "image/jpeg"))]},
        413,
        "payload_too_large",
    ),  # fmt: skip
    Case(
        "content_type_json",
        lambda: {
            "content": json.dumps({"photos": ["/etc/passwd"]}).encode(),
            "headers": {"content-type": "application/json"},
        },
        422,
        "invalid_request",
    ),
    Case(
        "content_type_text",
        lambda: {"content": b"photos=1", "headers": {"content-type": "text/plain"}},
        422,
        "invalid_request",
    ),  # fmt: skip
    Case("content_type_urlencoded", lambda: {"data": {"photos": "/etc/passwd"}}, 422, "invalid_request"),
    Case("multipart_unterminated", _multipart_bad_boundary, 400, "bad_request"),
    accepted("part_content_type_lies", face_jpeg, ctype="text/html"),
]
