"""Photo folders: the one suffix list, and where the development photos are found."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_data.images import DEFAULT_FORMATS
from pipeline_data.photos import FACES_ENV, PHOTO_SUFFIXES, faces_dir, faces_missing, list_photos


def test_list_photos_keeps_photo_files_only_sorted(tmp_path: Path) -> None:
    for name in ["b.JPG", "a.png", "c.webp", "d.pgm", "e.ppm", "f.jpeg", "notes.txt", "g.gif", "h.bmp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.jpg").mkdir()  # a folder named like a photo is not a photo
    assert [p.name for p in list_photos(tmp_path)] == ["a.png", "b.JPG", "c.webp", "d.pgm", "e.ppm", "f.jpeg"]


def test_suffixes_match_the_decoder_formats() -> None:
    from PIL import Image

    formats = {Image.registered_extensions()[s] for s in PHOTO_SUFFIXES}
    assert formats == set(DEFAULT_FORMATS)  # every listed suffix decodes, every decodable format is listed


@pytest.mark.parametrize("env", [None, "", "/elsewhere/faces"])
def test_faces_dir_reads_the_environment(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    if env is None:
        monkeypatch.delenv(FACES_ENV, raising=False)
    else:
        monkeypatch.setenv(FACES_ENV, env)
    repo = Path(__file__).resolve().parents[2]
    assert faces_dir() == (Path(env) if env else repo.parent / "shared" / "data" / "faces")


def test_missing_photos_give_one_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(FACES_ENV, str(tmp_path))
    assert str(tmp_path) in faces_missing() and FACES_ENV in faces_missing()
    (tmp_path / "photos").mkdir()
    assert faces_missing() is None
