"""One error shape everywhere: ``{"error": {"code": ..., "message": ..., "request_id": ...}}``; 500s are generic (no
traceback). ``request_id`` is the request's ``X-Request-ID`` (see ``service.request_id``)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .request_id import current_request_id

log = logging.getLogger("difflora.service")

try:  # python-multipart's cap on one part-header line (Starlette does not change it)
    from python_multipart.multipart import DEFAULT_MAX_HEADER_SIZE as _MULTIPART_HEADER_MAX
except ImportError:  # pragma: no cover - older python-multipart
    _MULTIPART_HEADER_MAX = 4224

_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "queue_full",
    500: "internal",
    503: "unavailable",
}


class ApiError(StarletteHTTPException):
    """An HTTP error with a stable machine-readable ``code``."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict | None = None, details: list | None = None
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code, self.details = code, details


def error_body(code: str, message: str, details: list | None = None) -> dict:
    err: dict = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    rid = current_request_id.get()
    if rid is not None:
        err["request_id"] = rid
    return {"error": err}


def error_response(status: int, code: str, message: str, headers: dict | None = None, details=None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _loc(loc) -> str:
    return ".".join(str(x) for x in loc if x not in ("body",)) or "body"


def _detail(e: dict) -> dict:
    """One validation error as ``{field, message}``; a JSON syntax error's location is a character offset."""
    loc = e.get("loc", ())
    if e.get("type") == "json_invalid":
        at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        return {"field": "body", "message": f"{e.get('msg', 'JSON decode error')}{at}"}
    return {"field": _loc(loc), "message": e.get("msg", "")}


def _multipart_reason(exc: BaseException) -> str | None:
    """Starlette answers every multipart parse failure with "Invalid multipart data."; the parser's own reason
    (python-multipart, chained below it) says what was wrong. None when ``exc`` is not such a failure."""
    e: BaseException | None = exc
    for _ in range(8):
        e = e.__cause__ or e.__context__ if e is not None else None
        if e is None:
            return None
        if type(e).__module__.startswith(("python_multipart", "multipart")):
            break
    else:
        return None
    why = str(e).strip()
    if "header size" in why.lower():
        return (
            "file name too long: a multipart part header (Content-Disposition with the file name) may be at most "
            f"{_MULTIPART_HEADER_MAX} bytes; send a shorter file name"
        )
    if "header count" in why.lower():
        return "too many headers in one multipart part"
    return f"invalid multipart body: {why[:200]}" if why else None


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _DEFAULT_CODES.get(exc.status_code, "error")
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and msg == "Invalid multipart data.":
            msg = _multipart_reason(exc) or msg
        return error_response(exc.status_code, code, msg, getattr(exc, "headers", None), getattr(exc, "details", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [_detail(e) for e in exc.errors()]
        first = details[0] if details else {"field": "body", "message": "invalid request"}
        msg = f"{first['field']}: {first['message']}"
        if len(details) > 1:
            msg += f" (and {len(details) - 1} more)"
        return error_response(422, "invalid_request", msg, details=details)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error")
