"""Schemathesis fuzzing of the service's own OpenAPI schema, shared by ``test_fuzz.py`` and ``bench/fuzz.py``.

The schema is read from a running app; generated cases go through a requests session (an in-process ASGI session or
a plain one against a live server). Every response is checked: no 5xx, declared status code and content type, body
conforms to the schema. Failures are collected, not raised, so one run reports every operation.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

CHECK_NAMES = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


def load_schema(raw: dict) -> Any:
    """A schemathesis schema from the app's ``/openapi.json`` document."""
    import schemathesis

    return schemathesis.openapi.from_dict(raw)


def _checks() -> list:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def seed_resources(session: Any, base_url: str, photos: list[Path]) -> dict[str, str]:
    """Create one identity (from ``photos``) and one finished job, so that fuzzed paths also hit real resources:
    ``{"identity_id": ..., "job_id": ...}``."""
    files = [("photos", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    r = session.post(base_url + "/v1/identities", files=files, data={"name": "fuzz"}, timeout=300)
    if r.status_code != 201:
        raise RuntimeError(f"identity for fuzzing not created: {r.status_code} {r.text[:300]}")
    iid = r.json()["id"]
    r = session.post(
        base_url + "/v1/jobs", json={"identity_ids": [iid], "prompts": ["a photo"], "seed": 1}, timeout=60
    )
    if r.status_code != 202:
        raise RuntimeError(f"job for fuzzing not created: {r.status_code} {r.text[:300]}")
    jid = r.json()["id"]
    t0 = time.monotonic()
    while session.get(f"{base_url}/v1/jobs/{jid}", timeout=60).json()["status"] not in ("succeeded", "failed"):
        if time.monotonic() - t0 > 300:
            raise TimeoutError(f"job {jid} not finished after 300 s")
        time.sleep(0.2)
    return {"identity_id": iid, "job_id": jid}


def fuzz_operation(
    op: Any, session: Any, base_url: str, examples: int, seed: int | None = 0, known: dict[str, str] | None = None
) -> dict:
    """Run ``examples`` generated cases (valid and invalid requests) of one operation.

    With ``known`` (path parameter -> an existing id), every other case of a non-DELETE operation uses the existing
    resource, so 200 answers are checked too. Returns counts, statuses and up to 5 failure messages (with the
    response text and a curl reproducer)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.core.failures import Failure, FailureGroup

    checks = _checks()
    out: dict = {"cases": 0, "server_errors": 0, "violations": 0, "statuses": Counter(), "failures": []}

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        case=st.one_of(
            *(op.as_strategy(generation_mode=m) for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))
        )
    )
    def run(case: Any) -> None:
        out["cases"] += 1
        if known and case.method != "DELETE" and out["cases"] % 2 == 0 and isinstance(case.path_parameters, dict):
            for name in set(known) & set(case.path_parameters):
                case.path_parameters[name] = known[name]
        resp = case.call(base_url=base_url, session=session)
        out["statuses"][resp.status_code] += 1
        if resp.status_code >= 500:
            out["server_errors"] += 1
        try:
            case.validate_response(resp, checks=checks)
        except (FailureGroup, Failure) as exc:
            fails = list(exc.exceptions) if isinstance(exc, FailureGroup) else [exc]
            out["violations"] += sum(1 for f in fails if "server error" not in f.title.lower())
            if len(out["failures"]) < 5:
                out["failures"].append(
                    f"{case.method} {case.formatted_path} -> {resp.status_code}: "
                    + "; ".join(f.title for f in fails)
                    + f" | {resp.text[:200]} | {case.as_curl_command()[:400]}"
                )

    if seed is not None:
        run = hseed(seed)(run)
    run()
    out["statuses"] = {str(k): v for k, v in sorted(out["statuses"].items())}
    return out


def fuzz_all(
    schema: Any, session: Any, base_url: str, examples: int, seed: int | None = 0, known: dict[str, str] | None = None
) -> dict:
    """Fuzz every operation of ``schema``: ``{"operations": {label: counts}, "cases", "server_errors", ...}``."""
    ops: dict = {}
    t0 = time.perf_counter()
    for result in schema.get_all_operations():
        op = result.ok()
        t = time.perf_counter()
        ops[op.label] = fuzz_operation(op, session, base_url, examples, seed, known)
        ops[op.label]["seconds"] = round(time.perf_counter() - t, 2)
    return {
        "operations": ops,
        "cases": sum(o["cases"] for o in ops.values()),
        "server_errors": sum(o["server_errors"] for o in ops.values()),
        "violations": sum(o["violations"] for o in ops.values()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
