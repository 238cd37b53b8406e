"""Pure-ASGI guard in front of the app: request id (``X-Request-ID``), request metrics and access log, API key
(hashed, constant-time; its tenant goes into the scope as ``scope["difflora.tenant"]``), body-size cap (413) — all
before Starlette parses a byte of the body (it reads whole multipart bodies before any handler runs). An unhandled
exception becomes the generic 500 here, so that it carries the request id too."""

from __future__ import annotations

import json
import logging
import time

from .errors import ApiError, error_body
from .metrics import Metrics
from .request_id import HEADER, RULE, current_request_id, new_request_id, parse_request_id
from .tenants import ANONYMOUS, KeyRing

log = logging.getLogger("difflora.service")
access_log = logging.getLogger("difflora.access")
_RID = HEADER.lower().encode()
TENANT_SCOPE_KEY = "difflora.tenant"  # the request's Tenant in the ASGI scope (service.deps.get_tenant)

PUBLIC_PATHS = ("/healthz", "/readyz")  # never need the API key
WEB_PATHS = ("/", "/static/")  # the web page and its assets (no data; the page asks for the key itself)


class BodyTooLargeError(ApiError):
    """Raised from ``receive`` once the streamed body passes the cap (an HTTP error, so FastAPI's body parsing
    passes it through instead of turning it into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"request body is larger than the {limit} byte limit")


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    def __init__(self, app, *, max_body_bytes: int, keys: KeyRing, metrics: Metrics) -> None:
        self.app, self.max_body, self.metrics, self.keys = app, max_body_bytes, metrics, keys

    def _needs_key(self, path: str) -> bool:
        if not self.keys.required or path in PUBLIC_PATHS:
            return False
        return not (path == "/" or path.startswith("/static/"))

    def _tenant(self, headers: dict[bytes, bytes]):
        given = headers.get(b"x-api-key")
        if given is None:
            auth = headers.get(b"authorization", b"")
            if auth[:7].lower() == b"bearer ":
                given = auth[7:].strip()
        return self.keys.authenticate(given)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = {"status": 500, "started": False}
        given = [v for k, v in scope.get("headers") or [] if k.lower() == _RID]
        rid = parse_request_id(given[0]) if len(given) == 1 else None
        bad = None if rid is not None or not given else (f"send one {HEADER} header" if len(given) > 1 else RULE)
        rid = rid or new_request_id()
        current_request_id.set(rid)  # this request's task only (its context; no reset: 500s are sent after)
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (_RID, rid.encode())

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), rid_header]}
            await send(message)

        try:
            if bad is not None:
                msg = f"{HEADER}: {bad}"
                details = [{"field": HEADER, "message": bad}]
                await _send_json(send_wrapper, 422, error_body("invalid_request", msg, details))
                return
            await self._guarded(scope, receive, send_wrapper, state)
        except Exception:
            if state["started"]:
                raise
            log.exception("unhandled error on %s %s", scope.get("method", ""), scope.get("path", ""))
            await _send_json(send_wrapper, 500, error_body("internal", "internal server error"))
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("unmatched" if state["status"] in (401, 404, 413) else "other")
            method = scope.get("method", "")
            dt = time.perf_counter() - t0
            self.metrics.requests.labels(method, label, str(state["status"])).inc()
            self.metrics.latency.labels(method, label).observe(dt)
            access_log.info("%s %s %d %.3fs", method, scope.get("path", ""), state["status"], dt)

    async def _guarded(self, scope, receive, send, state) -> None:
        headers = dict(scope.get("headers") or [])
        tenant = self._tenant(headers) if self._needs_key(scope["path"]) else ANONYMOUS
        scope[TENANT_SCOPE_KEY] = tenant
        if tenant is None:
            await _send_json(
                send, 401, error_body("unauthorized", "missing or invalid API key (send it as X-API-Key)"),
                [(b"www-authenticate", b'ApiKey header="X-API-Key"')],
            )  # fmt: skip
            return
        cl = headers.get(b"content-length")
        if cl is not None:
            if not cl.isdigit():
                await _send_json(send, 400, error_body("bad_request", "invalid Content-Length header"))
                return
            if int(cl) > self.max_body:
                await _send_json(send, 413, error_body("payload_too_large", self._too_large_msg()))
                return
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLargeError(self.max_body)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLargeError:
            if state["started"]:
                raise
            await _send_json(send, 413, error_body("payload_too_large", self._too_large_msg()))

    def _too_large_msg(self) -> str:
        return f"request body is larger than the {self.max_body} byte limit"
