"""End to end on a real server: ``python -m service.cli serve`` (uvicorn, loopback, tiny preset) driven over HTTP,
restarted mid-job; then the web page in Debian's Chromium (Playwright)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import OBAMA, photo_files
from tests.utils.faces import needs_faces

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
GEN = {"prompt": "a photo of sks person", "seed": 1234, "steps": 4, "width": 64, "height": 64, "guidance_scale": 5.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``difflora serve`` in a subprocess; ``stop()`` sends SIGTERM and waits for the drain."""

    def __init__(self, data_dir: Path, world: dict, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "DIFFLORA_THREADS": "1",
            "DIFFLORA_DEFAULT_STEPS": "4",
            "DIFFLORA_MODEL_PATH": world["model_path"],
            "DIFFLORA_UNTRAINED_HYPERNET": str(world["untrained_hypernet"]).lower(),
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        env.pop("DIFFLORA_API_KEY", None)
        cmd = [sys.executable, "-m", "service.cli", "serve", "--preset", "tiny", "--data-dir", str(data_dir),
               "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
        self.log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def wait_ready(self, timeout: float = 180) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, "server exited during start-up"
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError("server not ready")

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.http.close()
            self.log.close()


@pytest.fixture(scope="module")
def served(tiny_world, tmp_path_factory):
    data = tmp_path_factory.mktemp("e2e")
    box = {"data": data, "world": tiny_world, "log": data / "server.log"}
    box["server"] = Server(data, tiny_world, box["log"])
    box["server"].wait_ready()
    yield box
    srv = box["server"]
    if srv.proc.poll() is None:
        srv.stop()


def _png(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.int16)


def _wait_job(http: httpx.Client, jid: str, until, timeout: float = 180) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = http.get(f"/v1/jobs/{jid}").json()
        if until(job):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {jid}: {job}")


@needs_faces
def test_whole_flow_with_restart(served, tmp_path):
    srv: Server = served["server"]
    http = srv.http
    # identity from every obama photo
    r = http.post("/v1/identities", files=photo_files(OBAMA), data={"name": "obama"})
    assert r.status_code == 201, r.text
    ident = r.json()
    assert ident["photos_used"] >= len(OBAMA) - 1
    served["identity"] = ident["id"]
    # fixed seed twice: identical PNG bytes; the event loop stays free while the model works
    a = http.post("/v1/generations", json={**GEN, "identity_id": ident["id"]}, headers={"Accept": "image/png"})
    b = http.post("/v1/generations", json={**GEN, "identity_id": ident["id"]}, headers={"Accept": "image/png"})
    assert a.status_code == 200 and a.content == b.content and a.headers["x-seed"] == "1234"
    # every adapter format downloads and loads; the diffusers file in stock diffusers gives the same image
    from weights.io import load_any

    files = {}
    for fmt in ("diffusers", "kohya", "peft", "native"):
        d = http.get(f"/v1/identities/{ident['id']}/adapter", params={"format": fmt})
        assert d.status_code == 200, d.text
        files[fmt] = tmp_path / f"{fmt}.{'zip' if fmt == 'peft' else 'safetensors'}"
        files[fmt].write_bytes(d.content)
        if fmt != "peft":
            assert len(load_any(files[fmt]).spec.layers) == ident["adapter"]["layers"]
    from pipeline_data.models import load_pipeline

    pipe = load_pipeline(served["world"]["model_path"])
    pipe.load_lora_weights(str(tmp_path), weight_name="diffusers.safetensors")
    pipe.fuse_lora(lora_scale=1.0)
    import torch

    stock = pipe(GEN["prompt"], num_inference_steps=GEN["steps"], width=64, height=64, guidance_scale=5.0,
                 generator=[torch.Generator("cpu").manual_seed(1234)], output_type="pil").images[0]  # fmt: skip
    diff = np.abs(_png(a.content) - np.asarray(stock, np.int16))
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())
    # a batch job to completion
    small = http.post("/v1/jobs", json={"identity_ids": [ident["id"]], "prompts": ["a", "b"]}).json()
    assert _wait_job(http, small["id"], lambda j: j["status"] == "succeeded")["done"] == 2
    # a bigger job; restart the server in the middle of it
    n = 6
    req = {"identity_ids": [ident["id"]], "prompts": [f"photo {i} of sks person" for i in range(n)],
           "settings": {"steps": 10}}  # fmt: skip
    jid = http.post("/v1/jobs", json=req, headers={"Idempotency-Key": "restart-job"}).json()["id"]
    _wait_job(http, jid, lambda j: j["done"] >= 1)
    t = time.perf_counter()
    assert http.get("/healthz").status_code == 200
    assert time.perf_counter() - t < 2.0  # the event loop answers while the worker generates
    assert srv.stop() == 0  # SIGTERM: drains (the item in flight finishes) and exits cleanly
    db = sqlite3.connect(served["data"] / "difflora.sqlite3")
    done_at_stop = db.execute("SELECT COUNT(*) FROM job_items WHERE job_id=? AND status='done'", (jid,)).fetchone()[0]
    db.close()
    assert 1 <= done_at_stop < n, done_at_stop
    srv = served["server"] = Server(served["data"], served["world"], served["log"])
    srv.wait_ready()
    again = srv.http.post("/v1/jobs", json=req, headers={"Idempotency-Key": "restart-job"})
    assert again.status_code == 200 and again.json()["id"] == jid  # the key survives the restart
    job = _wait_job(srv.http, jid, lambda j: j["status"] in ("succeeded", "failed"))
    assert job["status"] == "succeeded" and job["done"] == n
    res = srv.http.get(f"/v1/jobs/{jid}/results").json()["results"]
    assert [it["index"] for it in res] == list(range(n)) and all(len(it["images"]) == 1 for it in res)
    db = sqlite3.connect(served["data"] / "difflora.sqlite3")
    rows = db.execute("SELECT idx, COUNT(*) FROM results WHERE job_id=? GROUP BY idx", (jid,)).fetchall()
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    assert sorted(rows) == [(i, 1) for i in range(n)]  # every result exactly once
    pngs = sorted((served["data"] / "results" / jid).iterdir())
    assert len(pngs) == n and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert not list(served["data"].glob("**/.*.tmp"))


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (apt-get install chromium)")
@needs_faces
def test_web_page_in_chromium(served, tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    srv: Server = served["server"]
    # the web page screenshot (docs/results.md) is refreshed only on request, so a test run leaves the tree unchanged
    out = REPO / "bench" / "results" / "web.png" if os.environ.get("DIFFLORA_SCREENSHOT") else tmp_path / "web.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_selector("#status.ready", timeout=60_000)
            page.set_input_files("#photos", [str(p) for p in OBAMA[:3]])
            page.click("#create")
            page.wait_for_function("document.querySelectorAll('#faces figure img').length >= 3", timeout=120_000)
            assert "identity idt_" in page.inner_text("#identity-info")
            assert 'prompt with "sks person"' in page.inner_text("#identity-info")
            # every format downloads from the page; the kohya file carries the trigger phrase
            from weights.io import export_info

            for fmt in ("kohya", "diffusers", "peft", "native"):
                with page.expect_download() as dl:
                    page.click(f"button.download[data-format={fmt}]")
                saved = tmp_path / dl.value.suggested_filename
                dl.value.save_as(saved)
                assert saved.stat().st_size > 1000 and saved.name.endswith("zip" if fmt == "peft" else "safetensors")
                if fmt == "kohya":
                    assert export_info(saved).trigger == "sks person"
            # base model and personalized model side by side, same seeds, at the scale the slider says
            rows = "document.querySelectorAll('#compare-rows tr').length"

            def compare(scale: str) -> list[list[str]]:
                page.evaluate(
                    "() => { const r = document.querySelector('#compare-rows'); if (r) r.replaceChildren(); }"
                )
                page.eval_on_selector("#compare-scale", f"(el) => {{ el.value = '{scale}'; "
                                      "el.dispatchEvent(new Event('input')); }")  # fmt: skip
                page.click("#compare")
                page.wait_for_function(f"{rows} === 2", timeout=120_000)
                return page.eval_on_selector_all(
                    "#compare-rows tr", "trs => trs.map(tr => [...tr.querySelectorAll('td')].map("
                    "td => td.querySelector('img') ? td.querySelector('img').src : td.textContent))",
                )  # fmt: skip

            page.fill("#compare-seed", "7")
            page.fill("#compare-seeds", "2")
            one = compare("1")
            assert [r[0] for r in one] == ["7", "8"] and "scale 1.0" in page.inner_text("#compare-head")
            assert all(r[1] != r[2] for r in one) and one[0][1] != one[1][1]  # the adapter changes each seed's image
            zero = compare("0")
            assert page.inner_text("#compare-scale-value") == "0.0"
            assert all(r[1] == r[2] for r in zero)  # scale 0 is the base model: the very same PNG
            assert [r[1] for r in zero] == [r[1] for r in one]  # same seeds, same base images
            page.fill("#seed", "42")
            page.click("#generate")
            page.wait_for_selector("#images img", timeout=120_000)
            assert page.eval_on_selector("#images img", "i => i.complete && i.naturalWidth") == 64
            assert "seed 42" in page.inner_text("#gen-info")
            page.click("#run-job")
            page.wait_for_function("document.querySelectorAll('#job-results img').length >= 2", timeout=120_000)
            assert "succeeded" in page.inner_text("#job-info")
            # an identity made by fine-tuning (a job with a progress bar) instead of predicting it
            page.check("#finetune")
            page.fill("#finetune-steps", "2")
            page.click("#create")
            page.wait_for_function("document.querySelector('#identity-info').textContent.includes('(fine-tune)')",
                                   timeout=120_000)  # fmt: skip
            assert page.eval_on_selector("#finetune-progress", "p => p.value") == 1
            page.screenshot(path=str(out), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize(
    "request_head",
    [
        b"POST /v1/identities HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1 junk\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello sent to the plain-HTTP port
    ],
)
def test_unparseable_request_gets_a_json_400(served, request_head):
    srv: Server = served["server"]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(request_head)
        raw = b""
        while chunk := sock.recv(4096):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head.lower()
    err = json.loads(body)["error"]
    assert err["code"] == "bad_request" and err["message"].startswith("malformed HTTP request")
    assert srv.http.get("/healthz").status_code == 200  # the server goes on serving
