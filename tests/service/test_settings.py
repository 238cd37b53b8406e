"""Settings from the environment and the bind-safety rule of ``difflora serve``."""

from __future__ import annotations

import pytest

from service.main import serve_main
from service.settings import Settings


def test_env_vars(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFLORA_QUEUE_SIZE", "7")
    monkeypatch.setenv("DIFFLORA_PRESET", "sd15")
    monkeypatch.setenv("DIFFLORA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DIFFLORA_CORS_ORIGINS", '["http://localhost:3000"]')
    s = Settings()
    assert (s.queue_size, s.preset, s.data_dir, s.cors_origins) == (7, "sd15", tmp_path, ["http://localhost:3000"])
    assert (s.default_size, s.max_size, s.max_photos) == (None, 1024, 10)  # the size comes from the model
    assert Settings(queue_size=3).queue_size == 3  # explicit beats the environment


@pytest.mark.parametrize(
    ("kw", "native", "expected"),
    [({}, 64, 64), ({}, 128, 128), ({"default_size": 96}, 128, 96), ({"max_size": 100}, 128, 100),
     ({"preset": "sd15"}, 512, 512), ({"preset": "sdxl"}, 1024, 1024)],
)  # fmt: skip
def test_default_size_is_the_models_own_resolution(kw, native, expected):
    s = Settings(**kw)
    assert s.use_model_size(native) == expected == s.default_size
    assert s.use_model_size(native * 2) == expected  # filled once: a later call does not move it


@pytest.mark.parametrize(
    "kw,ok",
    [({"host": "127.0.0.1"}, True), ({"host": "::1"}, True), ({"host": "localhost"}, True),
     ({"host": "0.0.0.0"}, False), ({"host": "0.0.0.0", "api_key": "long-enough-key"}, True),
     ({"host": "0.0.0.0", "allow_insecure_bind": True}, True), ({"api_key": "short"}, False),
     ({"queue_size": 0}, False), ({"default_steps": 500}, False), ({"device": "cpu"}, True),
     ({"device": "foo"}, False), ({"device": "meta"}, False), ({"device": "cuda"}, True),  # cuda: a GPU config
     ({"per_sample_max_error": 1.5}, False), ({"per_sample_max_error": -0.1}, False),
     ({"max_event_streams": 0}, False), ({"job_events_poll_s": 0.0}, False), ({"job_events_keepalive_s": 301}, False),
     ({"per_sample_max_error": 0.0, "max_event_streams": 1, "job_events_poll_s": 0.01}, True)],
)  # fmt: skip
def test_validation(kw, ok):
    if ok:
        Settings(**kw)
    else:
        with pytest.raises(ValueError):
            Settings(**kw)


def test_serve_refuses_public_bind_without_key(capsys, monkeypatch):
    monkeypatch.delenv("DIFFLORA_API_KEY", raising=False)
    assert serve_main(["--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "API key" in err and "Traceback" not in err and err.count("\n") == 1


def test_serve_refuses_an_unusable_device_before_listening(capsys):
    import torch

    bad = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert serve_main(["--device", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difflora serve: device:") and "CUDA" in err and err.count("\n") == 1


def test_serve_exits_when_the_models_cannot_load(tmp_path, capsys):
    rc = serve_main(["--model-path", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "d"), "--port", "0",
                     "--log-level", "error"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "failed to load" in err and "missing" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("kw", "database"),
    [({}, None), ({"database_url": ""}, None), ({"database_url": "postgresql://u:p@db:5432/x"}, "postgresql://u:p@db:5432/x"),
     ({"database_url": "postgres://u@db/x"}, "postgres://u@db/x"), ({"database_url": "mysql://u@db/x"}, ValueError),
     ({"database_url": "db:5432"}, ValueError), ({"job_lease_s": 0}, ValueError), ({"job_lease_s": 2.5}, None)],
)  # fmt: skip
def test_database_settings(kw, database, monkeypatch):
    monkeypatch.delenv("DIFFLORA_DATABASE_URL", raising=False)
    if database is ValueError:
        with pytest.raises(ValueError, match="database_url|job_lease_s"):
            Settings(**kw)
        return
    s = Settings(**kw)
    assert s.database == database and "p@db" not in repr(s)  # the password never shows in a repr or a log


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--database-url", "mysql://u:secret@db/x"], "database_url: expected postgresql://"),
     (["--database-url", "postgresql://u:secret@127.0.0.1:1/x"], "cannot use the database postgresql+psycopg://u:***@")],
)  # fmt: skip
def test_serve_database_errors_are_one_line_without_the_password(argv, message, tmp_path, capsys):
    assert serve_main([*argv, "--data-dir", str(tmp_path), "--port", "0", "--log-level", "error"]) == 2
    err = capsys.readouterr().err
    assert message in err and "secret" not in err and "Traceback" not in err and err.count("\n") == 1


def test_mixed_batches_flag():
    from service.main import build_parser, settings_from_args

    assert settings_from_args(build_parser().parse_args([])).mixed_batches is True
    assert settings_from_args(build_parser().parse_args(["--no-mixed-batches"])).mixed_batches is False
