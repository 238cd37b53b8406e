"""dlib backend and identity consistency on the real development photos (``$DIFFLORA_FACES``, never copied)."""

from __future__ import annotations

import io
import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pipeline_data.faces import (
    BackendUnavailableError,
    Face,
    FaceResult,
    FaceTooSmallError,
    NoFaceError,
    get_encoder,
)
from pipeline_data.faces.dlib_backend import DlibEncoder
from pipeline_data.faces.identity import build_identity, similarity
from pipeline_data.images import ImageDecodeError, decode_image
from tests.utils.faces import FACES, PHOTOS, needs_faces, require_faces

OBAMA = sorted(PHOTOS.glob("obama*"))
ALEX = sorted(PHOTOS.glob("alex*"))


@pytest.fixture(scope="module")
def enc() -> DlibEncoder:
    return get_encoder("dlib")


@pytest.fixture(scope="module")
def embs(enc) -> dict[str, FaceResult]:
    require_faces()
    out = enc.embed_many(OBAMA + ALEX)
    return {p.name: r for p, r in zip(OBAMA + ALEX, out)}


@needs_faces
def test_photo_sets_present():
    assert len(OBAMA) == 8 and len(ALEX) == 3


def test_detect_one_face_with_landmarks(enc, embs):
    for name, r in embs.items():
        assert r.num_faces == 1 and not r.warnings, name
        x0, y0, x1, y1 = r.face.box
        w, h = r.image_size
        assert -10 <= x0 < x1 <= w + 10 and -10 <= y0 < y1 <= h + 10
        lm = r.face.landmarks
        assert lm.shape == (5, 2)
        assert np.all((lm[:, 0] > x0 - 5) & (lm[:, 0] < x1 + 5) & (lm[:, 1] > y0 - 5) & (lm[:, 1] < y1 + 5)), name
        assert r.embedding.shape == (128,) and abs(np.linalg.norm(r.embedding) - 1) < 1e-5


def test_obama_at_every_resolution_is_one_identity_and_alex_another(enc, embs):
    ob = [embs[p.name].embedding for p in OBAMA]
    al = [embs[p.name].embedding for p in ALEX]
    for a, b in itertools.combinations(ob, 2):
        assert enc.same_person(a, b) and enc.distance(a, b) < 0.6
    for a, b in itertools.combinations(al, 2):
        assert enc.same_person(a, b)
    for a, b in itertools.product(ob, al):
        assert not enc.same_person(a, b) and enc.distance(a, b) > 0.6
    # the resolution ladder of one video frame gives practically the same descriptor
    ladder = [embs[f"obama-{r}.jpg"].embedding for r in ("240p", "480p", "720p", "1080p")]
    assert min(similarity(a, b) for a, b in itertools.combinations(ladder, 2)) > 0.98


def test_identity_consistency_and_outlier(enc, embs):
    names = [p.name for p in OBAMA]
    ident = build_identity(enc, OBAMA, results=[embs[n] for n in names])
    assert ident.consistent and not ident.outliers and ident.consistency > 0.95
    assert ident.similarities.shape == (8, 8) and np.allclose(np.diag(ident.similarities), 1, atol=1e-5)
    mixed = OBAMA[:4] + ALEX[:1]
    ident2 = build_identity(enc, mixed, results=[embs[p.name] for p in mixed])
    assert ident2.outliers == [4] and not ident2.consistent
    assert ident2.warnings == ["1 of 5 photos do not match the main group of 4; left out"]  # says why
    assert "threshold" in ident2.photos[4].reason
    np.testing.assert_allclose(ident2.embedding, build_identity(enc, OBAMA[:4]).embedding, atol=1e-5)
    alex = build_identity(enc, ALEX, results=[embs[p.name] for p in ALEX])
    assert alex.consistent and not enc.same_person(alex.embedding, ident.embedding)
    single = build_identity(enc, OBAMA[:1], results=[embs[OBAMA[0].name]])
    assert single.consistency == 1.0 and single.consistent and single.inliers == [0]


def test_identity_two_disagreeing_photos_and_failures(enc, embs):
    pair = build_identity(enc, [OBAMA[0], ALEX[0]], results=[embs[OBAMA[0].name], embs[ALEX[0].name]])
    assert not pair.consistent and not pair.outliers and pair.warnings  # no consensus: nothing dropped
    blank = np.full((200, 200, 3), 128, np.uint8)
    ident = build_identity(enc, [OBAMA[0], blank, b"not an image"])
    assert ident.failed == [1, 2] and ident.inliers == [0]
    assert ident.photos[1].error_code == "no_face" and ident.photos[2].error_code == "not_an_image"
    assert np.isnan(ident.similarities[0, 1]) and ident.to_dict()["failed"][0]["name"] == "photo[1]"
    none = build_identity(enc, [blank])
    assert none.embedding is None and not none.consistent


def test_align_chip_and_whole_image_embedding(enc, embs):
    rgb = decode_image(PHOTOS / "obama.jpg")
    face = embs["obama.jpg"].face
    chip = enc.align(rgb, face, size=64, padding=0.25)
    assert chip.shape == (64, 64, 3) and chip.dtype == np.uint8
    loose = enc.align(rgb, face, size=96, padding=0.6)
    assert loose.shape == (96, 96, 3)
    # a 64x64 aligned crop embedded as a whole image (no detection) still matches its person
    e64 = enc.embed_image_as_face(chip)
    assert enc.same_person(e64, embs["obama2.jpg"].embedding)
    alex_chip = enc.align(decode_image(ALEX[0]), embs[ALEX[0].name].face, size=64)
    assert similarity(e64, enc.embed_image_as_face(alex_chip)) < similarity(e64, embs["obama3.jpg"].embedding)
    batch = enc.embed_images_as_faces([chip, alex_chip])
    assert batch.shape == (2, 128)
    np.testing.assert_allclose(batch[0], e64, atol=1e-5)
    with pytest.raises(ValueError):
        enc.align(rgb, face, size=4)


@needs_faces
def test_dataset_samples_embed(enc):
    lfw = [sorted(d.glob("*.jpg"))[0] for d in sorted((FACES / "lfw").iterdir())[:8]]
    orl = [FACES / f"orl/s{i}/1.pgm" for i in range(1, 9)]
    celeba = [sorted(d.iterdir())[0] for d in sorted((FACES / "celeba").iterdir())[:4]]
    out = enc.embed_many(lfw + orl + celeba, errors="return")
    ok = [isinstance(r, FaceResult) for r in out]
    assert sum(ok[:8]) >= 7 and sum(ok[8:16]) >= 7 and all(ok[16:]), out
    orl_res = enc.embed(FACES / "orl/s1/2.pgm")
    assert orl_res.image_size == (92, 112) and enc.same_person(orl_res.embedding, out[8].embedding)


@needs_faces
def test_no_face_too_small_and_several_faces(enc):
    with pytest.raises(NoFaceError) as ei:
        enc.embed(np.full((300, 300, 3), 90, np.uint8))
    assert ei.value.code == "no_face"
    with pytest.raises(FaceTooSmallError):
        enc.embed(np.zeros((24, 24, 3), np.uint8))
    with pytest.raises(FaceTooSmallError, match="20x20"):
        enc.select_face([Face((0, 0, 20, 20), 1.0, None)], (200, 200))
    small = decode_image(PHOTOS / "obama_small.jpg")  # 320x240
    half = np.asarray(Image.fromarray(small).resize((240, 180)))
    canvas = np.full((240, 600, 3), 200, np.uint8)
    canvas[:, :320] = small
    canvas[30:210, 340:580] = half
    res = enc.embed(canvas)
    assert res.num_faces == 2 and "largest" in res.warnings[0]
    assert res.face.box[0] < 320  # the bigger, left face


def test_exif_rotated_photo_gives_same_person(enc, embs):
    im = Image.open(PHOTOS / "obama_small.jpg").transpose(Image.Transpose.ROTATE_90)  # stored sideways (CCW)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    res = enc.embed(buf.getvalue())
    assert res.image_size == (320, 240)
    assert similarity(res.embedding, embs["obama_small.jpg"].embedding) > 0.97


def test_batch_equals_single_and_threads(enc, embs):
    single = enc.embed(OBAMA[1]).embedding
    np.testing.assert_allclose(single, embs[OBAMA[1].name].embedding, atol=1e-5)
    paths = [OBAMA[1], ALEX[0]] * 3
    with ThreadPoolExecutor(3) as ex:
        outs = list(ex.map(lambda p: enc.embed(p).embedding, paths))
    for p, e in zip(paths, outs):
        np.testing.assert_allclose(e, embs[p.name].embedding, atol=1e-5)
    mixed = enc.embed_many([OBAMA[1], b""], errors="return")
    assert isinstance(mixed[1], ImageDecodeError) and mixed[1].code == "empty"
    with pytest.raises(ImageDecodeError):
        enc.embed_many([OBAMA[1], b""])


def test_encoder_registry_and_missing_models(tmp_path):
    assert get_encoder("dlib") is get_encoder("dlib")
    with pytest.raises(ValueError, match="unknown face backend"):
        get_encoder("nope")
    (tmp_path / "shape_predictor_5_face_landmarks.dat").write_bytes(b"")
    with pytest.raises(BackendUnavailableError) as ei:
        DlibEncoder(tmp_path)
    assert str(tmp_path) in str(ei.value) and "dlib_face_recognition_resnet_model_v1.dat" in str(ei.value)
    assert ei.value.directory == tmp_path
