"""SQLite (WAL) + files under one data directory: identities, adapters, jobs, job items, results.

Layout of ``data_dir``::

    difflora.sqlite3                 the database (WAL mode)
    identities/<id>/adapter.safetensors   the predicted adapter (native format)
    identities/<id>/face-<k>.png     aligned face crops of the accepted photos
    identities/<id>/photo-<k>.jpg    the accepted photos, re-encoded (EXIF orientation applied; no metadata,
                                     nothing appended; server-generated names, never client names)
    results/<job id>/<item>-<k>.png  batch-job images (a deterministic name per result: re-running an item
                                     overwrites, never duplicates)

Every file is written atomically (temp file in the same folder + ``os.replace``); an identity's folder is built
under a temp name and renamed into place before its database row is committed, so a crash never leaves a visible
half-made identity. ``sweep()`` at start-up removes leftovers of interrupted writes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weights.atomic import atomic_write_bytes as atomic_write

_SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    info TEXT NOT NULL,            -- JSON: photos, consistency, warnings, seconds, spec
    embeddings BLOB NOT NULL,      -- float32 (P, E) of the inlier photos
    num_embeddings INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    status TEXT NOT NULL,          -- queued | running | succeeded | failed | canceled
    request TEXT NOT NULL,         -- JSON of the validated request
    request_hash TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    total INTEGER NOT NULL,
    error TEXT,
    started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS job_items (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    identity_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,          -- pending | done | failed
    error TEXT,
    seconds REAL,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    k INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    file TEXT NOT NULL,            -- relative to data_dir
    created REAL NOT NULL,
    PRIMARY KEY (job_id, idx, k)
);
"""

JOB_STATES = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL = ("succeeded", "failed", "canceled")


def new_id(prefix: str) -> str:
    """A server-generated id: ``<prefix>_<24 hex chars>`` (96 random bits)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def valid_id(value: str, prefix: str) -> bool:
    """Does ``value`` look like an id made by :func:`new_id` (so it is safe inside a path)?"""
    head, _, tail = value.partition("_")
    return head == prefix and len(tail) == 24 and all(c in "0123456789abcdef" for c in tail)


@dataclass
class IdentityRecord:
    id: str
    created: float
    name: str
    info: dict[str, Any]
    embeddings: bytes
    num_embeddings: int


class Storage:
    """Thread-safe access to the database and the files (one connection, one lock: every call is short)."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.root = Path(data_dir).resolve()
        for sub in ("identities", "results", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "difflora.sqlite3"
        self._conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction (committed on success, rolled back on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

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

    def sweep(self) -> int:
        """Remove leftovers of interrupted writes: temp folders/files and identity folders with no row."""
        removed = 0
        for p in (self.root / "tmp").iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed += 1
        known = {r["id"] for r in self.query("SELECT id FROM identities")}
        for p in (self.root / "identities").iterdir():
            if p.name not in known:
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
        for p in (self.root / "results").glob("*/.*.tmp"):
            p.unlink(missing_ok=True)
            removed += 1
        return removed

    # ---- identities -----------------------------------------------------------------------------------------
    def add_identity(self, rec: IdentityRecord, staged: Path) -> None:
        """Move the staged folder into place, then commit the row (a crash in between leaves an orphan folder
        that :meth:`sweep` removes)."""
        final = self.identity_dir(rec.id)
        os.replace(staged, final)
        with self.tx() as c:
            c.execute(
                "INSERT INTO identities (id, created, name, info, embeddings, num_embeddings) VALUES (?,?,?,?,?,?)",
                (rec.id, rec.created, rec.name, json.dumps(rec.info), rec.embeddings, rec.num_embeddings),
            )

    def get_identity(self, identity_id: str) -> IdentityRecord | None:
        if not valid_id(identity_id, "idt"):
            return None
        rows = self.query("SELECT * FROM identities WHERE id=?", (identity_id,))
        if not rows:
            return None
        r = rows[0]
        return IdentityRecord(
            r["id"], r["created"], r["name"], json.loads(r["info"]), r["embeddings"], r["num_embeddings"]
        )

    def identity_exists(self, identity_id: str) -> bool:
        return valid_id(identity_id, "idt") and bool(self.query("SELECT 1 FROM identities WHERE id=?", (identity_id,)))

    def delete_identity(self, identity_id: str) -> bool:
        if not valid_id(identity_id, "idt"):
            return False
        with self.tx() as c:
            n = c.execute("DELETE FROM identities WHERE id=?", (identity_id,)).rowcount
        if n:
            shutil.rmtree(self.identity_dir(identity_id), ignore_errors=True)
        return bool(n)

    def count_identities(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM identities")[0][0])

    # ---- jobs -----------------------------------------------------------------------------------------------
    def create_job(
        self, job_id: str, request: dict, request_hash: str, items: list[tuple[str, str, int]], key: str | None
    ) -> tuple[str, bool]:
        """Insert a job and its items; with an idempotency ``key`` already used, return ``(existing id, False)``.

        Raises ValueError("idempotency_mismatch") if the key was used for a different request.
        """
        now = time.time()
        with self.tx() as c:
            if key is not None:
                row = c.execute("SELECT id, request_hash FROM jobs WHERE idempotency_key=?", (key,)).fetchone()
                if row is not None:
                    if row["request_hash"] != request_hash:
                        raise ValueError("idempotency_mismatch")
                    return row["id"], False
            c.execute(
                "INSERT INTO jobs (id, created, updated, status, request, request_hash, idempotency_key, total) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (job_id, now, now, "queued", json.dumps(request), request_hash, key, len(items)),
            )
            c.executemany(
                "INSERT INTO job_items (job_id, idx, identity_id, prompt, seed, status) VALUES (?,?,?,?,?,'pending')",
                [(job_id, i, ident, prompt, seed) for i, (ident, prompt, seed) in enumerate(items)],
            )
        return job_id, True

    def get_job(self, job_id: str) -> dict | None:
        if not valid_id(job_id, "job"):
            return None
        rows = self.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        if not rows:
            return None
        job = dict(rows[0])
        job["request"] = json.loads(job["request"])
        counts = self.query(
            "SELECT status, COUNT(*) AS n, SUM(seconds) AS s FROM job_items WHERE job_id=? GROUP BY status", (job_id,)
        )
        by = {r["status"]: (r["n"], r["s"] or 0.0) for r in counts}
        job["done"] = by.get("done", (0, 0))[0]
        job["failed"] = by.get("failed", (0, 0))[0]
        secs = by.get("done", (0, 0.0))[1] + by.get("failed", (0, 0.0))[1]
        finished = job["done"] + job["failed"]
        job["seconds_per_item"] = secs / finished if finished else None
        return job

    def set_job_status(self, job_id: str, status: str, error: str | None = None, *, only_from: tuple = ()) -> bool:
        """Set a job's status (only if its current status is in ``only_from``, when given)."""
        now = time.time()
        sql = "UPDATE jobs SET status=?, updated=?, error=COALESCE(?, error)"
        args: list = [status, now, error]
        if status == "running":
            sql += ", started=COALESCE(started, ?)"
            args.append(now)
        if status in TERMINAL:
            sql += ", finished=?"
            args.append(now)
        sql += " WHERE id=?"
        args.append(job_id)
        if only_from:
            sql += f" AND status IN ({','.join('?' * len(only_from))})"
            args += list(only_from)
        with self.tx() as c:
            return c.execute(sql, tuple(args)).rowcount > 0

    def job_status(self, job_id: str) -> str | None:
        rows = self.query("SELECT status FROM jobs WHERE id=?", (job_id,))
        return rows[0]["status"] if rows else None

    def active_jobs(self) -> list[str]:
        """Jobs to run, oldest first."""
        return [
            r["id"] for r in self.query("SELECT id FROM jobs WHERE status IN ('queued','running') ORDER BY created")
        ]

    def requeue_running(self) -> int:
        """At start-up: jobs left 'running' by a stopped or crashed server go back to 'queued'."""
        with self.tx() as c:
            return c.execute(
                "UPDATE jobs SET status='queued', updated=? WHERE status='running'", (time.time(),)
            ).rowcount

    def pending_items(self, job_id: str) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM job_items WHERE job_id=? AND status='pending' ORDER BY idx", (job_id,))

    def complete_item(self, job_id: str, idx: int, images: list[bytes], seeds: list[int], seconds: float) -> None:
        """Write the item's images (deterministic names) then, in one transaction, record them and mark the item
        done. Re-running an item after a crash overwrites the same files and rows: every result exactly once."""
        folder = self.root / "results" / job_id
        folder.mkdir(parents=True, exist_ok=True)
        rels = []
        for k, data in enumerate(images):
            rel = f"results/{job_id}/{idx:05d}-{k}.png"
            atomic_write(self.root / rel, data)
            rels.append(rel)
        now = time.time()
        with self.tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO results (job_id, idx, k, seed, file, created) VALUES (?,?,?,?,?,?)",
                [(job_id, idx, k, seeds[k], rel, now) for k, rel in enumerate(rels)],
            )
            c.execute(
                "UPDATE job_items SET status='done', seconds=?, error=NULL WHERE job_id=? AND idx=?",
                (seconds, job_id, idx),
            )
            c.execute("UPDATE jobs SET updated=? WHERE id=?", (now, job_id))

    def fail_item(self, job_id: str, idx: int, error: str, seconds: float) -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE job_items SET status='failed', error=?, seconds=? WHERE job_id=? AND idx=?",
                (error, seconds, job_id, idx),
            )

    def job_results(self, job_id: str) -> list[dict]:
        rows = self.query(
            "SELECT i.idx, i.identity_id, i.prompt, i.status, i.error, r.k, r.seed, r.file FROM job_items i "
            "LEFT JOIN results r ON r.job_id=i.job_id AND r.idx=i.idx WHERE i.job_id=? ORDER BY i.idx, r.k",
            (job_id,),
        )
        return [dict(r) for r in rows]

    def result_file(self, job_id: str, idx: int, k: int) -> Path | None:
        if not valid_id(job_id, "job"):
            return None
        rows = self.query("SELECT file FROM results WHERE job_id=? AND idx=? AND k=?", (job_id, idx, k))
        return self.root / rows[0]["file"] if rows else None

    def jobs_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATES, 0)
        for r in self.query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
            counts[r["status"]] = r["n"]
        return counts
