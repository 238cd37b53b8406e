"""A throw-away PostgreSQL server for the test session: Debian's binaries (``/usr/lib/postgresql/<N>/bin``), a data
directory in a temp folder, trust auth, loopback only, a free port; stopped and removed at the end of the session.

``DIFFLORA_TEST_POSTGRES_URL`` set: that server is used instead (nothing is started). Where no server can be
started, :func:`start` raises :class:`Unavailable` with the reason, and the PostgreSQL cases are skipped with it.
The server refuses to run as root, so as root it runs as the ``postgres`` user (``runuser``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass

ENV_URL = "DIFFLORA_TEST_POSTGRES_URL"


class Unavailable(RuntimeError):
    """No PostgreSQL server could be started (the message says why)."""


@dataclass
class Server:
    url: str  # postgresql://… of the database made for the tests
    data: str | None  # the cluster's folder (None: an external server from ENV_URL)
    bin_dir: str | None
    as_user: str | None  # run pg_ctl as this user (root cannot run the server)

    def stop(self) -> None:
        if self.data is None:
            return
        _run(self, "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(os.path.dirname(self.data), ignore_errors=True)
        self.data = None


def _bin_dir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    on_path = shutil.which("pg_ctl")
    if on_path:
        return os.path.dirname(on_path)
    raise Unavailable("PostgreSQL is not installed (Debian: apt-get install postgresql; `make test` tries it)")


def _run(srv: Server, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [os.path.join(srv.bin_dir or "", tool), *args]
    if srv.as_user:
        cmd = ["runuser", "-u", srv.as_user, "--", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise Unavailable(f"{tool} failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> Server:
    """Start (or, with ``DIFFLORA_TEST_POSTGRES_URL``, reuse) a server; :class:`Unavailable` if it cannot."""
    if os.environ.get(ENV_URL):
        return Server(os.environ[ENV_URL], None, None, None)
    bin_dir = _bin_dir()
    as_user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable("running as root and there is no 'postgres' user to run the server as") from None
        if not shutil.which("runuser"):
            raise Unavailable("running as root and runuser is missing")
        as_user = "postgres"
    top = tempfile.mkdtemp(prefix="difflora-pg-")
    os.chmod(top, 0o755)
    data = os.path.join(top, "data")
    srv = Server("", data, bin_dir, as_user)
    if as_user:
        ent = pwd.getpwnam(as_user)
        os.chown(top, ent.pw_uid, ent.pw_gid)
    try:
        _run(srv, "initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D", data)
        port = _free_port()
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {top} -c fsync=off -c full_page_writes=off"
        _run(srv, "pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(top, "server.log"), "-w", "-t", "60", "start")
        _run(srv, "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "difflora_test")
    except (Unavailable, OSError, subprocess.TimeoutExpired) as e:
        srv.stop()
        raise Unavailable(f"could not start a PostgreSQL server: {e}") from None
    srv.url = f"postgresql://postgres@127.0.0.1:{port}/difflora_test"
    return srv


def fresh_database(url: str, name: str) -> str:
    """A new, empty database ``name`` on the server of ``url`` (dropped first if it exists); its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name
