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

Tenants: every identity and job row names its owning tenant (``service.tenants``). Methods that read one by id or
list take ``tenant``: the owner's name (another tenant's row is then exactly like a missing one) or None (every
tenant: admin keys and the service's own work). Lists are pages in a stable order (creation time, then id) with an
opaque cursor for the next page (:meth:`Storage.list_identities`, :meth:`Storage.list_jobs`,
:meth:`Storage.job_results`).

Faces are biometric data: :meth:`Storage.delete_identity` removes the row (SQLite: ``secure_delete`` zeroes it, and
the WAL is checkpointed so no old copy stays in it), the identity's folder (photos, face crops, adapter) and the
images its job items produced; :meth:`Storage.expire_identities` does so for identities unused for a while.
"""

from __future__ import annotations

import base64
import fcntl
import json
import math
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
    DEFAULT_TENANT,
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
    tenant: str = DEFAULT_TENANT  # owner
    last_used: float | None = None  # last generation or job item (None: never)


def _identity(r: Any) -> IdentityRecord:
    return IdentityRecord(
        r.id, r.created, r.name, json.loads(r.info), bytes(r.embeddings), r.num_embeddings, r.tenant, r.last_used
    )


def _cursor(kind: str, *values: Any) -> str:
    """An opaque page cursor: url-safe base64 of ``[kind, *values]`` (``kind`` keeps one list's cursor out of
    another)."""
    return base64.urlsafe_b64encode(json.dumps([kind, *values]).encode()).decode().rstrip("=")


def _uncursor(kind: str, cursor: str, types: tuple[type, ...]) -> tuple:
    """The values of a :func:`_cursor` of ``kind``, of ``types``; ValueError("invalid cursor") for anything else."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError as e:  # binascii.Error and JSONDecodeError are ValueErrors
        raise ValueError("invalid cursor") from e
    ok = isinstance(raw, list) and len(raw) == len(types) + 1 and raw[0] == kind
    vals = raw[1:] if ok else []
    if not ok or not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(vals, types)):
        raise ValueError("invalid cursor")
    for v in vals:  # what a database can compare: finite floats, 64-bit integers, short strings
        if (isinstance(v, float) and not math.isfinite(v)) or (isinstance(v, int) and abs(v) >= 2**63):
            raise ValueError("invalid cursor")
        if isinstance(v, str) and len(v) > 200:
            raise ValueError("invalid cursor")
    return tuple(vals)


def _owned(table: sa.Table, tenant: str | None):
    """The owner condition: ``tenant``'s rows, or every row for None."""
    return sa.true() if tenant is None else table.c.tenant == tenant


def scoped_key(tenant: str, key: str) -> str:
    """How an Idempotency-Key is stored: per tenant (two tenants may use the same key)."""
    return f"{tenant}/{key}"


def _page(q, table: sa.Table, limit: int, cursor: str | None, kind: str):
    """``q`` ordered by (created, id) from after ``cursor``, ``limit + 1`` rows (the extra one: is there more)."""
    q = q.order_by(table.c.created, table.c.id).limit(limit + 1)
    if cursor is not None:
        created, ident = _uncursor(kind, cursor, (float, str))
        q = q.where(sa.tuple_(table.c.created, table.c.id) > sa.tuple_(created, ident))
    return q


def _next(rows: list, limit: int, kind: str) -> str | None:
    return _cursor(kind, float(rows[limit - 1].created), rows[limit - 1].id) if len(rows) > limit else None


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
    def add_identity(
        self, rec: IdentityRecord, staged: Path, key: str | None = None, request_hash: str | None = None
    ) -> tuple[str, bool]:
        """Move the staged folder into place, then commit the row (a crash in between leaves an orphan folder
        that :meth:`sweep` removes). With an Idempotency-``key`` (stored per tenant): ``(id, True)``, or, when
        another request with the key got there first, ``(its id, False)`` and this one's folder is removed.
        ValueError("idempotency_mismatch") when that request was a different one."""
        final = self.identity_dir(rec.id)
        os.replace(staged, final)
        stored_key = None if key is None else scoped_key(rec.tenant, key)
        try:
            with self.tx() as c:
                c.execute(
                    identities.insert().values(
                        id=rec.id, created=rec.created, name=rec.name, info=json.dumps(rec.info),
                        embeddings=rec.embeddings, num_embeddings=rec.num_embeddings, tenant=rec.tenant,
                        last_used=rec.last_used, idempotency_key=stored_key, request_hash=request_hash,
                    )
                )  # fmt: skip
        except sa.exc.IntegrityError:
            shutil.rmtree(final, ignore_errors=True)
            if stored_key is None or (found := self._for_key(identities, stored_key, request_hash or "")) is None:
                raise
            return found, False
        return rec.id, True

    def identity_for_key(self, tenant: str, key: str, request_hash: str) -> str | None:
        """The identity an earlier request with this Idempotency-Key made (None: none yet); ValueError
        ("idempotency_mismatch") when that request was a different one."""
        return self._for_key(identities, scoped_key(tenant, key), request_hash)

    def get_identity(self, identity_id: str, tenant: str | None = None) -> IdentityRecord | None:
        if not valid_id(identity_id, "idt"):
            return None
        with self.read() as c:
            q = sa.select(identities).where((identities.c.id == identity_id) & _owned(identities, tenant))
            r = c.execute(q).first()
        return None if r is None else _identity(r)

    def list_identities(
        self, limit: int = 20, cursor: str | None = None, tenant: str | None = None
    ) -> tuple[list[IdentityRecord], str | None]:
        """``tenant``'s identities (None: everyone's) oldest first (creation time, then id), ``limit`` at a time:
        ``(page, cursor of the next page or None)``. ValueError("invalid cursor") for a cursor this method did not
        return."""
        q = _page(sa.select(identities).where(_owned(identities, tenant)), identities, limit, cursor, "idt")
        with self.read() as c:
            rows = c.execute(q).all()
        return [_identity(r) for r in rows[:limit]], _next(rows, limit, "idt")

    def identity_exists(self, identity_id: str, tenant: str | None = None) -> bool:
        if not valid_id(identity_id, "idt"):
            return False
        q = sa.select(identities.c.id).where((identities.c.id == identity_id) & _owned(identities, tenant))
        with self.read() as c:
            return c.execute(q).first() is not None

    def touch_identity(self, identity_id: str, now: float | None = None) -> None:
        """Record a use (a generation or a job item) of an identity, for the retention period."""
        with self.tx() as c:
            c.execute(identities.update().where(identities.c.id == identity_id).values(last_used=now or time.time()))

    def delete_identity(
        self, identity_id: str, tenant: str | None = None, *, idle_before: float | None = None
    ) -> bool:
        """Delete an identity: its row, its folder (photos, face crops, adapter) and the images its job items made
        (their rows too; the items stay, with ``error`` saying so). ``idle_before``: only if it was last used
        (or, never used, created) before this time. False when there is no such identity (of ``tenant``)."""
        if not valid_id(identity_id, "idt"):
            return False
        i, r = job_items, results_t
        cond = (identities.c.id == identity_id) & _owned(identities, tenant)
        if idle_before is not None:
            cond = cond & (sa.func.coalesce(identities.c.last_used, identities.c.created) < idle_before)
        with self.tx() as c:
            if not c.execute(identities.delete().where(cond)).rowcount:
                return False
            made = sa.select(i.c.job_id, i.c.idx).where(i.c.identity_id == identity_id)
            files = c.execute(
                sa.select(r.c.file).where(sa.tuple_(r.c.job_id, r.c.idx).in_(made))
            ).scalars().all()  # fmt: skip
            c.execute(r.delete().where(sa.tuple_(r.c.job_id, r.c.idx).in_(made)))
            c.execute(
                i.update().where((i.c.identity_id == identity_id) & (i.c.status == "done"))
                .values(error="identity deleted: its images were removed")
            )  # fmt: skip
        shutil.rmtree(self.identity_dir(identity_id), ignore_errors=True)
        for rel in files:
            if (path := self.resolve(rel)) is not None:
                path.unlink(missing_ok=True)
        self._checkpoint()
        return True

    def _checkpoint(self) -> None:
        """SQLite: copy the WAL into the database and truncate it, so deleted rows leave no old copy in the WAL
        (best effort: a reader holding an old snapshot makes it a partial checkpoint, the next one finishes)."""
        if not self.sqlite:
            return
        with self.engine.connect() as c:
            for _ in range(5):
                try:
                    busy, _, _ = c.connection.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                except Exception:  # noqa: BLE001 - locked: the next checkpoint (SQLite does them itself) catches up
                    busy = 1
                if not busy:
                    return
                time.sleep(0.05)

    def expire_identities(self, max_idle_s: float) -> list[str]:
        """Delete (as :meth:`delete_identity`) every identity not used for ``max_idle_s`` seconds (last generation
        or job item; never used: since created), except those a queued or running job still has to run. Returns
        the ids deleted."""
        cutoff = time.time() - max_idle_s
        waiting = (
            sa.select(job_items.c.identity_id)
            .select_from(job_items.join(jobs, jobs.c.id == job_items.c.job_id))
            .where((job_items.c.status == "pending") & jobs.c.status.in_(("queued", "running")))
        )
        idle = sa.func.coalesce(identities.c.last_used, identities.c.created) < cutoff
        with self.read() as c:
            ids = c.execute(sa.select(identities.c.id).where(idle & identities.c.id.not_in(waiting))).scalars().all()
        return [i for i in ids if self.delete_identity(i, idle_before=cutoff)]

    def count_identities(self) -> int:
        with self.read() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(identities)).scalar_one())

    # ---- jobs -----------------------------------------------------------------------------------------------
    def create_job(
        self,
        job_id: str,
        request: dict,
        request_hash: str,
        items: list[tuple[str, str, int]],
        key: str | None,
        tenant: str = DEFAULT_TENANT,
    ) -> tuple[str, bool]:
        """Insert ``tenant``'s job and its items; with an idempotency ``key`` (per tenant) already used, return
        ``(existing id, False)`` (also when another replica inserts the same key at the same moment).

        Raises ValueError("idempotency_mismatch") if the key was used for a different request.
        """
        now = time.time()
        key = None if key is None else scoped_key(tenant, key)
        if key is not None and (found := self._for_key(jobs, key, request_hash)) is not None:
            return found, False
        try:
            with self.tx() as c:
                c.execute(
                    jobs.insert().values(
                        id=job_id, created=now, updated=now, status="queued", request=json.dumps(request),
                        request_hash=request_hash, idempotency_key=key, total=len(items), tenant=tenant,
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
            if key is None or (found := self._for_key(jobs, key, request_hash)) is None:
                raise
            return found, False
        return job_id, True

    def _for_key(self, table: sa.Table, key: str, request_hash: str) -> str | None:
        """The id of ``table``'s row made with the (tenant-scoped) idempotency ``key``, if any; ValueError
        ("idempotency_mismatch") when it was made from another request."""
        with self.read() as c:
            q = sa.select(table.c.id, table.c.request_hash).where(table.c.idempotency_key == key)
            row = c.execute(q).first()
        if row is None:
            return None
        if row.request_hash != request_hash:
            raise ValueError("idempotency_mismatch")
        return row.id

    @staticmethod
    def _with_counts(c: Connection, rows: list) -> list[dict]:
        """Job rows as dicts with their item counts (done, failed) and mean seconds per finished item."""
        ids = [r.id for r in rows]
        by: dict[str, dict[str, tuple[int, float]]] = {i: {} for i in ids}
        if ids:
            q = (
                sa.select(job_items.c.job_id, job_items.c.status, sa.func.count().label("n"),
                          sa.func.sum(job_items.c.seconds).label("s"))
                .where(job_items.c.job_id.in_(ids))
                .group_by(job_items.c.job_id, job_items.c.status)
            )  # fmt: skip
            for r in c.execute(q):
                by[r.job_id][r.status] = (r.n, r.s or 0.0)
        out = []
        for row in rows:
            job, counts = dict(row._mapping), by[row.id]
            job["request"] = json.loads(job["request"])
            job["done"] = counts.get("done", (0, 0))[0]
            job["failed"] = counts.get("failed", (0, 0))[0]
            secs = counts.get("done", (0, 0.0))[1] + counts.get("failed", (0, 0.0))[1]
            finished = job["done"] + job["failed"]
            job["seconds_per_item"] = secs / finished if finished else None
            out.append(job)
        return out

    def get_job(self, job_id: str, tenant: str | None = None) -> dict | None:
        if not valid_id(job_id, "job"):
            return None
        with self.read() as c:
            row = c.execute(sa.select(jobs).where((jobs.c.id == job_id) & _owned(jobs, tenant))).first()
            return None if row is None else self._with_counts(c, [row])[0]

    def list_jobs(
        self, limit: int = 20, cursor: str | None = None, tenant: str | None = None
    ) -> tuple[list[dict], str | None]:
        """``tenant``'s jobs (None: everyone's) oldest first (creation time, then id), as :meth:`get_job`;
        ``(page, next cursor or None)``; ValueError("invalid cursor")."""
        q = _page(sa.select(jobs).where(_owned(jobs, tenant)), jobs, limit, cursor, "job")
        with self.read() as c:
            rows = c.execute(q).all()
            return self._with_counts(c, rows[:limit]), _next(rows, limit, "job")

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
            ident = sa.select(job_items.c.identity_id).where((job_items.c.job_id == job_id) & (job_items.c.idx == idx))
            if c.execute(sa.select(identities.c.id).where(identities.c.id.in_(ident))).first() is None:
                for rel in rels:  # the identity was deleted while its images were made: keep none of them
                    (self.root / rel).unlink(missing_ok=True)
                c.execute(
                    job_items.update().where((job_items.c.job_id == job_id) & (job_items.c.idx == idx))
                    .values(status="failed", error="identity not found", seconds=seconds)
                )  # fmt: skip
            else:
                if rels:
                    ins = self._insert(results_t).values(
                        [{"job_id": job_id, "idx": idx, "k": k, "seed": seeds[k], "file": rel, "created": now}
                         for k, rel in enumerate(rels)]
                    )  # fmt: skip
                    c.execute(
                        ins.on_conflict_do_update(
                            index_elements=["job_id", "idx", "k"],
                            set_={"seed": ins.excluded.seed, "file": ins.excluded.file,
                                  "created": ins.excluded.created},
                        )
                    )  # fmt: skip
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

    def job_results(
        self, job_id: str, limit: int | None = None, cursor: str | None = None
    ) -> tuple[list[dict], str | None]:
        """A job's items in order, ``limit`` items at a time (None: all), each row one image (an item without
        images: one row with ``k`` None): ``(rows, cursor of the next page or None)``; ValueError("invalid
        cursor")."""
        i, r = job_items, results_t
        items = sa.select(i.c.idx).where(i.c.job_id == job_id).order_by(i.c.idx)
        if cursor is not None:
            (after,) = _uncursor(f"res:{job_id}", cursor, (int,))
            items = items.where(i.c.idx > after)
        with self.read() as c:
            idxs = c.execute(items.limit(None if limit is None else limit + 1)).scalars().all()
            more = limit is not None and len(idxs) > limit
            idxs = idxs[:limit] if limit is not None else idxs
            if not idxs:
                return [], None
            q = (
                sa.select(i.c.idx, i.c.identity_id, i.c.prompt, i.c.status, i.c.error, r.c.k, r.c.seed, r.c.file)
                .select_from(i.outerjoin(r, (r.c.job_id == i.c.job_id) & (r.c.idx == i.c.idx)))
                .where((i.c.job_id == job_id) & (i.c.idx >= idxs[0]) & (i.c.idx <= idxs[-1]))
                .order_by(i.c.idx, r.c.k)
            )
            rows = [dict(row._mapping) for row in c.execute(q)]
        return rows, _cursor(f"res:{job_id}", idxs[-1]) if more else None

    def result_file(self, job_id: str, idx: int, k: int, tenant: str | None = None) -> Path | None:
        if not valid_id(job_id, "job"):
            return None
        owned = sa.select(jobs.c.id).where((jobs.c.id == job_id) & _owned(jobs, tenant))
        q = sa.select(results_t.c.file).where(
            (results_t.c.job_id == job_id)
            & (results_t.c.idx == idx)
            & (results_t.c.k == k)
            & results_t.c.job_id.in_(owned)
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
