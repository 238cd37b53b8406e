"""``difflora faces embed|check``: output, exit codes and one-line errors (no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_data.faces.cli import main
from tests.utils.faces import FACES, PHOTOS, needs_faces

REPO = Path(__file__).resolve().parents[2]


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@needs_faces
def test_embed_json_one_object_per_photo_and_identity(capsys):
    photos = [PHOTOS / "obama-240p.jpg", PHOTOS / "obama2.jpg", PHOTOS / "alex_lacamoire1.jpg"]
    assert main(["embed", *map(str, photos), "--json"]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [d["type"] for d in lines] == ["photo"] * 3 + ["identity"]
    assert all(len(d["embedding"]) == 128 and d["ok"] for d in lines[:3])
    ident = lines[3]
    assert ident["backend"] == "dlib" and len(ident["embedding"]) == 128
    assert [o["name"] for o in ident["outliers"]] == [str(photos[2])] and not ident["consistent"]
    assert lines[2]["outlier"] and "threshold" in lines[2]["reason"]


@needs_faces
def test_embed_recognizer_dlib_and_torch_give_the_same_descriptor(capsys):
    photo = str(PHOTOS / "obama-240p.jpg")
    embs = []
    for rec in ("dlib", "torch"):
        assert main(["embed", photo, "--recognizer", rec, "--json"]) == 0
        embs.append(json.loads(capsys.readouterr().out.splitlines()[0])["embedding"])
    assert max(abs(a - b) for a, b in zip(*embs)) < 1e-4
    assert main(["embed", photo, "--recognizer", "dlib"]) == 0
    assert "(dlib (dlib net), threshold 0.908)" in capsys.readouterr().out
    assert main(["embed", photo]) == 0
    assert "(dlib (torch net), threshold 0.908)" in capsys.readouterr().out


@needs_faces
def test_embed_table(capsys):
    assert main(["embed", str(PHOTOS / "obama.jpg"), str(PHOTOS / "obama3.jpg")]) == 0
    out = capsys.readouterr().out
    assert "obama.jpg: face [" in out and "identity: 2 of 2 photos used" in out and "NOT" not in out


@pytest.mark.parametrize(
    ("args", "rc", "needle"),
    [
        (["embed", "{txt}"], 1, "not_an_image"),
        (["embed", "{empty}"], 1, "empty"),
        (["embed", "{blank}"], 1, "no_face"),
        (["embed", "{missing}"], 2, "no such file"),
        (["embed", "{blank}", "--backend", "insightface", "--model-dir", "{missing}"], 2, "not found"),
        (["embed", "{blank}", "--backend", "nope"], 2, "invalid choice"),
        (["embed", "{blank}", "--recognizer", "nope"], 2, "invalid choice"),
        (
            ["check", "{tmp}", "--backend", "insightface", "--recognizer", "dlib"],
            2,
            "--recognizer applies to the dlib backend, not insightface",
        ),
        (["embed"], 2, "required"),
        (["check", "{missing}"], 2, "not a directory"),
        (["check", "{emptydir}"], 2, "no photos"),
        (["embed", "{emptydir}"], 2, "is a folder, not a photo"),
        (["embed", "{blank}", "{tmp}"], 2, "is a folder, not a photo"),
        (["check", "{tmp}", "--max-photos", "-1"], 2, "argument --max-photos: must be >= 0, got -1"),
        (["check", "{tmp}", "--max-photos", "two"], 2, "argument --max-photos: expected an integer"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_bad_input_one_line_nonzero(tmp_path, capsys, args, rc, needle):
    from PIL import Image

    (tmp_path / "note.txt").write_text("not a photo")
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (120, 120), (90, 90, 90)).save(tmp_path / "blank.png")
    (tmp_path / "emptydir").mkdir()
    subst = {
        "{txt}": str(tmp_path / "note.txt"),
        "{empty}": str(tmp_path / "empty.jpg"),
        "{blank}": str(tmp_path / "blank.png"),
        "{missing}": str(tmp_path / "missing"),
        "{emptydir}": str(tmp_path / "emptydir"),
        "{tmp}": str(tmp_path),  # a folder holding one photo (blank.png)
    }
    assert main([subst.get(a, a) for a in args]) == rc
    line = _one_line(capsys.readouterr().err)
    assert needle in line and line.startswith("difflora faces")


@needs_faces
def test_check_reports_outlier_with_progress(tmp_path, capsys):
    # identity folders made of symlinks to the shared photos (nothing is copied)
    a, b = tmp_path / "obama", tmp_path / "alex"
    a.mkdir(), b.mkdir()
    for p in [
        PHOTOS / "obama-240p.jpg",
        PHOTOS / "obama_small.jpg",
        PHOTOS / "obama2.jpg",
        PHOTOS / "alex-lacamoire.png",
    ]:
        (a / p.name).symlink_to(p)
    for p in sorted(PHOTOS.glob("alex*"))[:2]:
        (b / p.name).symlink_to(p)
    assert main(["check", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    assert "outlier alex-lacamoire.png" in cap.out
    assert "faces check" in cap.err and "2 identities, 6 photos" in cap.err  # tqdm bar + summary on stderr
    assert main(["check", str(tmp_path), "--json", "--no-progress"]) == 0
    rows = {d["identity"]: d for d in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["alex"]["consistent"] and rows["obama"]["outliers"][0]["name"] == "alex-lacamoire.png"


@needs_faces
def test_check_orl_pgm_folders(tmp_path, capsys):
    for d in sorted((FACES / "orl").glob("s*"))[:6]:  # a symlinked subset keeps the test fast
        (tmp_path / d.name).symlink_to(d)
    assert main(["check", str(tmp_path), "--max-photos", "2", "--json", "--no-progress"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6 and sum(r["consistent"] for r in rows) >= 5
    assert all(r["num_photos"] == 2 for r in rows)


def test_console_script_subprocess_no_traceback(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from service.cli import main; sys.exit(main())",
            "faces",
            "embed",
            str(bad),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode != 0
    line = _one_line(proc.stderr)
    assert "bad.jpg" in line and "[" in line
