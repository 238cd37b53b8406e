"""``difflora db``: the database schema. ``upgrade`` applies the migrations (the service also does at start-up
unless ``DIFFLORA_MIGRATE=0``); ``current`` prints the revision of the database and the newest one known.

>>> difflora db upgrade --data-dir /data                            # SQLite in /data
>>> DIFFLORA_DATABASE_URL=postgresql://difflora:pw@db/difflora difflora db upgrade
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difflora db", description="Create or upgrade the service database schema.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("upgrade", "apply every migration not applied yet"), ("current", "print the revisions")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--data-dir", default=os.environ.get("DIFFLORA_DATA_DIR", "difflora-data"),
                       help="data directory (its SQLite database when no database URL is given)")  # fmt: skip
        s.add_argument("--database-url", default=os.environ.get("DIFFLORA_DATABASE_URL") or None,
                       help="postgresql://USER:PASSWORD@HOST:PORT/DB (default: DIFFLORA_DATABASE_URL)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import sqlalchemy as sa

    from .db import database_url, ensure_sqlite_dir, head, make_engine, redact, revision, upgrade

    try:
        url = database_url(args.database_url, Path(args.data_dir))
    except ValueError as e:
        print(f"difflora db: --database-url: {e}", file=sys.stderr)
        return 2
    if url.startswith("sqlite") and not Path(args.data_dir).is_dir() and args.cmd == "current":
        print(f"difflora db: --data-dir {args.data_dir} is not a folder", file=sys.stderr)
        return 2
    ensure_sqlite_dir(url)
    engine = make_engine(url)
    try:
        if args.cmd == "current":
            print(f"{redact(url)}: revision {revision(engine) or 'none (empty)'}, newest {head()}")
            return 0
        before, after = upgrade(engine)
        what = "already at" if before == after else f"upgraded from {before or 'empty'} to"
        print(f"{redact(url)}: {what} revision {after}")
        return 0
    except sa.exc.OperationalError as e:
        print(f"difflora db: cannot use {redact(url)}: {str(e.orig or e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
