"""The Ray address probe: a real Ray head passes; closed, HTTP and silent ports fail at once with a clear error."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from pipeline_data.ray_build import connect, probe_ray_head


@pytest.fixture
def http_port():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def silent_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)  # accepts connections (the kernel completes the handshake) and never answers
    yield sock.getsockname()[1]
    sock.close()


def test_probe_accepts_a_real_ray_head():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        gcs = ray.get_runtime_context().gcs_address
        probe_ray_head(gcs, timeout_s=5)
    finally:
        ray.shutdown()


@pytest.mark.parametrize(
    ("port_fixture", "message"),
    [
        (None, "cannot reach the Ray cluster at 127.0.0.1:1"),
        ("http_port", "is not a Ray cluster: it accepts connections but does not answer"),
        ("silent_port", "is not a Ray cluster: it accepts connections but does not answer"),
    ],
)
def test_probe_refuses_ports_that_are_not_ray(request, port_fixture, message):
    port = request.getfixturevalue(port_fixture) if port_fixture else 1
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=message):
        probe_ray_head(f"127.0.0.1:{port}", timeout_s=1.0)
    assert time.perf_counter() - t0 < 5


def test_connect_to_a_port_that_is_not_ray_fails_at_once(http_port):
    pytest.importorskip("ray")
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{http_port} is not a Ray cluster"):
        connect(f"127.0.0.1:{http_port}", timeout_s=2.0)
    assert time.perf_counter() - t0 < 10
