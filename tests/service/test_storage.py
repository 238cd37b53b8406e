"""The storage on both backends (SQLite in the data directory, a real PostgreSQL server): the schema and its
migrations (a database made by the pre-migration code keeps its data), job leases and takeovers, idempotent
results, concurrent claims from several replicas, files shared through the data directory, pagination."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from service.db import head
from service.storage import Storage, new_id

IDT = "idt_" + "b" * 24

# the schema exactly as service/storage.py created it before migrations existed (a frozen copy: the test must keep
# proving that such a data directory still opens)
LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    id TEXT PRIMARY KEY, created REAL NOT NULL, name TEXT NOT NULL DEFAULT '', info TEXT NOT NULL,
    embeddings BLOB NOT NULL, num_embeddings INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL, status TEXT NOT NULL, request TEXT NOT NULL,
    request_hash TEXT NOT NULL, idempotency_key TEXT UNIQUE, total INTEGER NOT NULL, error TEXT, started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS job_items (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, identity_id TEXT NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL, error TEXT, seconds REAL, PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, k INTEGER NOT NULL, seed INTEGER NOT NULL, file TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (job_id, idx, k)
);
"""


@pytest.fixture()
def replicas(tmp_path, database_url):
    """``make(lease_s)`` opens another replica's Storage on the same data directory and database."""
    opened: list[Storage] = []

    def make(lease_s: float = 30.0) -> Storage:
        s = Storage(tmp_path / "data", database_url, lease_s=lease_s)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def _identity(s: Storage, ident: str = IDT, tenant: str = "default", created: float = 1.0) -> str:
    from service.storage import IdentityRecord

    if not s.identity_exists(ident):
        staged = s.staging_dir()
        (staged / "adapter.safetensors").write_bytes(b"adapter of " + ident.encode())
        s.add_identity(IdentityRecord(ident, created, "n", {}, b"\7" * 8, 1, tenant=tenant), staged)
    return ident


def _job(s: Storage, n: int = 3, key: str | None = None) -> str:
    _identity(s)  # results are kept only for identities that exist
    jid, created = s.create_job(new_id("job"), {"n": n}, f"hash{n}", [(IDT, f"p{i}", i) for i in range(n)], key)
    assert created
    return jid


def _result_rows(s: Storage, jid: str) -> list[tuple[int, int]]:
    return [(r["idx"], r["k"]) for r in s.job_results(jid)[0] if r["k"] is not None]


def test_schema_is_at_head_and_upgrade_is_idempotent(replicas):
    from service.db import revision, upgrade

    s = replicas()
    assert revision(s.engine) == head()
    assert upgrade(s.engine) == (head(), head())


def test_claim_is_exclusive_and_results_are_written_once(replicas):
    a, b = replicas(), replicas()
    jid = _job(a, 2)
    assert a.claim_job() == jid
    assert b.claim_job() is None  # a holds a live lease
    job = a.get_job(jid)
    assert job["status"] == "running" and job["lease_owner"] == a.owner and job["attempts"] == 1
    assert a.complete_item(jid, 0, [b"one", b"two"], [5, 6], 0.1)
    assert a.complete_item(jid, 0, [b"one", b"two"], [5, 6], 0.1)  # re-run of the same item: same rows
    assert _result_rows(a, jid) == [(0, 0), (0, 1)]
    assert b.result_file(jid, 0, 1).read_bytes() == b"two"  # the other replica reads the shared file
    assert a.finish_job(jid, "succeeded") is True
    assert a.get_job(jid)["lease_owner"] is None and b.claim_job() is None


def test_expired_lease_is_taken_over_and_every_result_stays_once(replicas):
    dead, alive = replicas(lease_s=1.0), replicas(lease_s=1.0)
    jid = _job(dead, 3)
    assert dead.claim_job() == jid
    assert dead.complete_item(jid, 0, [b"x"], [0], 0.1)
    time.sleep(1.1)  # the dead replica stopped renewing its lease
    assert alive.claim_job() == jid
    job = alive.get_job(jid)
    assert job["lease_owner"] == alive.owner and job["attempts"] == 2
    assert [it["idx"] for it in alive.pending_items(jid)] == [1, 2]  # the finished item is not redone
    # the old owner wakes up and finishes item 1 while the new one does too: both writes land on the same rows
    assert dead.complete_item(jid, 1, [b"y"], [1], 0.1) is False  # ... and it learns that the job is not its own
    assert dead.heartbeat() == set()
    for idx in (1, 2):
        assert alive.complete_item(jid, idx, [b"y"], [idx], 0.1)
    assert dead.finish_job(jid, "succeeded") is False
    assert alive.finish_job(jid, "succeeded") is True
    assert _result_rows(alive, jid) == [(0, 0), (1, 0), (2, 0)]


def test_heartbeat_renews_the_lease(replicas):
    a, b = replicas(lease_s=1.0), replicas(lease_s=1.0)
    jid = _job(a)
    assert a.claim_job() == jid
    for _ in range(3):
        time.sleep(0.4)
        assert a.heartbeat() == {jid}
        assert b.claim_job() is None
    assert a.get_job(jid)["lease_expires"] > time.time() + 0.5


def test_release_gives_the_job_to_another_replica_at_once(replicas):
    a, b = replicas(), replicas()
    jid = _job(a)
    assert a.claim_job() == jid
    assert a.release_job(jid) and a.get_job(jid)["status"] == "queued"
    assert b.claim_job() == jid


def test_cancel_drops_the_lease(replicas):
    a = replicas()
    jid = _job(a)
    assert a.claim_job() == jid
    assert a.set_job_status(jid, "canceled", only_from=("queued", "running"))
    assert a.heartbeat() == set() and a.get_job(jid)["lease_owner"] is None
    assert a.finish_job(jid, "succeeded") is False and a.job_status(jid) == "canceled"


def test_concurrent_claims_by_many_replicas_never_share_a_job(replicas):
    stores = [replicas() for _ in range(4)]
    ids = {_job(stores[0], 1) for _ in range(12)}
    got: list[str] = []
    lock = threading.Lock()

    def worker(s: Storage) -> None:
        while (jid := s.claim_job()) is not None:
            with lock:
                got.append(jid)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(ids)  # every job claimed, none twice


def test_same_idempotency_key_from_two_replicas_is_one_job(replicas):
    a, b = replicas(), replicas()
    out: list[tuple[str, bool]] = []
    items = [(IDT, "p", 0)]
    threads = [
        threading.Thread(target=lambda s=s: out.append(s.create_job(new_id("job"), {}, "h", items, "the-key")))
        for s in (a, b, a, b)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len({jid for jid, _ in out}) == 1 and sum(created for _, created in out) == 1
    with pytest.raises(ValueError, match="idempotency_mismatch"):
        a.create_job(new_id("job"), {}, "other", items, "the-key")


def test_list_identities_pages_with_a_cursor(replicas):
    from service.storage import IdentityRecord

    s = replicas()
    ids = []
    for i in range(5):
        rec = IdentityRecord(new_id("idt"), 1000.0 + i // 2, f"n{i}", {"i": i}, b"\0" * 8, 1)  # ties on created
        staged = s.staging_dir()
        s.add_identity(rec, staged)
        ids.append(rec.id)
    seen, cursor = [], None
    while True:
        page, cursor = s.list_identities(limit=2, cursor=cursor)
        seen += [r.id for r in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    assert seen == [r.id for r in s.list_identities(limit=10)[0]]
    with pytest.raises(ValueError, match="invalid cursor"):
        s.list_identities(cursor="not-a-cursor")


def test_sweep_spares_what_another_live_replica_may_be_writing(replicas):
    a = replicas()
    staged = a.staging_dir()
    orphan = a.root / "identities" / new_id("idt")
    orphan.mkdir()
    b = replicas()  # another live replica: a's fresh staging folder and unclaimed identity folder may be its work
    assert b.sweep() == 0 and staged.exists() and orphan.exists()
    assert b.sweep(min_age_s=0) == 2 and not staged.exists() and not orphan.exists()
    a.close()
    leftover = b.staging_dir()
    assert b.live_replicas() == [b.owner]
    assert b.sweep() == 1 and not leftover.exists()  # alone: everything left over goes at once


def test_paths_in_the_database_are_relative(replicas):
    s = replicas()
    jid = _job(s, 1)
    s.claim_job()
    s.complete_item(jid, 0, [b"png"], [0], 0.1)
    (row,), _ = s.job_results(jid)
    assert row["file"] == f"results/{jid}/00000-0.png"
    for bad in ("/etc/passwd", "../outside.png", "results/../../x", ""):
        assert s.resolve(bad) is None, bad


def test_db_upgrade_command(tmp_path, database_url, capsys):
    from service.dbcli import main

    args = ["--data-dir", str(tmp_path)] + (["--database-url", database_url] if database_url else [])
    assert main(["upgrade", *args]) == 0
    assert f"upgraded from empty to revision {head()}" in capsys.readouterr().out
    assert main(["upgrade", *args]) == 0
    assert f"already at revision {head()}" in capsys.readouterr().out
    assert main(["current", *args]) == 0
    out = capsys.readouterr().out
    assert f"revision {head()}, newest {head()}" in out and (database_url is None or "***" in out or "@" in out)


def test_db_command_errors_are_one_line(tmp_path, capsys):
    from service.dbcli import main

    assert main(["upgrade", "--database-url", "mysql://x@y/z"]) == 2
    assert "--database-url: database_url must be postgresql://" in capsys.readouterr().err
    assert main(["upgrade", "--database-url", "postgresql://u:secret@127.0.0.1:1/x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("difflora db: cannot use postgresql+psycopg://u:***@127.0.0.1:1/x") and "secret" not in err


def test_a_store_refuses_an_old_schema_without_migrating(tmp_path):
    db = sqlite3.connect(tmp_path / "difflora.sqlite3")
    db.executescript(LEGACY_SCHEMA)
    db.close()
    with pytest.raises(RuntimeError, match="schema revision 0001, this code needs .*difflora db upgrade"):
        Storage(tmp_path, migrate=False)


def test_a_data_directory_made_before_migrations_keeps_working(tmp_path):
    """A database created by the pre-migration code, with an identity, a finished job with results and a job left
    'running' by a crash: opening it migrates in place, keeps every row, and the interrupted job is resumed."""
    data = tmp_path / "old"
    (data / "identities" / IDT).mkdir(parents=True)
    (data / "results").mkdir()
    db = sqlite3.connect(data / "difflora.sqlite3")
    db.executescript(LEGACY_SCHEMA)
    db.execute("INSERT INTO identities VALUES (?,?,?,?,?,?)", (IDT, 1.0, "old", '{"photos": []}', b"\1" * 8, 1))
    done, crashed = "job_" + "d" * 24, "job_" + "e" * 24
    for jid, status in ((done, "succeeded"), (crashed, "running")):
        db.execute(
            "INSERT INTO jobs (id, created, updated, status, request, request_hash, idempotency_key, total) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (jid, 2.0, 2.0, status, "{}", "h", f"key-{status}", 2),
        )
        for idx in range(2):
            item = "done" if status == "succeeded" or idx == 0 else "pending"
            db.execute("INSERT INTO job_items VALUES (?,?,?,?,?,?,?,?)", (jid, idx, IDT, "p", idx, item, None, 1.0))
    db.execute("INSERT INTO results VALUES (?,?,?,?,?,?)", (done, 0, 0, 0, f"results/{done}/00000-0.png", 3.0))
    db.execute(
        "INSERT INTO results VALUES (?,?,?,?,?,?)", (done, 1, 0, 1, f"/srv/old/results/{done}/00001-0.png", 3.0)
    )
    db.commit()
    db.close()
    s = Storage(data)
    try:
        from service.db import revision

        assert revision(s.engine) == head()
        assert s.get_identity(IDT).name == "old" and s.get_identity(IDT).embeddings == b"\1" * 8
        assert s.get_job(done)["status"] == "succeeded" and s.get_job(done)["done"] == 2
        assert [r["file"] for r in s.job_results(done)[0]] == [f"results/{done}/0000{i}-0.png" for i in range(2)]
        assert s.create_job(new_id("job"), {}, "h", [], "key-running") == (crashed, False)  # keys survive
        assert s.claim_job() == crashed  # left 'running' without a lease: resumed
        assert [it["idx"] for it in s.pending_items(crashed)] == [1]
    finally:
        s.close()
    assert Path(data / "difflora.sqlite3").is_file()


def test_sqlite_job_of_a_killed_replica_is_taken_over_at_once(tmp_path):
    """SQLite replicas share one machine: a replica killed with -9 drops its lock file's lock at once, so its
    running job is taken over without waiting for the lease."""
    import signal
    import subprocess
    import sys

    s = Storage(tmp_path, lease_s=3600)
    jid = _job(s, 1)
    code = (
        "import sys, time; from service.storage import Storage; "
        f"s = Storage({str(tmp_path)!r}, lease_s=3600); print(s.claim_job(), flush=True); time.sleep(600)"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == jid
        assert s.claim_job() is None  # its owner is alive
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert s.claim_job() == jid and s.get_job(jid)["attempts"] == 2
    finally:
        proc.kill()
        s.close()


# ---- tenants, lists, idempotent identities, deletion and retention --------------------------------------------------
def _pages(fetch, limit: int) -> list[str]:
    """Every id of a paginated list, following next cursors; each page at most ``limit`` long."""
    seen, cursor = [], None
    while True:
        page, cursor = fetch(limit, cursor)
        assert len(page) <= limit
        seen += [p.id if hasattr(p, "id") else p["id"] for p in page]
        if cursor is None:
            return seen


@pytest.mark.parametrize("limit", [1, 2, 3, 100])
def test_lists_are_stable_pages_per_tenant(replicas, limit):
    """Identities and jobs page in (created, id) order, ties on created included, each tenant sees its own, None
    (admin) sees all; a cursor of one list is no cursor of another."""
    s = replicas()
    made: dict[str, list[str]] = {"alice": [], "bob": []}
    for i in range(5):
        tenant = "alice" if i % 2 == 0 else "bob"
        made[tenant].append(_identity(s, new_id("idt"), tenant, created=1000.0 + i // 2))  # ties on created
    ordered = [r.id for r in sorted(s.list_identities(100)[0], key=lambda r: (r.created, r.id))]
    for tenant, ids in (*made.items(), (None, ordered)):
        got = _pages(lambda n, c, t=tenant: s.list_identities(n, c, t), limit)
        assert got == [i for i in ordered if i in ids], tenant
    jobs = {t: [s.create_job(new_id("job"), {"i": i}, f"h{i}", [], None, t)[0] for i in range(3)] for t in made}
    assert _pages(lambda n, c: s.list_jobs(n, c, "bob"), limit) == jobs["bob"]  # oldest first
    assert sorted(_pages(lambda n, c: s.list_jobs(n, c, None), limit)) == sorted(jobs["alice"] + jobs["bob"])
    assert s.list_jobs(10, None, "carol") == ([], None)
    _, cur = s.list_identities(1, None, None)
    for bad in (cur, "not-a-cursor", "W10", "WyJqb2IiLCAxLCAyXQ"):  # an identity cursor, garbage, [], ["job", 1, 2]
        with pytest.raises(ValueError, match="invalid cursor"):
            s.list_jobs(2, bad, None)


def test_job_results_page_by_item(replicas):
    s = replicas()
    jid = _job(s, 5)
    assert s.claim_job() == jid
    for idx in range(5):
        s.complete_item(jid, idx, [b"a", b"b"] if idx % 2 else [b"a"], [idx, idx + 1], 0.1)
    pages, cursor = [], None
    while True:
        rows, cursor = s.job_results(jid, 2, cursor)
        pages.append(sorted({r["idx"] for r in rows}))
        if cursor is None:
            break
    assert pages == [[0, 1], [2, 3], [4]]
    everything = [(r["idx"], r["k"]) for r in s.job_results(jid)[0]]
    assert everything == [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0), (3, 1), (4, 0)]
    other = _job(s, 1)
    with pytest.raises(ValueError, match="invalid cursor"):  # a cursor of another job's results
        s.job_results(other, 2, s.job_results(jid, 2)[1])


def test_job_idempotency_keys_are_per_tenant(replicas):
    s = replicas()
    a, created = s.create_job(new_id("job"), {}, "h1", [], "k", "alice")
    assert created and s.create_job(new_id("job"), {}, "h1", [], "k", "alice") == (a, False)
    b, created = s.create_job(new_id("job"), {}, "h2", [], "k", "bob")  # bob's "k" is not alice's
    assert created and b != a
    with pytest.raises(ValueError, match="idempotency_mismatch"):
        s.create_job(new_id("job"), {}, "h3", [], "k", "alice")


def test_identity_idempotency_key(replicas):
    """The same key and request: the first identity, the second upload's folder removed; another request: a
    mismatch; another tenant: its own identity. Also when the second request races the first (two replicas)."""
    from service.storage import IdentityRecord

    a, b = replicas(), replicas()

    def add(s, tenant, digest):
        rec = IdentityRecord(new_id("idt"), time.time(), "n", {}, b"\1" * 8, 1, tenant=tenant)
        staged = s.staging_dir()
        (staged / "adapter.safetensors").write_bytes(b"x")
        return rec.id, s.add_identity(rec, staged, "key-1", digest)

    first, (got, created) = add(a, "alice", "d1")
    assert got == first and created
    assert a.identity_for_key("alice", "key-1", "d1") == first and a.identity_for_key("bob", "key-1", "d1") is None
    second, (got, created) = add(b, "alice", "d1")  # the race: b did not see a's key before it did the work
    assert (got, created) == (first, False) and not b.identity_dir(second).exists()
    assert [r.id for r in a.list_identities(10)[0]] == [first]
    with pytest.raises(ValueError, match="idempotency_mismatch"):
        a.identity_for_key("alice", "key-1", "d2")
    with pytest.raises(ValueError, match="idempotency_mismatch"):
        add(b, "alice", "d2")
    bobs, (got, created) = add(a, "bob", "d1")
    assert got == bobs and created


def test_delete_identity_removes_its_files_rows_and_images(replicas):
    """Nothing of a deleted identity stays: its folder, its job items' images (files and rows), and, on SQLite,
    no copy of its face embeddings in the database or its WAL."""
    s = replicas()
    marker = b"FACE-EMBEDDING-" + b"\x42" * 48
    ident = new_id("idt")
    staged = s.staging_dir()
    (staged / "photo-0.jpg").write_bytes(b"photo")
    (staged / "face-0.png").write_bytes(b"chip")
    (staged / "adapter.safetensors").write_bytes(b"adapter")
    from service.storage import IdentityRecord

    s.add_identity(IdentityRecord(ident, time.time(), "n", {}, marker, 1, tenant="alice"), staged)
    keep = _identity(s)
    jid, _ = s.create_job(new_id("job"), {}, "h", [(ident, "p", 0), (keep, "p", 1)], None, "alice")
    assert s.claim_job() == jid
    for idx in range(2):
        assert s.complete_item(jid, idx, [b"image of " + str(idx).encode()], [idx], 0.1)
    assert not s.delete_identity(ident, "bob")  # another tenant's: as if missing
    assert s.delete_identity(ident, "alice") and not s.delete_identity(ident, "alice")
    assert not s.identity_dir(ident).exists() and s.get_identity(ident) is None
    rows, _ = s.job_results(jid)
    assert [(r["idx"], r["k"], r["error"]) for r in rows] == [
        (0, None, "identity deleted: its images were removed"), (1, 0, None)
    ]  # fmt: skip
    assert sorted(p.name for p in (s.root / "results" / jid).iterdir()) == ["00001-0.png"]
    if s.sqlite:
        for f in s.root.glob("difflora.sqlite3*"):
            assert marker not in f.read_bytes(), f.name
    # an item finished after its identity was deleted keeps nothing either
    gone = _identity(s, new_id("idt"))
    jid2, _ = s.create_job(new_id("job"), {}, "h2", [(gone, "p", 0)], None)
    assert s.claim_job() == jid2 and s.delete_identity(gone)
    s.complete_item(jid2, 0, [b"late"], [0], 0.1)
    assert s.job_results(jid2)[0][0]["status"] == "failed" and not list((s.root / "results" / jid2).iterdir())


def test_expire_identities_spares_recent_and_waiting_ones(replicas):
    s = replicas()
    now = time.time()
    old, used, waiting = (_identity(s, new_id("idt"), created=now - 100) for _ in range(3))
    fresh = _identity(s, new_id("idt"), created=now)
    s.touch_identity(used)  # used just now
    s.create_job(new_id("job"), {}, "h", [(waiting, "p", 0)], None)  # a queued job still needs it
    assert s.expire_identities(50) == [old]
    assert s.identity_exists(used) and s.identity_exists(waiting) and s.identity_exists(fresh)
    assert s.get_identity(used).last_used >= now and not s.identity_dir(old).exists()


def test_a_database_at_revision_0002_upgrades_in_place(tmp_path, database_url):
    """A database made by the previous release (revision 0002) with an identity and a job with a key: opening it
    adds the tenant columns (rows: tenant 'default'), keeps the data, and the job's key still replays."""
    import sqlalchemy as sa
    from alembic import command

    from service.db import _alembic_config, make_engine
    from service.db import database_url as url_of

    engine = make_engine(url_of(database_url, tmp_path))
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0002")
        conn.execute(
            sa.text("INSERT INTO identities VALUES (:id, 1.0, 'old', '{}', :emb, 1)"), {"id": IDT, "emb": b"\1\1"}
        )
        conn.exec_driver_sql(
            "INSERT INTO jobs (id, created, updated, status, request, request_hash, idempotency_key, total) "
            "VALUES ('job_" + "f" * 24 + "', 2.0, 2.0, 'succeeded', '{}', 'h', 'old-key', 0)"
        )
    engine.dispose()
    s = Storage(tmp_path, database_url)
    try:
        from service.db import revision

        assert revision(s.engine) == head() == "0003"
        rec = s.get_identity(IDT, "default")
        assert rec.name == "old" and rec.tenant == "default" and rec.last_used is None
        assert s.get_identity(IDT, "alice") is None
        assert s.create_job(new_id("job"), {}, "h", [], "old-key") == ("job_" + "f" * 24, False)
        assert [j["tenant"] for j in s.list_jobs(10)[0]] == ["default"]
    finally:
        s.close()
