"""Tenants: who a request is, from its API key, and ``difflora keys`` to make keys.

Each API key belongs to a tenant (a name) and may be an admin key. Every identity, job and result belongs to the
tenant whose key created it; another tenant's ids answer 404, exactly like missing ones; an admin key reads and
lists everything. Where the keys come from (``Settings``):

* ``api_keys_file`` (``DIFFLORA_API_KEYS_FILE``): a JSON or TOML file of keys, each ``{name, key_sha256 | key,
  admin}``; ``difflora keys add NAME [--admin]`` makes a key, prints it once and stores only its hash there;
* ``api_key`` (``DIFFLORA_API_KEY``): the single shared key of earlier versions, tenant ``default``;
* neither (loopback development): no key is asked for and every request is tenant ``default``.

Keys are stored as SHA-256 digests. A key made here is 256 random bits, so its digest cannot be inverted by a
dictionary or brute force; slow password hashes (bcrypt, argon2) exist for low-entropy human passwords and would
only add tens of milliseconds to every request. A request's key is hashed once and compared with every stored
digest by ``hmac.compare_digest`` (no early exit), so the time taken says nothing about any stored key.

>>> difflora keys add alice --file keys.json          # prints the new key once
>>> DIFFLORA_API_KEYS_FILE=keys.json difflora serve
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .db import DEFAULT_TENANT

TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # tenant names: 1..64 characters, safe in paths/logs
MIN_KEY_CHARS = 16  # a plain-text key in a keys file must be at least this long
KEY_PREFIX = "dfl_"  # keys made by `difflora keys add`: dfl_ + 43 url-safe characters (256 bits)


@dataclass(frozen=True)
class Tenant:
    name: str  # owner of what this key creates
    admin: bool = False  # may read, list and delete every tenant's identities and jobs

    @property
    def scope(self) -> str | None:
        """The owner filter for storage queries: the tenant's name, or None (everything) for an admin."""
        return None if self.admin else self.name


ANONYMOUS = Tenant(DEFAULT_TENANT)  # every request when no key is configured


def hash_key(key: str | bytes) -> bytes:
    """SHA-256 digest of an API key (what is stored)."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def new_key() -> str:
    """A fresh API key: 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """The configured keys: ``authenticate(key) -> Tenant | None``. Empty: no key needed (``required`` False)."""

    def __init__(self, keys: list[tuple[bytes, Tenant]]) -> None:
        self.keys = list(keys)

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def authenticate(self, given: bytes | None) -> Tenant | None:
        """The tenant of ``given`` (None: no such key). Every stored digest is compared, in constant time."""
        if not self.keys:
            return ANONYMOUS
        if given is None:
            return None
        digest, found = hash_key(given), None
        for stored, tenant in self.keys:
            if hmac.compare_digest(digest, stored) and found is None:
                found = tenant
        return found

    @classmethod
    def from_settings(cls, api_key: str | None, keys_file: str | os.PathLike | None) -> KeyRing:
        """The shared key (tenant ``default``) plus the keys file's keys; ValueError naming a bad file entry."""
        keys = [(hash_key(api_key), Tenant(DEFAULT_TENANT))] if api_key else []
        if keys_file:
            from_file = read_keys_file(Path(keys_file))
            if not from_file:  # an empty file must not turn the key check off
                raise ValueError(f"api_keys_file {keys_file}: no keys in it (add one: difflora keys add NAME)")
            keys += from_file
        digests = [d for d, _ in keys]
        if len(set(digests)) != len(digests):
            raise ValueError("the same API key is configured twice (api_key and api_keys_file, or twice in the file)")
        return cls(keys)


def _entries(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"api_keys_file {path}: cannot read it ({e})") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ValueError(f"api_keys_file {path}: not valid {kind} ({e})") from None
    if isinstance(data, dict):
        data = data.get("keys")
    if not isinstance(data, list):
        raise ValueError(f"api_keys_file {path}: expected a list of keys (JSON [...] or TOML [[keys]])")
    return data


def read_keys_file(path: Path) -> list[tuple[bytes, Tenant]]:
    """The keys of a JSON (a list, or ``{"keys": [...]}``) or TOML (``[[keys]]`` tables) keys file; each entry
    ``{"name": TENANT, "key_sha256": HEX | "key": TEXT, "admin": false}``. ValueError naming the entry and field."""
    out = []
    for i, e in enumerate(_entries(path)):
        where = f"api_keys_file {path}: keys[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected a table/object")
        unknown = set(e) - {"name", "key", "key_sha256", "admin"}
        if unknown:
            raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        name = e.get("name")
        if not isinstance(name, str) or not TENANT_RE.fullmatch(name):
            raise ValueError(f"{where}.name: 1-64 characters of A-Z a-z 0-9 _ . - (starting with a letter or digit)")
        admin = e.get("admin", False)
        if not isinstance(admin, bool):
            raise ValueError(f"{where}.admin: expected true or false")
        if ("key" in e) == ("key_sha256" in e):
            raise ValueError(f"{where}: give exactly one of key_sha256 (preferred) and key")
        if "key" in e:
            if not isinstance(e["key"], str) or len(e["key"]) < MIN_KEY_CHARS:
                raise ValueError(f"{where}.key: at least {MIN_KEY_CHARS} characters")
            digest = hash_key(e["key"])
        else:
            hexd = e["key_sha256"]
            if not isinstance(hexd, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", hexd):
                raise ValueError(f"{where}.key_sha256: 64 hex digits (the SHA-256 of the key)")
            digest = bytes.fromhex(hexd)
        out.append((digest, Tenant(name, admin)))
    return out


# ---- difflora keys --------------------------------------------------------------------------------------------------
def add_key(path: Path, name: str, admin: bool = False) -> str:
    """Make a key for tenant ``name``, add its hash to the JSON keys file ``path`` (created if missing; written
    atomically) and return the key (shown once: only its hash is kept)."""
    from .storage import atomic_write

    if not TENANT_RE.fullmatch(name):
        raise ValueError("NAME: 1-64 characters of A-Z a-z 0-9 _ . - (starting with a letter or digit)")
    if path.suffix.lower() == ".toml":
        raise ValueError(f"{path}: difflora keys writes JSON keys files; use a .json file")
    entries = _entries(path) if path.exists() else []
    read_keys_file(path) if path.exists() else None  # refuse to extend a file the server would refuse
    key = new_key()
    entries.append({"name": name, "key_sha256": hash_key(key).hex(), "admin": admin})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(entries, indent=2) + "\n").encode())
    return key


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="difflora keys", description="API keys of the service's tenants.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="make a key for a tenant; prints it once and stores only its SHA-256")
    a.add_argument("name", help="tenant name (1-64 of A-Z a-z 0-9 _ . -)")
    a.add_argument("--admin", action="store_true", help="the key may read and list every tenant's data")
    a.add_argument("--file", default=os.environ.get("DIFFLORA_API_KEYS_FILE") or None,
                   help="the JSON keys file (default: DIFFLORA_API_KEYS_FILE)")  # fmt: skip
    ls = sub.add_parser("list", help="the tenants of a keys file (names and admin flags; keys are not stored)")
    ls.add_argument("--file", default=os.environ.get("DIFFLORA_API_KEYS_FILE") or None)
    args = p.parse_args(argv)
    if not args.file:
        print(f"difflora keys {args.cmd}: --file is required (or set DIFFLORA_API_KEYS_FILE)", file=sys.stderr)
        return 2
    try:
        if args.cmd == "add":
            key = add_key(Path(args.file), args.name, args.admin)
            print(key)
            print(f"added tenant {args.name!r}{' (admin)' if args.admin else ''} to {args.file}; "
                  "this key is not shown again", file=sys.stderr)  # fmt: skip
            return 0
        for _, t in read_keys_file(Path(args.file)):
            print(f"{t.name}{' admin' if t.admin else ''}")
        return 0
    except ValueError as e:
        print(f"difflora keys {args.cmd}: {e}", file=sys.stderr)
        return 2
