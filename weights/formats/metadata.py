"""What an exported LoRA file says about itself: kohya sd-scripts ``ss_*`` keys and SAI model spec ``modelspec.*``.

AUTOMATIC1111/Forge and ComfyUI's LoRA browsers read the sd-scripts keys (``ss_tag_frequency`` for the training
tags, ``ss_base_model_version`` to hide LoRAs of another model family, ``sshs_model_hash``); the SAI model spec
(https://github.com/Stability-AI/ModelSpec) names the architecture, the title and the ``trigger_phrase`` to put in
the prompt. Every format difflora writes carries both sets (diffusers and peft ignore the keys they do not know),
so whichever tool a file lands in shows how to prompt it.

>>> info = ExportInfo(title="obama", trigger="sks person", caption="a photo of sks person", arch="sd15")
>>> meta = training_metadata(info, rank=4, alpha=4.0)
>>> meta["modelspec.trigger_phrase"], meta["ss_network_dim"]
('sks person', '4')
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass, replace

from torch import Tensor

ARCHS = ("sd15", "sdxl")  # base-model families a LoRA file can declare
BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}  # sd-scripts' ss_base_model_version
# sd-scripts writes "<base architecture>/<adapter>" (sai_model_spec.py); the UIs match on that spelling
MODELSPEC_ARCH = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
IMPLEMENTATION = {"sd15": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}
NATIVE_RESOLUTION = {"sd15": 512, "sdxl": 1024}
MAX_TEXT = 200  # longest title / trigger phrase / caption a file carries (characters)
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]*$")


@dataclass(frozen=True)
class ExportInfo:
    """How an adapter was made and how to prompt it; every field optional."""

    title: str = ""  # modelspec.title / ss_output_name (e.g. the identity's name)
    trigger: str = ""  # phrase that calls the person up in a prompt, e.g. "sks person"
    caption: str = ""  # the training caption, e.g. "a photo of sks person" (ss_tag_frequency)
    arch: str = "sd15"  # base-model family: "sd15" | "sdxl"
    base_model: str = ""  # id of the base model (ss_sd_model_name)
    resolution: int | None = None  # image side the base model works at (default: the family's native side)
    num_images: int | None = None  # photos the adapter was made from (ss_num_train_images)
    steps: int | None = None  # optimisation steps (fine-tuned) - ss_max_train_steps
    learning_rate: float | None = None  # ss_learning_rate (fine-tuned)
    seed: int | None = None  # ss_seed
    made_by: str = ""  # how: "difflora hypernet prediction", "difflora fine-tune", ... (ss_training_comment)
    date: str = ""  # ISO-8601 creation time (default: now, UTC)

    def __post_init__(self) -> None:
        for name in ("title", "trigger", "caption", "base_model", "made_by"):
            check_text(getattr(self, name), name)
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name in ("resolution", "num_images", "steps"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 1 <= v <= 1_000_000):
                raise ValueError(f"{name} must be an integer in 1..1000000, got {v!r}")


def check_text(value: str | None, name: str) -> str | None:
    """``value`` if it is None or printable text of at most :data:`MAX_TEXT` characters, else a ValueError naming
    ``name`` (a field, or a CLI flag such as ``--trigger``)."""
    if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT or not _PRINTABLE.match(value)):
        raise ValueError(f"{name} must be printable text of at most {MAX_TEXT} characters, got {str(value)[:60]!r}")
    return value


def trigger_of(caption: str, class_prompt: str) -> str:
    """The trigger phrase of a DreamBooth caption: what follows the words it shares with the class prompt
    (``"a photo of sks person"`` vs ``"a photo of a person"`` -> ``"sks person"``)."""
    cap, cls = caption.split(), class_prompt.split()
    n = 0
    while n < min(len(cap), len(cls)) and cap[n] == cls[n]:
        n += 1
    return " ".join(cap[n:]) or caption


def training_metadata(info: ExportInfo, *, rank: int, alpha: float) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` keys of a LoRA of ``rank``/``alpha`` (all values strings)."""
    res = info.resolution or NATIVE_RESOLUTION[info.arch]
    date = info.date or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    title = info.title or f"difflora LoRA r{rank}"
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": "{}",
        "ss_base_model_version": BASE_VERSION[info.arch],
        "ss_v2": "False",
        "ss_sd_model_name": info.base_model,
        "ss_output_name": title,
        "ss_resolution": f"({res}, {res})",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH[info.arch],
        "modelspec.implementation": IMPLEMENTATION[info.arch],
        "modelspec.title": title,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": date,
        "modelspec.prediction_type": "epsilon",
    }
    if info.trigger:
        meta["modelspec.trigger_phrase"] = info.trigger
        meta["modelspec.usage_hint"] = f"Trigger phrase: {info.trigger}"
        meta["modelspec.description"] = f'A face LoRA: put "{info.trigger}" in the prompt.'
    if info.caption or info.trigger:
        # sd-scripts: {dataset folder: {caption tag: count}}; A1111 lists these tags as the LoRA's training tags
        tags = [t.strip() for t in (info.caption or info.trigger).split(",") if t.strip()]
        n = info.num_images or 1
        meta["ss_tag_frequency"] = json.dumps({"difflora": dict.fromkeys(tags, n)})
    if info.num_images is not None:
        meta["ss_num_train_images"] = str(info.num_images)
    if info.steps is not None:
        meta["ss_max_train_steps"] = str(info.steps)
    if info.learning_rate is not None:
        meta["ss_learning_rate"] = f"{info.learning_rate:g}"
    if info.seed is not None:
        meta["ss_seed"] = str(info.seed)
    if info.made_by:
        meta["ss_training_comment"] = info.made_by
    return meta


def with_hashes(tensors: dict[str, Tensor], meta: dict[str, str]) -> dict[str, str]:
    """``meta`` plus the SHA-256 of the tensor data (the file without its header), as the model spec's
    ``modelspec.hash_sha256`` and sd-scripts' ``sshs_model_hash``; the data section does not depend on the header,
    so the hash of the file written with this metadata is the same."""
    from safetensors.torch import save

    raw = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    n = int.from_bytes(raw[:8], "little")
    h = hashlib.sha256(raw[8 + n :]).hexdigest()
    return {**meta, "modelspec.hash_sha256": "0x" + h, "sshs_model_hash": h}


def read_export_info(meta: dict[str, str]) -> ExportInfo:
    """The :class:`ExportInfo` a file's metadata carries (what is missing or malformed stays at its default)."""
    arch = next((a for a, v in MODELSPEC_ARCH.items() if meta.get("modelspec.architecture") == v), None)
    arch = arch or next((a for a, v in BASE_VERSION.items() if meta.get("ss_base_model_version") == v), "sd15")
    kw: dict = {"arch": arch}
    for field_, key in (("title", "modelspec.title"), ("trigger", "modelspec.trigger_phrase"),
                        ("base_model", "ss_sd_model_name"), ("made_by", "ss_training_comment"),
                        ("date", "modelspec.date")):  # fmt: skip
        if meta.get(key):
            kw[field_] = meta[key][:MAX_TEXT]
    for field_, key in (("num_images", "ss_num_train_images"), ("steps", "ss_max_train_steps"), ("seed", "ss_seed")):
        if meta.get(key, "").isdigit():
            kw[field_] = int(meta[key])
    try:
        tags = json.loads(meta.get("ss_tag_frequency", "{}"))
        first = next(iter(tags.values())) if isinstance(tags, dict) and tags else {}
        if isinstance(first, dict) and first:
            kw["caption"] = ", ".join(str(t) for t in first)[:MAX_TEXT]
    except (json.JSONDecodeError, StopIteration):
        pass
    m = re.match(r"^\((\d+), ?\d+\)$", meta.get("ss_resolution", ""))
    if m and 1 <= int(m[1]) <= 1_000_000:
        kw["resolution"] = int(m[1])
    try:
        return ExportInfo(**kw)
    except ValueError:  # unprintable text in a foreign file: keep only the architecture
        return ExportInfo(arch=arch)


def for_adapter(info: ExportInfo | None, base_model: str) -> ExportInfo:
    """``info`` (or a blank one) with ``base_model`` filled in from the adapter's spec when it names none."""
    info = info or ExportInfo(arch="sdxl" if "xl" in base_model.lower() else "sd15")
    return info if info.base_model else replace(info, base_model=base_model[:MAX_TEXT])


__all__ = [
    "ARCHS",
    "check_text",
    "ExportInfo",
    "for_adapter",
    "read_export_info",
    "training_metadata",
    "trigger_of",
    "with_hashes",
]
