"""API keys and tenants (``service.tenants``): keys files (JSON and TOML), their errors, the shared key as tenant
``default``, constant-time lookup over every stored digest, and ``difflora keys add/list``."""

from __future__ import annotations

import hashlib
import json

import pytest

from service.tenants import DEFAULT_TENANT, KeyRing, Tenant, hash_key, main, read_keys_file

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"


def test_json_and_toml_files_give_the_same_tenants(tmp_path):
    js = tmp_path / "keys.json"
    js.write_text(json.dumps([
        {"name": "alice", "key_sha256": hashlib.sha256(ALICE.encode()).hexdigest()},
        {"name": "ops", "key": BOB, "admin": True},
    ]))  # fmt: skip
    toml = tmp_path / "keys.toml"
    toml.write_text(
        f'[[keys]]\nname = "alice"\nkey_sha256 = "{hashlib.sha256(ALICE.encode()).hexdigest()}"\n\n'
        f'[[keys]]\nname = "ops"\nkey = "{BOB}"\nadmin = true\n'
    )
    for path in (js, toml):
        ring = KeyRing.from_settings(None, path)
        assert ring.authenticate(ALICE.encode()) == Tenant("alice", False)
        assert ring.authenticate(BOB.encode()) == Tenant("ops", True) and Tenant("ops", True).scope is None
        assert ring.authenticate(b"wrong-key-0123456789") is None and ring.authenticate(None) is None
        assert [t.name for _, t in read_keys_file(path)] == ["alice", "ops"]


def test_the_shared_key_is_tenant_default_and_no_key_means_no_check(tmp_path):
    ring = KeyRing.from_settings(ALICE, None)
    assert ring.required and ring.authenticate(ALICE.encode()) == Tenant(DEFAULT_TENANT)
    assert ring.authenticate(ALICE[:-1].encode()) is None
    open_ring = KeyRing.from_settings(None, None)
    assert not open_ring.required and open_ring.authenticate(None) == Tenant(DEFAULT_TENANT)
    assert ring.keys[0][0] == hashlib.sha256(ALICE.encode()).digest() and ALICE.encode() not in ring.keys[0][0]


def test_every_stored_digest_is_compared(monkeypatch):
    """The lookup compares with every key (no early exit at the first match), with hmac.compare_digest."""
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    ring = KeyRing([(hash_key(f"key-{i}-0123456789abcdef"), Tenant(f"t{i}")) for i in range(5)])
    assert ring.authenticate(b"key-0-0123456789abcdef") == Tenant("t0")
    assert len(calls) == 5


def _js(*entries) -> str:
    return json.dumps(list(entries))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "no keys in it"),
        ('{"keys": 3}', "expected a list of keys"),
        ('["x"]', r"keys\[0\]: expected a table/object"),
        (_js({"name": "a b", "key": ALICE}), r"keys\[0\]\.name: 1-64 characters"),
        (_js({"name": "a" * 65, "key": ALICE}), r"keys\[0\]\.name"),
        (_js({"name": "a", "key": "short"}), r"keys\[0\]\.key: at least 16 characters"),
        (_js({"name": "a", "key_sha256": "abc"}), r"keys\[0\]\.key_sha256: 64 hex digits"),
        (_js({"name": "a"}), "exactly one of key_sha256"),
        (_js({"name": "a", "key": ALICE, "key_sha256": "0" * 64}), "exactly one of key_sha256"),
        (_js({"name": "a", "key": ALICE, "admin": "yes"}), r"keys\[0\]\.admin: expected true or false"),
        (_js({"name": "a", "key": ALICE, "role": "x"}), "unknown field 'role'"),
        (_js({"name": "a", "key": ALICE}, {"name": "b", "key": ALICE}), "configured twice"),
    ],
)
def test_bad_keys_files_are_named(tmp_path, content, message):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        KeyRing.from_settings(None, path)


def test_a_bad_keys_file_is_a_settings_error(tmp_path):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="api_keys_file .*missing.json: cannot read it"):
        Settings(api_keys_file=tmp_path / "missing.json")
    good = tmp_path / "keys.json"
    good.write_text(json.dumps([{"name": "alice", "key": ALICE}]))
    Settings(host="0.0.0.0", api_keys_file=good)  # a keys file is an API key: binding beyond loopback is allowed


def test_keys_add_prints_the_key_once_and_stores_its_hash(tmp_path, capsys):
    path = tmp_path / "sub" / "keys.json"
    assert main(["add", "alice", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    assert main(["add", "ops", "--admin", "--file", str(path)]) == 0
    admin_key = capsys.readouterr().out.strip()
    text = path.read_text()
    assert key not in text and admin_key not in text and key.startswith("dfl_") and len(key) >= 40
    ring = KeyRing.from_settings(None, path)
    assert ring.authenticate(key.encode()) == Tenant("alice") and ring.authenticate(admin_key.encode()).admin
    assert main(["list", "--file", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["alice", "ops admin"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "bad name", "--file", "{tmp}/k.json"], "NAME: 1-64 characters"),
        (["add", "alice", "--file", "{tmp}/k.toml"], "writes JSON keys files"),
        (["add", "alice", "--file", "{tmp}/broken.json"], "not valid JSON"),
        (["list", "--file", "{tmp}/none.json"], "cannot read it"),
    ],
)
def test_keys_command_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    (tmp_path / "broken.json").write_text("[")
    monkeypatch.delenv("DIFFLORA_API_KEYS_FILE", raising=False)
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "broken.json").read_text() == "["  # a file it refused is left as it was
