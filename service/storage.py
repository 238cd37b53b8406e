"""Identities, adapters, jobs, job items and results: rows in a database (SQLite by default, or PostgreSQL shared by
several replicas; ``service.db``) and files under one data directory (a shared volume for several replicas).

Layout of ``data_dir``::

    difflora.sqlite3                 the SQLite database (WAL), when no database URL is given
    identities/<id>/adapter.safetensors   the predicted adapter (native format)
    identities/<id>/face-<k>.png     aligned face crops of the accepted photos
    identities/<id>/photo-<k>.jpg    the accepted photos, re-encoded (EXIF orientation applied; no metadata,
                                     nothing appended; server-generated names, never client names)
    results/<job id>/<item>-<k>.png  batch-job images (a deterministic name per result: re-running an item
                                     overwrites, never duplicates)
    replicas/<replica>.lock          SQLite only: held (flock) by each live replica, so one that died is known at once
    tmp/                             staging

Every file is written atomically (temp file in the same folder + ``os.replace``); an identity's folder is built
under a temp name and renamed into place before its row is committed, so no replica ever sees a half-made identity.
The database holds only paths relative to the data directory, so replicas may mount it anywhere.

Jobs are claimed with a lease (:meth:`Storage.claim_job`): the replica that runs a job renews its lease
(:meth:`Storage.heartbeat`); one that dies stops renewing, and after ``lease_s`` another replica takes the job over
(PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED``; SQLite: the write lock, plus the dead replica's free lock file).
Results are written idempotently, keyed by (job, item, image), so a job taken over has every result exactly once.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from weights.atomic import atomic_write_bytes as atomic_write

from .db import (
    READ_ONLY,
    database_url,
    ensure_sqlite_dir,
    head,
    identities,
    is_sqlite,
    job_items,
    jobs,
    make_engine,
    redact,
)
from .db import replicas as replicas_t
from .db import results as results_t
from .db import revision as db_revision
from .db import upgrade as db_upgrade

JOB_STATES = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL = ("succeeded", "failed", "canceled")
DEFAULT_LEASE_S = 30.0  # how long a claimed job stays with a replica that stopped renewing it
SWEEP_GRACE_S = 3600.0  # leftovers younger than this may be another live replica's work in progress
REPLICA_FORGET_S = 86400.0  # replica rows whose heartbeat is older than this are deleted by the sweep


def new_id(prefix: str) -> str:
    """A server-generated id: ``<prefix>_<24 hex chars>`` (96 random bits)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def valid_id(value: str, prefix: str) -> bool:
    """Does ``value`` look like an id made by :func:`new_id` (so it is safe inside a path)?"""
    head, _, tail = value.partition("_")
    return head == prefix and len(tail) == 24 and all(c in "0123456789abcdef" for c in tail)


def replica_id() -> str:
    """This process's replica id: ``<host>-<pid>-<random>`` (unique even when a container restarts as pid 1)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class IdentityRecord:
    id: str
    created: float
    name: str
    info: dict[str, Any]
    embeddings: bytes
    num_embeddings: int


def _identity(r: Any) -> IdentityRecord:
    return IdentityRecord(r.id, r.created, r.name, json.loads(r.info), bytes(r.embeddings), r.num_embeddings)


def _cursor(created: float, ident: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created, ident]).encode()).decode().rstrip("=")


def _uncursor(cursor: str) -> tuple[float, str]:
    """ValueError("invalid cursor") unless ``cursor`` came from :func:`_cursor`."""
    try:
        created, ident = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return float(created), str(ident)
    except (ValueError, TypeError) as e:
        raise ValueError("invalid cursor") from e


class Storage:
    """The database and the files of one data directory. Thread-safe: every call is one short transaction on a
    pooled connection. ``lease_s``: the job lease (see the module doc); ``owner``: this replica's id."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        database_url_: str | None = None,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        owner: str | None = None,
        migrate: bool = True,
    ) -> None:
        self.root = Path(data_dir).resolve()
        for sub in ("identities", "results", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.url = database_url(database_url_, self.root)
        ensure_sqlite_dir(self.url)
        self.engine = make_engine(self.url)
        self.sqlite = is_sqlite(self.engine)
        self._insert = sqlite_dialect.insert if self.sqlite else pg_dialect.insert
        try:
            if migrate:
                db_upgrade(self.engine)
            elif (rev := db_revision(self.engine)) != head():
                raise RuntimeError(
                    f"the database {redact(self.url)} is at schema revision {rev}, this code needs {head()}: "
                    "run 'difflora db upgrade'"
                )
        except sa.exc.OperationalError as e:
            self.engine.dispose()
            why = str(e.orig or e).strip().splitlines()[0][:300]
            raise ConnectionError(f"cannot use the database {redact(self.url)}: {why}") from None
        except RuntimeError:
            self.engine.dispose()
            raise
        self.owner = owner or replica_id()
        self.lease_s = float(lease_s)
        self._lock_fd: int | None = None
        if self.sqlite:  # a live replica holds its lock file; the kernel drops it when the process dies
            (self.root / "replicas").mkdir(exist_ok=True)
            self._lock_fd = os.open(self._lock_path(self.owner), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        now = time.time()
        with self.tx() as c:
            c.execute(replicas_t.insert().values(id=self.owner, host=socket.gethostname(), started=now, heartbeat=now))

    @property
    def db_path(self) -> Path | None:
        """The SQLite database file (None on PostgreSQL)."""
        return Path(self.engine.url.database) if self.sqlite else None

    def close(self) -> None:
        """Forget this replica (its leases stay until they expire or the runner released them) and disconnect."""
        try:
            with self.tx() as c:
                c.execute(replicas_t.delete().where(replicas_t.c.id == self.owner))
        except sa.exc.SQLAlchemyError:
            pass  # the database is gone: nothing to forget
        if self._lock_fd is not None:
            self._lock_path(self.owner).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
        self.engine.dispose()

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction (committed on success, rolled back on error; SQLite: ``BEGIN IMMEDIATE``)."""
        with self.engine.begin() as c:
            yield c

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One read-only transaction (SQLite: a deferred ``BEGIN``, which does not wait for the write lock)."""
        with self.engine.connect() as c:
            c.execution_options(**{READ_ONLY: True})
            with c.begin():
                yield c

    # ---- replicas -------------------------------------------------------------------------------------------
    def _lock_path(self, owner: str) -> Path:
        return self.root / "replicas" / f"{owner}.lock"

    def _dead_on_this_machine(self, owner: str) -> bool:
        """SQLite only: True when ``owner``'s lock file is not held (the replica stopped or was killed)."""
        if owner == self.owner:
            return False
        try:
            fd = os.open(self._lock_path(owner), os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def live_replicas(self) -> list[str]:
        """Replicas that are running now (this one included): SQLite by their lock files, PostgreSQL by a
        heartbeat younger than the lease."""
        if self.sqlite:
            owners = [p.stem for p in (self.root / "replicas").glob("*.lock")]
            return sorted(o for o in owners if o == self.owner or not self._dead_on_this_machine(o))
        with self.read() as c:
            rows = c.execute(sa.select(replicas_t.c.id).where(replicas_t.c.heartbeat > time.time() - self.lease_s))
            return sorted({r.id for r in rows} | {self.owner})

    def heartbeat(self) -> set[str]:
        """Renew this replica's heartbeat and the lease of every job it runs; returns the ids of those jobs (a job
        missing from it was taken over, canceled or finished: stop working on it)."""
        now = time.time()
        with self.tx() as c:
            c.execute(replicas_t.update().where(replicas_t.c.id == self.owner).values(heartbeat=now))
            mine = (jobs.c.lease_owner == self.owner) & (jobs.c.status == "running")
            c.execute(jobs.update().where(mine).values(lease_expires=now + self.lease_s))
            return {r.id for r in c.execute(sa.select(jobs.c.id).where(mine))}

    # ---- paths ----------------------------------------------------------------------------------------------
    def identity_dir(self, identity_id: str) -> Path:
        if not valid_id(identity_id, "idt"):
            raise ValueError(f"invalid identity id {identity_id!r}")
        return self.root / "identities" / identity_id

    def adapter_path(self, identity_id: str) -> Path:
        return self.identity_dir(identity_id) / "adapter.safetensors"

    def staging_dir(self) -> Path:
        """A fresh temp folder under data_dir/tmp (same file system as the final places)."""
        d = self.root / "tmp" / secrets.token_hex(8)
        d.mkdir(parents=True)
        return d

    def resolve(self, rel: str) -> Path | None:
        """The file of a data-directory-relative path from the database (None for anything that is not one)."""
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            return None
        return self.root.joinpath(*p.parts)

    def sweep(self, min_age_s: float | None = None) -> int:
        """Remove leftovers of interrupted writes: temp folders/files, and identity folders with no row.

        Only entries older than ``min_age_s`` are touched (default: 0 when no other replica is alive, else
        ``SWEEP_GRACE_S``, so another replica's upload in progress is never removed). Also forgets dead replicas."""
        if min_age_s is None:
            min_age_s = 0.0 if self.live_replicas() == [self.owner] else SWEEP_GRACE_S
        cutoff = time.time() - min_age_s

        def old(p: Path) -> bool:
            try:
                return p.lstat().st_mtime <= cutoff
            except FileNotFoundError:
                return False

        removed = 0
        for p in (self.root / "tmp").iterdir():
            if old(p):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed += 1
        folders = [p for p in (self.root / "identities").iterdir() if old(p)]  # listed before the rows are read
        with self.read() as c:
            known = {r.id for r in c.execute(sa.select(identities.c.id))}
        for p in folders:
            if p.name not in known:
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
        for p in (self.root / "results").glob("*/.*.tmp"):
            if old(p):
                p.unlink(missing_ok=True)
                removed += 1
        if self.sqlite:
            for p in (self.root / "replicas").glob("*.lock"):
                if self._dead_on_this_machine(p.stem):
                    p.unlink(missing_ok=True)
        with self.tx() as c:
            c.execute(replicas_t.delete().where(replicas_t.c.heartbeat < time.time() - REPLICA_FORGET_S))
        return removed

    # ---- identities -----------------------------------------------------------------------------------------
    def add_identity(self, rec: IdentityRecord, staged: Path) -> None:
        """Move the staged folder into place, then commit the row (a crash in between leaves an orphan folder
        that :meth:`sweep` removes)."""
        final = self.identity_dir(rec.id)
        os.replace(staged, final)
        with self.tx() as c:
            c.execute(
                identities.insert().values(
                    id=rec.id, created=rec.created, name=rec.name, info=json.dumps(rec.info),
                    embeddings=rec.embeddings, num_embeddings=rec.num_embeddings,
                )
            )  # fmt: skip

    def get_identity(self, identity_id: str) -> IdentityRecord | None:
        if not valid_id(identity_id, "idt"):
            return None
        with self.read() as c:
            r = c.execute(sa.select(identities).where(identities.c.id == identity_id)).first()
        return None if r is None else _identity(r)

    def list_identities(self, limit: int = 50, cursor: str | None = None) -> tuple[list[IdentityRecord], str | None]:
        """Identities oldest first, ``limit`` at a time: ``(page, cursor of the next page or None)``.
        ValueError("invalid cursor") for a cursor this method did not return."""
        q = sa.select(identities).order_by(identities.c.created, identities.c.id).limit(limit + 1)
        if cursor is not None:
            created, ident = _uncursor(cursor)
            q = q.where(sa.tuple_(identities.c.created, identities.c.id) > sa.tuple_(created, ident))
        with self.read() as c:
            rows = c.execute(q).all()
        page = [_identity(r) for r in rows[:limit]]
        more = len(rows) > limit and page
        return page, _cursor(page[-1].created, page[-1].id) if more else None

    def identity_exists(self, identity_id: str) -> bool:
        if not valid_id(identity_id, "idt"):
            return False
        with self.read() as c:
            return c.execute(sa.select(identities.c.id).where(identities.c.id == identity_id)).first() is not None

    def delete_identity(self, identity_id: str) -> bool:
        if not valid_id(identity_id, "idt"):
            return False
        with self.tx() as c:
            n = c.execute(identities.delete().where(identities.c.id == identity_id)).rowcount
        if n:
            shutil.rmtree(self.identity_dir(identity_id), ignore_errors=True)
        return bool(n)

    def count_identities(self) -> int:
        with self.read() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(identities)).scalar_one())

    # ---- jobs -----------------------------------------------------------------------------------------------
    def create_job(
        self, job_id: str, request: dict, request_hash: str, items: list[tuple[str, str, int]], key: str | None
    ) -> tuple[str, bool]:
        """Insert a job and its items; with an idempotency ``key`` already used, return ``(existing id, False)``
        (also when another replica inserts the same key at the same moment).

        Raises ValueError("idempotency_mismatch") if the key was used for a different request.
        """
        now = time.time()
        if key is not None and (found := self._job_for_key(key, request_hash)) is not None:
            return found, False
        try:
            with self.tx() as c:
                c.execute(
                    jobs.insert().values(
                        id=job_id, created=now, updated=now, status="queued", request=json.dumps(request),
                        request_hash=request_hash, idempotency_key=key, total=len(items),
                    )
                )  # fmt: skip
                if items:
                    c.execute(
                        job_items.insert(),
                        [
                            {"job_id": job_id, "idx": i, "identity_id": ident, "prompt": prompt, "seed": seed,
                             "status": "pending"}
                            for i, (ident, prompt, seed) in enumerate(items)
                        ],
                    )  # fmt: skip
        except sa.exc.IntegrityError:
            if key is None or (found := self._job_for_key(key, request_hash)) is None:
                raise
            return found, False
        return job_id, True

    def _job_for_key(self, key: str, request_hash: str) -> str | None:
        with self.read() as c:
            row = c.execute(sa.select(jobs.c.id, jobs.c.request_hash).where(jobs.c.idempotency_key == key)).first()
        if row is None:
            return None
        if row.request_hash != request_hash:
            raise ValueError("idempotency_mismatch")
        return row.id

    def get_job(self, job_id: str) -> dict | None:
        if not valid_id(job_id, "job"):
            return None
        with self.read() as c:
            row = c.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            if row is None:
                return None
            counts = c.execute(
                sa.select(job_items.c.status, sa.func.count().label("n"), sa.func.sum(job_items.c.seconds).label("s"))
                .where(job_items.c.job_id == job_id)
                .group_by(job_items.c.status)
            ).all()
        job = dict(row._mapping)
        job["request"] = json.loads(job["request"])
        by = {r.status: (r.n, r.s or 0.0) for r in counts}
        job["done"] = by.get("done", (0, 0))[0]
        job["failed"] = by.get("failed", (0, 0))[0]
        secs = by.get("done", (0, 0.0))[1] + by.get("failed", (0, 0.0))[1]
        finished = job["done"] + job["failed"]
        job["seconds_per_item"] = secs / finished if finished else None
        return job

    def set_job_status(self, job_id: str, status: str, error: str | None = None, *, only_from: tuple = ()) -> bool:
        """Set a job's status (only if its current status is in ``only_from``, when given). Any status but
        ``running`` drops the job's lease."""
        now = time.time()
        values: dict[str, Any] = {"status": status, "updated": now}
        if error is not None:
            values["error"] = error
        if status == "running":
            values["started"] = sa.func.coalesce(jobs.c.started, now)
        else:
            values.update(lease_owner=None, lease_expires=None)
        if status in TERMINAL:
            values["finished"] = now
        q = jobs.update().where(jobs.c.id == job_id).values(**values)
        if only_from:
            q = q.where(jobs.c.status.in_(only_from))
        with self.tx() as c:
            return c.execute(q).rowcount > 0

    def job_status(self, job_id: str) -> str | None:
        with self.read() as c:
            return c.execute(sa.select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one_or_none()

    def active_jobs(self) -> list[str]:
        """Jobs queued or running (any replica), oldest first."""
        with self.read() as c:
            q = sa.select(jobs.c.id).where(jobs.c.status.in_(("queued", "running"))).order_by(jobs.c.created)
            return [r.id for r in c.execute(q)]

    def claim_job(self) -> str | None:
        """Take the oldest job that is queued, or running under a lease that expired (its replica died), and lease
        it to this replica for ``lease_s``; None when there is none. PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so
        replicas claiming at once never get the same job. SQLite: the write lock serialises claims, and a running
        job whose replica's lock file is free (it died on this machine) is taken over at once."""
        now = time.time()
        with self.tx() as c:
            claimable = (jobs.c.status == "queued") | (
                (jobs.c.status == "running") & (jobs.c.lease_expires.is_(None) | (jobs.c.lease_expires < now))
            )
            if self.sqlite:
                held = sa.select(jobs.c.lease_owner).where(
                    (jobs.c.status == "running") & (jobs.c.lease_expires >= now) & (jobs.c.lease_owner != self.owner)
                )
                dead = [o for o in {r.lease_owner for r in c.execute(held)} if self._dead_on_this_machine(o)]
                if dead:
                    claimable = claimable | ((jobs.c.status == "running") & jobs.c.lease_owner.in_(dead))
            q = sa.select(jobs.c.id).where(claimable).order_by(jobs.c.created).limit(1)
            if not self.sqlite:
                q = q.with_for_update(skip_locked=True)
            job_id = c.execute(q).scalar_one_or_none()
            if job_id is None:
                return None
            c.execute(
                jobs.update().where(jobs.c.id == job_id).values(
                    status="running", lease_owner=self.owner, lease_expires=now + self.lease_s, updated=now,
                    started=sa.func.coalesce(jobs.c.started, now), attempts=jobs.c.attempts + 1,
                )
            )  # fmt: skip
        return job_id

    def release_job(self, job_id: str) -> bool:
        """Give a running job back to the queue (a replica that stops gracefully: another takes it at once)."""
        q = jobs.update().where((jobs.c.id == job_id) & (jobs.c.lease_owner == self.owner))
        with self.tx() as c:
            q = q.where(jobs.c.status == "running").values(
                status="queued", lease_owner=None, lease_expires=None, updated=time.time()
            )
            return c.execute(q).rowcount > 0

    def finish_job(self, job_id: str, status: str, error: str | None = None) -> bool:
        """End a job this replica holds (``succeeded`` or ``failed``); False when its lease was lost or the job
        was canceled meanwhile."""
        now = time.time()
        mine = (jobs.c.id == job_id) & (jobs.c.lease_owner == self.owner) & (jobs.c.status == "running")
        with self.tx() as c:
            return (
                c.execute(
                    jobs.update().where(mine).values(
                        status=status, error=error, updated=now, finished=now, lease_owner=None, lease_expires=None
                    )
                ).rowcount
                > 0
            )  # fmt: skip

    def pending_items(self, job_id: str) -> list[dict]:
        q = sa.select(job_items).where((job_items.c.job_id == job_id) & (job_items.c.status == "pending"))
        with self.read() as c:
            return [dict(r._mapping) for r in c.execute(q.order_by(job_items.c.idx))]

    def complete_item(self, job_id: str, idx: int, images: list[bytes], seeds: list[int], seconds: float) -> bool:
        """Write the item's images (deterministic names) then, in one transaction, record them (an upsert keyed by
        job, item and image) and mark the item done. Re-running an item, after a crash or on the replica that took
        the job over, overwrites the same files and rows: every result exactly once. Returns whether this replica
        still holds the job's lease (renewed here); False: stop working on the job."""
        folder = self.root / "results" / job_id
        folder.mkdir(parents=True, exist_ok=True)
        rels = []
        for k, data in enumerate(images):
            rel = f"results/{job_id}/{idx:05d}-{k}.png"
            atomic_write(self.root / rel, data)
            rels.append(rel)
        now = time.time()
        with self.tx() as c:
            if rels:
                ins = self._insert(results_t).values(
                    [{"job_id": job_id, "idx": idx, "k": k, "seed": seeds[k], "file": rel, "created": now}
                     for k, rel in enumerate(rels)]
                )  # fmt: skip
                c.execute(
                    ins.on_conflict_do_update(
                        index_elements=["job_id", "idx", "k"],
                        set_={"seed": ins.excluded.seed, "file": ins.excluded.file, "created": ins.excluded.created},
                    )
                )
            c.execute(
                job_items.update()
                .where((job_items.c.job_id == job_id) & (job_items.c.idx == idx))
                .values(status="done", seconds=seconds, error=None)
            )
            mine = (jobs.c.id == job_id) & (jobs.c.lease_owner == self.owner) & (jobs.c.status == "running")
            held = c.execute(jobs.update().where(mine).values(updated=now, lease_expires=now + self.lease_s)).rowcount
        return held > 0

    def fail_item(self, job_id: str, idx: int, error: str, seconds: float) -> None:
        with self.tx() as c:
            c.execute(
                job_items.update()
                .where((job_items.c.job_id == job_id) & (job_items.c.idx == idx))
                .values(status="failed", error=error, seconds=seconds)
            )

    def job_results(self, job_id: str) -> list[dict]:
        i, r = job_items, results_t
        q = (
            sa.select(i.c.idx, i.c.identity_id, i.c.prompt, i.c.status, i.c.error, r.c.k, r.c.seed, r.c.file)
            .select_from(i.outerjoin(r, (r.c.job_id == i.c.job_id) & (r.c.idx == i.c.idx)))
            .where(i.c.job_id == job_id)
            .order_by(i.c.idx, r.c.k)
        )
        with self.read() as c:
            return [dict(row._mapping) for row in c.execute(q)]

    def result_file(self, job_id: str, idx: int, k: int) -> Path | None:
        if not valid_id(job_id, "job"):
            return None
        q = sa.select(results_t.c.file).where(
            (results_t.c.job_id == job_id) & (results_t.c.idx == idx) & (results_t.c.k == k)
        )
        with self.read() as c:
            rel = c.execute(q).scalar_one_or_none()
        return None if rel is None else self.resolve(rel)

    def jobs_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATES, 0)
        with self.read() as c:
            for r in c.execute(sa.select(jobs.c.status, sa.func.count().label("n")).group_by(jobs.c.status)):
                counts[r.status] = r.n
        return counts
