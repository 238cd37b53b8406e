"""The database: SQLAlchemy Core tables, the engine for a URL (SQLite in the data directory, or PostgreSQL), and the
versioned schema (Alembic migrations in ``service/migrations``, applied at start-up and by ``difflora db upgrade``).

>>> engine = make_engine(database_url(None, Path("difflora-data")))   # sqlite:///…/difflora-data/difflora.sqlite3
>>> upgrade(engine)                                                    # idempotent; serialised between replicas
>>> engine = make_engine("postgresql://difflora:secret@db:5432/difflora")

``tables`` describes the schema at the newest revision (what the code reads and writes); each migration is its own
frozen copy of a step, so changing a table means: edit it here *and* add a revision under ``migrations/versions``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

SQLITE_FILE = "difflora.sqlite3"  # the embedded database, inside the data directory
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
LEGACY_REVISION = "0001"  # the schema the service created before migrations existed (no alembic_version table)
READ_ONLY = "difflora_read_only"  # execution option: an SQLite transaction that only reads (deferred BEGIN)
DEFAULT_TENANT = "default"  # owner of rows made before tenants, of the shared api_key's and of keyless requests
_PG_MIGRATION_LOCK = 0x646966666C6F7261  # pg_advisory_xact_lock key ("difflora"): one replica migrates at a time

metadata = sa.MetaData()

identities = sa.Table(
    "identities",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("name", sa.Text, nullable=False, server_default=""),
    sa.Column("info", sa.Text, nullable=False),  # JSON: photos, consistency, warnings, seconds, spec
    sa.Column("embeddings", sa.LargeBinary, nullable=False),  # float32 (P, E) of the inlier photos
    sa.Column("num_embeddings", sa.Integer, nullable=False),
    sa.Column("tenant", sa.Text, nullable=False, server_default=DEFAULT_TENANT),  # owner (service.tenants)
    sa.Column("last_used", sa.Float),  # epoch seconds of the last generation or job item (NULL: never used)
    sa.Column("idempotency_key", sa.Text),  # "<tenant>/<Idempotency-Key>" of the creating request (unique)
    sa.Column("request_hash", sa.Text),  # SHA-256 of the creating request (photos + name), for replays
)
sa.Index("ix_identities_tenant_created", identities.c.tenant, identities.c.created, identities.c.id)
sa.Index("ux_identities_idempotency_key", identities.c.idempotency_key, unique=True)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("status", sa.Text, nullable=False),  # queued | running | succeeded | failed | canceled
    sa.Column("request", sa.Text, nullable=False),  # JSON of the validated request
    sa.Column("request_hash", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.Text, unique=True),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("started", sa.Float),
    sa.Column("finished", sa.Float),
    sa.Column("lease_owner", sa.Text),  # replica running the job (NULL unless running)
    sa.Column("lease_expires", sa.Float),  # epoch seconds; after it any replica may take the job over
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),  # claims so far (takeovers + 1)
    sa.Column("tenant", sa.Text, nullable=False, server_default=DEFAULT_TENANT),  # owner (service.tenants)
)
sa.Index("ix_jobs_status_created", jobs.c.status, jobs.c.created)
sa.Index("ix_jobs_tenant_created", jobs.c.tenant, jobs.c.created, jobs.c.id)

job_items = sa.Table(
    "job_items",
    metadata,
    sa.Column("job_id", sa.Text, primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("identity_id", sa.Text, nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("status", sa.Text, nullable=False),  # pending | done | failed
    sa.Column("error", sa.Text),
    sa.Column("seconds", sa.Float),
)
sa.Index("ix_job_items_identity", job_items.c.identity_id)

results = sa.Table(
    "results",
    metadata,
    sa.Column("job_id", sa.Text, primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("k", sa.Integer, primary_key=True),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("file", sa.Text, nullable=False),  # relative to data_dir, '/'-separated
    sa.Column("created", sa.Float, nullable=False),
)

replicas = sa.Table(
    "replicas",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # host-pid-nonce, unique per process
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),  # renewed with the job leases
)


def database_url(url: str | None, data_dir: Path) -> str:
    """The SQLAlchemy URL: ``url`` (``postgresql://`` is served by psycopg 3), else SQLite in ``data_dir``."""
    if not url:
        return f"sqlite:///{Path(data_dir).resolve() / SQLITE_FILE}"
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url.removeprefix(plain)
    if url.startswith(("postgresql+psycopg://", "sqlite:///")):
        return url
    raise ValueError("database_url must be postgresql://USER:PASSWORD@HOST:PORT/DB (or empty for SQLite)")


def redact(url: str) -> str:
    """``url`` with its password hidden (for logs and error messages)."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite: WAL, ``synchronous=NORMAL``, 30 s busy timeout, and every transaction
    ``BEGIN IMMEDIATE`` (writers queue on the write lock at once, so a read-then-write never fails half-way).
    PostgreSQL: psycopg 3, connections checked before use (a restarted server is survived)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # the driver's own implicit BEGINs off: SQLAlchemy's below instead
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA secure_delete=ON")  # deleted rows (face embeddings) are zeroed, not left in free pages
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _alembic_config(conn: Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """One connection in a transaction, held by one process at a time (PostgreSQL: an advisory lock; SQLite: a
    lock file beside the database, as replicas of an SQLite store share one machine)."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            yield conn
        return
    db_file = Path(engine.url.database)
    with open(db_file.with_name(db_file.name + ".migrate.lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with engine.begin() as conn:
                yield conn
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def revision(engine: Engine) -> str | None:
    """The schema revision of the database (``None``: empty; ``LEGACY_REVISION`` for a pre-migration database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
        if rev is None and sa.inspect(conn).has_table("jobs"):
            return LEGACY_REVISION
        return rev


def head() -> str:
    """The newest revision this code knows."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest revision; returns ``(revision before, revision after)``.

    A database created before migrations existed (tables but no ``alembic_version``) is stamped as
    ``LEGACY_REVISION`` first, then upgraded: existing data directories keep their data."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with _migration_lock(engine) as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        cfg = _alembic_config(conn)
        if before is None and sa.inspect(conn).has_table("jobs"):
            command.stamp(cfg, LEGACY_REVISION)
            before = LEGACY_REVISION
        command.upgrade(cfg, "head")
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def ensure_sqlite_dir(url: str) -> None:
    """Create the folder of an SQLite database file."""
    if url.startswith("sqlite:///"):
        os.makedirs(Path(sa.engine.make_url(url).database).parent, exist_ok=True)
