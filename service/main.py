"""``difflora serve``: run the HTTP service with uvicorn (options override ``DIFFLORA_*`` environment variables)."""

from __future__ import annotations

import argparse
import logging
import sys

from .settings import Settings, check_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difflora serve", description="Serve face personalization over HTTP.")
    p.add_argument("--preset", choices=["tiny", "sd15", "sdxl"], help="base model preset (default: tiny)")
    p.add_argument("--model-path", help="local diffusers folder for the base model (overrides the preset's)")
    p.add_argument("--hypernet-path", help="hypernetwork predictor checkpoint directory")
    p.add_argument(
        "--untrained-hypernet",
        action="store_true",
        default=None,
        help="use an untrained hypernet (no-op adapters; for development without a checkpoint)",
    )
    p.add_argument("--hypernet", choices=["auto", "off"],
                   help="auto: the trained hypernet if there is one; off: identities by fine-tuning only")  # fmt: skip
    p.add_argument("--face-backend", choices=["dlib", "insightface"], help="face encoder (default: dlib)")
    p.add_argument("--face-model-dir", help="insightface model pack directory")
    p.add_argument("--data-dir", help="where the files (and the SQLite database) live (default: ./difflora-data)")
    p.add_argument("--database-url", help="PostgreSQL shared by replicas (better: DIFFLORA_DATABASE_URL)")
    p.add_argument("--job-lease-s", type=float, help="seconds before a dead replica's job is taken over (30)")
    p.add_argument("--device", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="bind port (default 8000; 0 = any free port)")
    p.add_argument("--threads", type=int, help="torch CPU threads of the model worker")
    p.add_argument("--queue-size", type=int, help="queued model requests before 429")
    p.add_argument("--no-mixed-batches", dest="mixed_batches", action="store_false", default=None,
                   help="one identity per model call (swap the merged adapter), as before mixed batches")  # fmt: skip
    p.add_argument("--allow-insecure-bind", action="store_true", default=None,
                   help="allow binding beyond loopback without an API key (DIFFLORA_API_KEY)")  # fmt: skip
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=None, help="skip the warm-up")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with every option given on the command line taking precedence."""
    skip = {"log_level"}
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    return Settings(**overrides)


def _one_line(e: ValueError) -> str:
    """The first validation problem as ``field: message`` (no pydantic URLs, no input dumps)."""
    errors = getattr(e, "errors", None)
    if callable(errors) and errors():
        err = errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        return f"{loc}: {msg}" if loc else msg
    return str(e).splitlines()[0]


def serve_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as e:  # pydantic ValidationError is a ValueError
        print(f"difflora serve: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        check_device(settings.device)  # before listening, not as a load failure after it
    except ValueError as e:
        print(f"difflora serve: device: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app
    from .protocol import json_error_protocol
    from .request_id import install_log_filter

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
    )
    install_log_filter()
    try:
        app = create_app(settings)
    except (OSError, ValueError, RuntimeError) as e:  # e.g. an unreachable database, a schema too old
        print(f"difflora serve: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=args.log_level, proxy_headers=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None, server_header=False,
        http=json_error_protocol(),
    )  # fmt: skip
    server = _DrainingServer(config, app)
    failed: list[str] = []

    def _stop(err: str) -> None:
        failed.append(err)
        server.should_exit = True

    app.state.svc.on_load_failed = _stop
    server.run()
    if failed:
        print(f"difflora serve: the models failed to load: {failed[0]}", file=sys.stderr)
        return 1
    return 0


class _DrainingServer:
    """uvicorn.Server whose SIGTERM/SIGINT handler first flips readiness and stops admitting model work; uvicorn
    then stops accepting connections, lets in-flight requests finish and runs the lifespan shutdown (which lets the
    job in flight finish its item and drains the queue)."""

    def __new__(cls, config, app):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                st = app.state.svc
                if st.engine is not None:
                    st.engine.begin_drain()
                st.ready = False
                logging.getLogger("difflora.service").warning("signal %s: draining", sig)
                super().handle_exit(sig, frame)
                # uvicorn re-raises the captured signal after shutdown (exit status -15); a drained stop exits 0
                getattr(self, "_captured_signals", []).clear()

        return Server(config)
