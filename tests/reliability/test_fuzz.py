"""Property-based API fuzzing: schemathesis generates requests for every operation of the app's own OpenAPI schema and
each response must be no 5xx and conform to the schema (status code, content type, body).

Runs in-process against the loaded reliability app (tiny world, API key sent on every case). ``DIFFLORA_FUZZ_EXAMPLES``
raises the examples per operation (default 12, ~150 cases); ``bench/fuzz.py`` runs the >= 1,000-case version over HTTP.
"""

from __future__ import annotations

import os

import pytest

from tests.reliability.conftest import AUTH
from tests.reliability.fuzzing import fuzz_all, load_schema, seed_resources
from tests.service.conftest import OBAMA
from tests.utils.faces import needs_faces

pytest.importorskip("schemathesis")

EXAMPLES = int(os.environ.get("DIFFLORA_FUZZ_EXAMPLES", "12"))  # generated cases per operation


@needs_faces
def test_fuzz_every_operation(rel_app):
    """No generated request gets a 5xx or a response outside the schema, on every operation."""
    from schemathesis.python import asgi

    client, _ = rel_app
    schema = load_schema(client.get("/openapi.json", headers=AUTH).json())
    session = asgi.get_client(client.app)  # never entered: the app's lifespan is already running under ``client``
    session.headers.update(AUTH)
    known = seed_resources(session, "http://testserver", OBAMA[:2])
    report = fuzz_all(schema, session, "http://testserver", EXAMPLES, known=known)
    assert len(report["operations"]) >= 10
    new = {"GET /v1/identities", "GET /v1/jobs", "GET /v1/jobs/{job_id}/results", "POST /v1/identities"}
    assert new <= set(report["operations"]), sorted(report["operations"])  # lists, pages, Idempotency-Key
    assert report["cases"] >= 5 * len(report["operations"])
    bad = {k: v["failures"] for k, v in report["operations"].items() if v["failures"]}
    assert report["server_errors"] == 0 and report["violations"] == 0 and not bad, bad
    ok = sum(v["statuses"].get("200", 0) for k, v in report["operations"].items() if "{" in k)
    assert ok >= 5, "no fuzzed case reached an existing identity or job"
    assert client.get("/readyz").status_code == 200
