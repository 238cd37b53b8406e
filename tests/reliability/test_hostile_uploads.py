"""Hostile and malformed uploads to ``POST /v1/identities`` through the real, loaded app (tiny world, dlib faces).

Every case of :data:`tests.reliability.corpus.CASES` must get its documented answer (a 4xx naming the problem, or 201
where the upload is legitimately usable), never a 5xx; ``/readyz`` stays 200; files stored on disk never carry
client names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.reliability.conftest import AUTH
from tests.reliability.corpus import CASES, EVIL_NAMES, Case
from tests.utils.faces import needs_faces

# server-generated names: adapter, aligned faces, stored photos, job results (<index:05d>-<k>.png)
STORED = re.compile(r"^(adapter\.safetensors|face-\d+\.png|photo-\d+\.(jpg|png|webp|img)|\d{5}-\d+\.png)$")
DATA_FILES = re.compile(r"^difflora\.sqlite3(-wal|-shm|-journal|\.migrate\.lock)?$")
REPLICA_LOCK = re.compile(r"^[A-Za-z0-9.-]+-\d+-[0-9a-f]{6}\.lock$")  # replicas/<host>-<pid>-<nonce>.lock (SQLite)
CHECKOUT = re.escape(str(Path(__file__).resolve().parents[3]))  # the folder holding this clone (and ../shared)
SERVER_PATH = re.compile(rf"({CHECKOUT}/|/tmp/|/srv/|site-packages|Traceback|File \")")


def test_corpus_is_big_enough():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


@needs_faces
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_upload(rel_app, case: Case):
    client, _ = rel_app
    kw = case.build()
    kw["headers"] = {**AUTH, **kw.get("headers", {})}
    r = client.post("/v1/identities", **kw)
    assert r.status_code < 500, r.text
    assert r.status_code == case.status, r.text
    body = r.json()
    if case.status >= 400:
        err = body["error"]
        assert set(err) >= {"code", "message"} and err["message"], body
        assert err["code"] == case.code, body
        assert not SERVER_PATH.search(r.text), r.text
        if case.photo_code is not None:
            assert err["details"][0]["code"] == case.photo_code, body
            assert err["details"][0]["reason"], body  # a human-readable reason for the photo
    else:
        assert body["id"].startswith("idt_") and body["photos_used"] == case.accepted, body
        for p in body["photos"]:
            assert len(p["filename"]) <= 80 and "/" not in p["filename"] and "\\" not in p["filename"]
            assert not re.search(r"[\x00-\x1f]", p["filename"])
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text


FINETUNE_FILES = re.compile(r"^(job\.json|status\.json|embeddings\.npy|(crop|face)-\d+\.png|photo-\d+\.jpg)$")


@needs_faces
def test_stored_files_never_use_client_names(rel_app):
    """After the corpus ran: every file under data_dir has a server-generated name (ids, face-<k>, photo-<k>)."""
    _, data = rel_app
    idents = list((data / "identities").iterdir())
    assert idents, "the corpus created no identity"
    for path in data.rglob("*"):
        rel = path.relative_to(data)
        assert path.resolve().is_relative_to(data), rel
        if path.is_dir():
            assert rel.parts[0] in ("identities", "results", "tmp", "replicas", "finetunes"), rel
            if rel.parts[0] in ("identities", "finetunes") and len(rel.parts) == 2:
                assert re.fullmatch(r"(idt|ftj)_[0-9a-f]{24}", rel.parts[1]), rel
            continue
        if rel.parts[0] == "finetunes":  # fine-tune jobs (service/finetune.py)
            assert FINETUNE_FILES.match(path.name), rel
            continue
        if rel.parts[0] == "replicas":
            assert len(rel.parts) == 2 and REPLICA_LOCK.match(path.name), rel
            continue
        assert STORED.match(path.name) or (len(rel.parts) == 1 and DATA_FILES.match(path.name)), rel
    names = " ".join(str(p) for p in data.rglob("*"))
    for evil in EVIL_NAMES.values():
        stem = re.split(r"[\\/]", evil)[-1][:12]
        assert stem not in names
    assert not any((data / "tmp").iterdir()), "staging left files behind"
