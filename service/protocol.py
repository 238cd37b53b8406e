"""uvicorn's HTTP protocol with a JSON body on the 400 it sends for a request it cannot parse.

uvicorn answers a malformed request (a ``Content-Length: abc`` header, a broken request line) itself, before the
app sees it, with a plain-text 400. This subclass of the protocol uvicorn would pick (``auto``: httptools when it
is installed, else h11) sends the service's error shape instead: ``{"error": {"code": "bad_request", ...}}``.
"""

from __future__ import annotations

import json


def json_error_protocol() -> type:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class JsonErrorHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(
                {"error": {"code": "bad_request", "message": f"malformed HTTP request: {msg.rstrip('.')}"}}
            ).encode()
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
            ]
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    return JsonErrorHTTPProtocol
