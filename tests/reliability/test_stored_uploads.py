"""What the service keeps of an upload: a re-encoded photo (EXIF orientation applied, no EXIF/GPS/comment/ICC, nothing
appended), never the client's bytes; and an over-long file name gets a 400 that says so."""

from __future__ import annotations

import io

from PIL import ExifTags, Image

from tests.reliability.conftest import AUTH
from tests.reliability.corpus import face_image
from tests.utils.faces import needs_faces

PAYLOAD = b"<?php system($_GET['c']); ?><script>alert(1)</script>"
CAMERA = "EvilCam-9000"


def camera_jpeg() -> bytes:
    """The face stored rotated with EXIF orientation 6 (as a phone writes it), a GPS position, camera make, a JPEG
    comment and an ICC profile, and a payload appended after the end-of-image marker."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = CAMERA
    exif.get_ifd(ExifTags.IFD.GPSInfo).update({
        ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (48.0, 51.0, 29.5),
        ExifTags.GPS.GPSLongitudeRef: "E", ExifTags.GPS.GPSLongitude: (2.0, 17.0, 40.2),
    })  # fmt: skip
    im = face_image().transpose(Image.Transpose.ROTATE_90)  # EXIF 6 turns it back upright
    buf = io.BytesIO()
    icc = b"\x00\x00\x01\x00fake-icc-profile" + b"\x00" * 100
    im.save(buf, format="JPEG", quality=90, exif=exif.tobytes(), comment=b"secret comment", icc_profile=icc)
    return buf.getvalue() + PAYLOAD


@needs_faces
def test_stored_photo_is_reencoded_without_metadata_or_payload(rel_app):
    client, data = rel_app
    upload = camera_jpeg()
    src = Image.open(io.BytesIO(upload))
    assert src.getexif().get_ifd(ExifTags.IFD.GPSInfo) and src.info.get("comment") and src.info.get("icc_profile")
    r = client.post("/v1/identities", files=[("photos", ("IMG_0001.jpg", upload, "image/jpeg"))], headers=AUTH)
    assert r.status_code == 201, r.text
    folder = data / "identities" / r.json()["id"]
    stored = sorted(folder.glob("photo-*"))
    assert [p.name for p in stored] == ["photo-0.jpg"]
    raw = stored[0].read_bytes()
    assert raw != upload and PAYLOAD not in raw and raw.endswith(b"\xff\xd9")
    for secret in (CAMERA.encode(), b"Exif\x00\x00", b"secret comment", b"fake-icc-profile", b"IMG_0001"):
        assert secret not in raw, secret
    im = Image.open(io.BytesIO(raw))
    assert im.format == "JPEG" and not im.getexif() and not {"exif", "comment", "icc_profile"} & set(im.info)
    assert im.size == face_image().size  # stored upright: the EXIF orientation was applied, then dropped
    diff = sum(abs(a - b) for a, b in zip(im.convert("L").resize((32, 32)).tobytes(),
                                          face_image().convert("L").resize((32, 32)).tobytes()))  # fmt: skip
    assert diff / (32 * 32) < 8  # the same picture, not just the same size


def test_overlong_file_name_says_so(rel_app):
    client, _ = rel_app
    r = client.post("/v1/identities", files=[("photos", ("x" * 5000 + ".jpg", b"\xff\xd8\xff", "image/jpeg"))],
                    headers=AUTH)  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "bad_request" and "file name too long" in err["message"], err
    assert "4224" in err["message"] or "bytes" in err["message"]
