"""Service settings: one pydantic-settings class, every option also from a ``DIFFLORA_*`` environment variable.

>>> Settings(preset="tiny", port=8001)          # explicit values win over the environment
>>> DIFFLORA_QUEUE_SIZE=32 difflora serve        # environment
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_HYPERNET = REPO_ROOT / "assets" / "tiny" / "hypernet"  # committed tiny predictor checkpoint (when present)

# preset -> (largest image side allowed, default steps); the default side is the loaded model's own resolution
PRESET_SIZES: dict[str, tuple[int, int]] = {
    "tiny": (256, 20),
    "sd15": (1024, 30),
    "sdxl": (1536, 30),
}


def check_device(device: str, available: bool = True) -> str:
    """``device`` as a torch device string (``auto``: CUDA when available, else CPU), else a ValueError naming what
    is wrong. ``available``: the device must also exist on this machine (checked by serve and batch before any
    model is loaded; a settings object for another machine, e.g. a GPU deploy config, only needs to parse)."""
    from pipeline_data.cliargs import resolve_device

    return str(resolve_device(device, available))


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything ``difflora serve`` can be told (env prefix ``DIFFLORA_``)."""

    model_config = SettingsConfigDict(env_prefix="DIFFLORA_", extra="ignore", validate_default=True)

    # --- models ---
    preset: Literal["tiny", "sd15", "sdxl"] = "tiny"  # base-model preset
    model_path: str | None = None  # local diffusers folder overriding the preset's base model
    hypernet_path: str | None = None  # predictor checkpoint dir (default: assets/tiny/hypernet for tiny)
    untrained_hypernet: bool = False  # use a fresh, untrained hypernet (adapters are no-ops): development only
    # "auto": the trained hypernet when there is one (tiny: the bundled one), else none; "off": never (identities
    # are then made by fine-tuning, POST /v1/finetunes)
    hypernet: Literal["auto", "off"] = "auto"
    face_backend: Literal["dlib", "insightface"] = "dlib"  # face encoder backend
    face_model_dir: str | None = None  # insightface model pack directory
    device: str = "cpu"  # torch device of the model worker ("cpu", "cuda", "cuda:1", "auto": CUDA if available)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    threads: int = Field(0, ge=0, le=256)  # torch CPU threads of the worker (0: torch's default)
    warmup: bool = True  # run one generation before reporting ready
    predict_seed: int = Field(0, ge=0)  # hypernet sampling seed (same photos -> same adapter)
    # --- storage ---
    data_dir: Path = Path("difflora-data")  # files (identities, adapters, results) + the SQLite database
    # PostgreSQL shared by several replicas (postgresql://USER:PASSWORD@HOST:PORT/DB); unset: SQLite in data_dir
    database_url: SecretStr | None = None
    migrate: bool = True  # apply schema migrations at start-up (False: refuse an old schema; `difflora db upgrade`)
    job_lease_s: float = Field(30.0, ge=1, le=3600)  # a job whose replica stops renewing is taken over after this
    # --- network / security ---
    host: str = "127.0.0.1"  # bind address
    port: int = Field(8000, ge=0, le=65535)  # bind port (0: any free port)
    api_key: SecretStr | None = None  # when set, every endpoint but health and the web page needs X-API-Key
    # JSON/TOML file of tenants' keys [{name, key_sha256 | key, admin}] (service.tenants; `difflora keys add`)
    api_keys_file: Path | None = None
    allow_insecure_bind: bool = False  # allow binding beyond loopback without an API key
    cors_origins: list[str] = Field(default_factory=list)  # CORS allow-list; empty = CORS off
    # --- engine ---
    queue_size: int = Field(16, ge=1, le=10_000)  # queued model requests before 429
    batch_wait_ms: float = Field(5.0, ge=0, le=1000)  # how long the worker waits to grow a same-identity batch
    max_batch_images: int = Field(8, ge=1, le=64)  # images per model call
    cache_size: int = Field(32, ge=1, le=10_000)  # predicted adapters kept in memory (LRU)
    mixed_batches: bool = True  # batch requests of different identities (per-sample adapters); off: one identity
    # per model call, swapping the merged adapter between calls (the engine before mixed batches)
    per_sample_max_error: float = Field(1e-3, ge=0.0, le=1.0)  # largest relative error of a non-LoRA adapter's
    # LoRA export for it to join mixed batches (larger: that identity runs merged in its own call)
    drain_timeout_s: float = Field(30.0, ge=0)  # SIGTERM: how long to let queued work finish
    # --- request limits ---
    max_photos: int = Field(10, ge=1, le=100)  # photos per identity
    face_workers: int = Field(1, ge=1, le=64)  # uploads whose photos are decoded and embedded at the same time
    max_pending_uploads: int = Field(8, ge=1, le=10_000)  # uploads in progress or waiting for a face worker (429)
    max_body_bytes: int = Field(25 * 1024 * 1024, ge=1024)  # request body cap (413), checked before parsing
    max_image_pixels: int = Field(40_000_000, ge=1)  # per photo, from the header, before decoding
    # photos are downscaled to this longer side as they are decoded (JPEGs decode at reduced size): detection runs
    # at <= 800 px anyway, and ten 40 M-pixel photos would otherwise hold ~1.2 GB while they are embedded
    max_image_side: int = Field(2048, ge=256, le=16384)
    max_steps: int = Field(100, ge=1, le=1000)  # denoising steps per generation
    max_size: int | None = Field(None, ge=8)  # largest width/height (default: per preset)
    max_num_images: int = Field(4, ge=1, le=64)  # images per generation request
    max_job_items: int = Field(1000, ge=1)  # identities x prompts per batch job
    # --- job events (GET /v1/jobs/{id}/events) ---
    max_event_streams: int = Field(64, ge=1, le=10_000)  # open Server-Sent-Events streams at once (429 beyond)
    job_events_poll_s: float = Field(0.25, ge=0.01, le=10.0)  # how often a stream reads the job's state
    job_events_keepalive_s: float = Field(15.0, ge=0.1, le=300.0)  # a comment line after this long without events
    # --- data retention ---
    # delete identities (photos, faces, adapter, rows) unused (no generation or job item) for this long; None: keep
    identity_retention_s: float | None = Field(None, ge=1, le=100 * 365 * 86400)
    default_steps: int | None = Field(None, ge=1)  # default: per preset
    # --- fine-tuning (POST /v1/finetunes: an identity's adapter trained on its photos with the dataset recipe) ---
    max_finetune_steps: int = Field(1000, ge=1, le=100_000)  # optimisation steps one fine-tune may ask for
    max_finetune_jobs: int = Field(8, ge=1, le=10_000)  # fine-tunes queued or running at once (429 beyond)
    default_size: int | None = Field(None, ge=8)  # default: the base model's own resolution (set when it loads)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: SecretStr | None) -> SecretStr | None:
        from .db import database_url

        if v is None or not v.get_secret_value():
            return None
        try:
            database_url(v.get_secret_value(), Path("."))
        except ValueError:
            raise ValueError("expected postgresql://USER:PASSWORD@HOST:PORT/DB (or unset for SQLite)") from None
        return v

    @property
    def database(self) -> str | None:
        """The database URL (None: SQLite in ``data_dir``)."""
        return self.database_url.get_secret_value() if self.database_url is not None else None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v, available=False)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.api_keys_file is not None:
            self.keyring()  # a bad keys file is a settings error, named, before anything starts
        no_key = self.api_key is None and self.api_keys_file is None
        if not is_loopback(self.host) and no_key and not self.allow_insecure_bind:
            raise ValueError(
                f"refusing to bind {self.host!r} (beyond loopback) without an API key: set DIFFLORA_API_KEY "
                "(or DIFFLORA_API_KEYS_FILE) or allow it explicitly with --allow-insecure-bind / "
                "DIFFLORA_ALLOW_INSECURE_BIND=1"
            )
        if self.api_key is not None and len(self.api_key.get_secret_value()) < 8:
            raise ValueError("api_key must be at least 8 characters")
        top, steps = PRESET_SIZES[self.preset]
        if self.max_size is None:
            self.max_size = top
        if self.default_steps is None:
            self.default_steps = min(steps, self.max_steps)
        if (self.default_size or 0) > self.max_size or self.default_steps > self.max_steps:
            raise ValueError("default_size/default_steps exceed max_size/max_steps")
        return self

    def use_model_size(self, native: int) -> int:
        """Fill ``default_size`` from the loaded model's own resolution (``native`` pixels) unless it was set;
        returns it. Never assumes a preset's size: a 128-px tiny base generates 128-px images by default."""
        if self.default_size is None:
            self.default_size = min(native, self.max_size)
        return self.default_size

    def keyring(self):
        """The API keys (``service.tenants.KeyRing``): the shared ``api_key`` and the keys file's."""
        from .tenants import KeyRing

        key = self.api_key.get_secret_value() if self.api_key is not None else None
        return KeyRing.from_settings(key, self.api_keys_file)

    @property
    def hypernet_dir(self) -> Path | None:
        """The predictor checkpoint to load, or None (untrained fallback)."""
        if self.untrained_hypernet or self.hypernet == "off":
            return None
        if self.hypernet_path:
            return Path(self.hypernet_path)
        return TINY_HYPERNET if self.preset == "tiny" else None

    @property
    def base_source(self) -> str:
        """What ``pipeline_data.models.load_pipeline`` gets: a local folder or the preset name."""
        return self.model_path or self.preset
