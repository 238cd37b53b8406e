"""The several-replica deployment files checked against the code (no Docker engine, no cluster): the compose file
``docker/compose.replicas.yaml`` and the Kubernetes manifest ``docker/k8s/difflora.yaml``. Every ``DIFFLORA_*``
variable is a real setting and the settings validate; every replica uses the same database and the same data
volume at ``data_dir``, its own GPU, and probes a real route; the schema is upgraded by a real ``difflora db``
command before the replicas (which then do not migrate) start."""

from __future__ import annotations

import pytest
import yaml

from tests.docker.deployfiles import MissingVariableError, interpolate, parse_volume
from tests.docker.test_deploy import API_KEY, DOCKER, known_env, settings_from

COMPOSE = DOCKER / "compose.replicas.yaml"
K8S = DOCKER / "k8s" / "difflora.yaml"
ENV = {"DIFFLORA_API_KEY": API_KEY, "POSTGRES_PASSWORD": "pg-secret-123"}


def _compose(env: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def _db_command(argv: list[str]) -> None:
    from service.cli import COMMANDS
    from service.dbcli import build_parser

    assert argv[:3] == ["difflora", "db", "upgrade"] and "db" in COMMANDS, argv
    build_parser().parse_args(argv[2:])  # SystemExit on an unknown option


@pytest.mark.parametrize("missing", sorted(ENV))
def test_compose_needs_its_secrets(missing):
    with pytest.raises(MissingVariableError, match=missing):
        _compose({k: v for k, v in ENV.items() if k != missing})


def test_compose_replicas_share_one_database_and_one_volume(monkeypatch):
    services = _compose(ENV)["services"]
    replicas = {n: s for n, s in services.items() if n.startswith("difflora-")}
    assert len(replicas) >= 2
    urls, data, gpus, ports = set(), set(), [], []
    for name, svc in replicas.items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert not {k for k in env if k.startswith("DIFFLORA_")} - known_env(), name
        s = settings_from(env, monkeypatch)
        assert s.database is not None and s.database.startswith("postgresql://") and "pg-secret-123" in s.database
        assert s.migrate is False and s.job_lease_s > 0 and s.api_key is not None
        urls.add(s.database)
        mounts = {t: (src, ro) for src, t, ro in map(parse_volume, svc["volumes"])}
        src, ro = mounts[str(s.data_dir)]
        assert not ro
        data.add(src)
        assert float(svc["stop_grace_period"].rstrip("s")) > s.drain_timeout_s
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        gpus += dev["device_ids"]
        ports.append(svc["ports"][0].split(":")[1])
    assert len(urls) == 1 and len(data) == 1  # one database, one data volume for every replica
    assert len(set(gpus)) == len(gpus) == len(replicas)  # one GPU each, none shared
    assert len(set(ports)) == len(ports)
    migrate = services["migrate"]
    _db_command(migrate["entrypoint"])
    menv = {k: str(v) for k, v in migrate["environment"].items()}
    assert menv["DIFFLORA_DATABASE_URL"] in urls
    assert {src for src, _, _ in map(parse_volume, migrate["volumes"])} == data
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]


def _k8s() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(K8S.read_text())}


def _env(container: dict) -> dict[str, str]:
    out = {}
    for e in container["env"]:
        out[e["name"]] = e.get("value", "postgresql://u:p@db:5432/x" if "url" in str(e) else API_KEY)
    return out


def test_kubernetes_replicas_share_one_volume_and_probe_real_routes(monkeypatch, tmp_path):
    from service.app import create_app
    from service.middleware import PUBLIC_PATHS
    from service.settings import Settings

    routes = set(create_app(Settings(data_dir=tmp_path), load=False).openapi()["paths"]) & set(PUBLIC_PATHS)
    docs = _k8s()
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    dep = docs["Deployment"]
    assert dep["spec"]["replicas"] >= 2
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    _db_command(init["command"])
    (main,) = pod["containers"]
    env = _env(main)
    assert not {k for k in env if k.startswith("DIFFLORA_")} - known_env()
    assert not {k for k in _env(init) if k.startswith("DIFFLORA_")} - known_env()
    s = settings_from(env, monkeypatch)
    assert s.database is not None and s.migrate is False and s.device == "cuda"
    assert pod["terminationGracePeriodSeconds"] > s.drain_timeout_s
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert claims[mounts[str(s.data_dir)]] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert {m["mountPath"]: m["name"] for m in init["volumeMounts"]}[str(s.data_dir)] == mounts[str(s.data_dir)]
    for path in (s.model_path, s.hypernet_path, s.face_model_dir):
        assert any(path.startswith(m + "/") for m in mounts if m != str(s.data_dir)), path
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        got = main[probe]["httpGet"]
        assert got["path"] in routes and got["port"] == s.port, probe
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == s.port
