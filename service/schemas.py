"""Request and response models (the HTTP boundary only; inside the service we pass dataclasses and tensors).

Static ``Field`` limits here are the hard outer bounds; the configured limits (``Settings.max_steps`` ...) are
checked by the routes and give the same 422 error shape.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from hypernet.personalizer import SCALE_RANGE

from .engine import SCHEDULERS

SchedulerName = Literal["default", "ddim", "euler", "euler_a", "dpmpp_2m", "pndm", "lms"]
assert set(SchedulerName.__args__) == set(SCHEDULERS)  # noqa: S101 - keep the enum and the engine in step

MAX_SEED = 2**32 - 1
ExportFormat = Literal["diffusers", "kohya", "peft", "native"]  # adapter download formats (docs/exports.md)
EXPORT_FORMATS: tuple[str, ...] = ExportFormat.__args__


class ErrorBody(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str = Field(examples=["identity idt_0123456789abcdef01234567 not found"])
    details: list[dict] | None = None
    request_id: str | None = Field(None, description="the request's X-Request-ID", examples=["req_3f2a9c..."])


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {"code", "message", "request_id"}}``."""

    error: ErrorBody


# ---- identities ---------------------------------------------------------------------------------------------------
class PhotoPublic(BaseModel):
    index: int = Field(description="position of the photo in the upload")
    filename: str = Field("", description="client file name (echoed, truncated; never used for storage)")
    accepted: bool
    code: str | None = Field(None, description="why the photo was rejected", examples=["no_face"])
    reason: str | None = None
    num_faces: int | None = None
    face_box: list[float] | None = None
    similarity: float | None = Field(None, description="mean similarity to the other photos")
    face_url: str | None = Field(None, description="aligned face crop (PNG) of an accepted photo")


class IdentityPublic(BaseModel):
    id: str = Field(examples=["idt_0123456789abcdef01234567"])
    name: str = ""
    tenant: str = Field("default", description="the tenant that owns it (the API key's)")
    created: float
    last_used: float | None = Field(None, description="last generation or job item with it (epoch seconds)")
    photos: list[PhotoPublic]
    photos_used: int
    photos_rejected: int
    consistency: float = Field(description="mean pairwise face similarity of the photos used")
    consistent: bool
    warnings: list[str] = []
    face_backend: str
    adapter: dict = Field(description="method, rank, layers, parameters of the predicted adapter")
    predictor_trained: bool
    seconds: dict[str, float] = Field(description="faces / predict / store / total (/ refine, with refine_steps)")
    trigger: str = Field("", description="the phrase prompts must contain", examples=["sks person"])
    prompt: str = Field("", description="a prompt that works", examples=["a photo of sks person"])
    made_by: str = Field("prediction", description="how the adapter was made: prediction | fine-tune")
    predictor: str = Field("trained", description="the server's hypernetwork: trained | untrained | none")
    message: str | None = Field(None, description="what to know about this adapter (e.g. that it does nothing)")
    downloads: dict[str, str] = Field(default_factory=dict, description="adapter file URL per format")


class IdentityList(BaseModel):
    """One page of identities, oldest first; ``next_cursor``: pass it as ``cursor`` for the next page (null: last)."""

    items: list[IdentityPublic]
    next_cursor: str | None = None


# ---- generations --------------------------------------------------------------------------------------------------
class GenerationSettings(BaseModel):
    """Generation settings shared by /v1/generations and batch jobs (``None`` = server default)."""

    # strict: JSON types as documented (no "3" or true for a number); an integer is still a valid float
    model_config = ConfigDict(extra="forbid", strict=True)

    negative_prompt: str = Field("", max_length=1000)
    steps: int | None = Field(None, ge=1, le=1000, description="denoising steps (server limit applies)")
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    adapter_scale: float = Field(
        1.0, ge=SCALE_RANGE[0], le=SCALE_RANGE[1], description="LoRA scale λ (0 = base model)"
    )
    width: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    height: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    scheduler: SchedulerName = "default"


class GenerateRequest(GenerationSettings):
    identity_id: str | None = Field(
        None, max_length=64, description="identity to personalize with; omit for the base model",
        examples=["idt_0123456789abcdef01234567"],
    )  # fmt: skip
    prompt: str = Field(min_length=1, max_length=1000, examples=["a photo of sks person"])
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when absent; image i uses seed + i")
    num_images: int = Field(1, ge=1, le=64)

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"identity_id": "idt_0123456789abcdef01234567", "prompt": "a photo of sks person", "seed": 42}
            ]
        },
    )


class ImagePublic(BaseModel):
    seed: int
    png_base64: str


class GenerateResponse(BaseModel):
    images: list[ImagePublic]
    seed: int = Field(description="seed of the first image")
    info: dict = Field(description="the settings actually used")
    seconds: dict[str, float]


# ---- jobs ---------------------------------------------------------------------------------------------------------
class JobRequest(BaseModel):
    """Batch personalization: every identity × every prompt (``num_images`` each)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"identity_ids": ["idt_0123456789abcdef01234567"], "prompts": ["a photo of sks person"], "seed": 7}
            ]
        },
    )

    identity_ids: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(min_length=1, max_length=1000)
    prompts: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(min_length=1, max_length=1000)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="item i uses seed + i * num_images + k")
    num_images: int = Field(1, ge=1, le=16)
    settings: GenerationSettings = Field(default_factory=GenerationSettings)


JobState = Literal["queued", "running", "succeeded", "failed", "canceled"]


class JobPublic(BaseModel):
    id: str = Field(examples=["job_0123456789abcdef01234567"])
    status: JobState
    tenant: str = Field("default", description="the tenant that owns it (the API key's)")
    created: float
    started: float | None = None
    finished: float | None = None
    total: int
    done: int
    failed: int
    progress: float = Field(ge=0, le=1)
    eta_seconds: float | None = None
    error: str | None = None
    results_url: str


class JobList(BaseModel):
    """One page of jobs, oldest first; ``next_cursor``: pass it as ``cursor`` for the next page (null: last)."""

    items: list[JobPublic]
    next_cursor: str | None = None


class JobResultPublic(BaseModel):
    index: int
    identity_id: str
    prompt: str
    status: str
    error: str | None = None
    images: list[dict] = Field(description="[{k, seed, url}]")


class JobResultsPublic(BaseModel):
    """One page of a job's items in order; ``next_cursor``: pass it as ``cursor`` for the next page (null: last)."""

    id: str
    status: JobState
    results: list[JobResultPublic]
    next_cursor: str | None = None


# ---- health -------------------------------------------------------------------------------------------------------
class HealthPublic(BaseModel):
    status: str
    details: dict = {}


# ---- fine-tunes ---------------------------------------------------------------------------------------------------
FinetuneStart = Literal["auto", "init", "prediction"]
FinetuneState = JobState  # the same life cycle as a batch job


class FinetunePublic(BaseModel):
    """A fine-tune job: an identity whose adapter is trained on its photos (POST /v1/finetunes)."""

    id: str = Field(examples=["ftj_0123456789abcdef01234567"])
    status: FinetuneState
    created: float
    started: float | None = None
    finished: float | None = None
    step: int = Field(description="optimisation steps done")
    steps: int = Field(description="optimisation steps asked for")
    progress: float = Field(ge=0, le=1)
    loss: float | None = Field(None, description="the last training loss")
    start: str = Field(description="init (the method's initialisation) or prediction (the hypernet's adapter)")
    photos: list[PhotoPublic] = Field(description="which photos are trained on, and why others were left out")
    identity_id: str | None = Field(None, description="the identity made, once succeeded")
    identity_url: str | None = None
    error: str | None = None
