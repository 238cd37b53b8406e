"""Only safetensors are ever loaded: every weight-loading code path refuses pickles (``torch.save`` zips, legacy
pickles, ``.bin``/``.pt``/``.ckpt``, a pickle renamed ``.safetensors``) with a clear error, and nothing is unpickled —
each payload's ``__reduce__`` would create a marker file. No source module calls an unpickler, and no HTTP operation
takes a weights file, a server path or a URL."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.reliability.conftest import AUTH
from weights.errors import AdapterFileError

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("weights", "pipeline_data", "hypernet", "service")


class Payload:
    """Unpickling this creates (truncates) ``marker``: proof that a loader ran the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _state(marker: Path) -> dict:
    return {"lora_unet_down.lora_down.weight": torch.zeros(4, 8), "evil": Payload(marker)}


# (name, writer(path, marker)): every way a pickle may arrive
PICKLES: list[tuple[str, Callable[[Path, Path], None]]] = [
    ("torch_save_zip", lambda p, m: torch.save(_state(m), p)),
    ("torch_save_legacy", lambda p, m: torch.save(_state(m), p, _use_new_zipfile_serialization=False)),
    ("pickle_protocol_2", lambda p, m: p.write_bytes(pickle.dumps(_state(m), protocol=2))),
    ("pickle_protocol_5", lambda p, m: p.write_bytes(pickle.dumps(_state(m), protocol=5))),
]
NAMES = ["adapter.bin", "adapter.pt", "adapter.ckpt", "adapter.safetensors"]


def _loaders() -> dict[str, Callable[[Path], object]]:
    from hypernet.checkpoint import load_state
    from weights.formats.diffusers import load_diffusers
    from weights.formats.kohya import load_kohya
    from weights.formats.native import load_native
    from weights.io import detect_format, load_any
    from weights.safetensors_io import read_header, read_safetensors

    return {
        "load_any": load_any,
        "load_any_native": lambda p: load_any(p, format="native"),
        "load_any_diffusers": lambda p: load_any(p, format="diffusers"),
        "load_any_kohya": lambda p: load_any(p, format="kohya"),
        "detect_format": detect_format,
        "load_native": load_native,
        "load_diffusers": load_diffusers,
        "load_kohya": load_kohya,
        "read_header": read_header,
        "read_safetensors": read_safetensors,
        "hypernet_load_state": load_state,
    }


@pytest.mark.parametrize("fname", NAMES)
@pytest.mark.parametrize("kind,write", PICKLES, ids=[k for k, _ in PICKLES])
def test_every_weight_loader_refuses_pickles(tmp_path, kind, write, fname):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / fname
    write(path, marker)
    pickle.loads(pickle.dumps(Payload(tmp_path / "sanity"))).close()  # the payload is live: unpickling runs it
    assert (tmp_path / "sanity").exists()
    for name, load in _loaders().items():
        with pytest.raises(AdapterFileError) as ei:
            load(path)
        assert not marker.exists(), f"{name} unpickled {kind} {fname}"
        assert ei.value.reason == "pickle" and "refusing to load" in str(ei.value), (name, str(ei.value))


def test_peft_folder_with_only_a_pickled_bin_is_refused(tmp_path):
    from weights.formats.peft import CONFIG_NAME, load_peft
    from weights.io import load_any

    marker = tmp_path / "UNPICKLED"
    d = tmp_path / "peft"
    d.mkdir()
    (d / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q"]}))
    torch.save(_state(marker), d / "adapter_model.bin")
    for load in (load_peft, load_any):
        with pytest.raises(ValueError, match="pickle") as ei:
            load(d)
        assert ei.value.reason == "pickle"
    assert not marker.exists()


def test_predictor_checkpoint_with_pickled_weights_is_refused(tmp_path):
    """A hypernet checkpoint directory whose weight files are pickles: loading fails, nothing is unpickled."""
    from hypernet.predict import LAYOUT_NAME, TEMPLATE_NAME, Predictor

    marker = tmp_path / "UNPICKLED"
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / LAYOUT_NAME).write_text(json.dumps({"spec": {}, "layout": {}}))
    for name in (TEMPLATE_NAME, "ema.safetensors", "model.safetensors"):
        torch.save(_state(marker), d / name)
    with pytest.raises((ValueError, KeyError, TypeError, FileNotFoundError)):
        Predictor.load(d)
    assert not marker.exists()


def test_base_model_loader_refuses_pickled_weights(tiny_world, tmp_path):
    """A diffusers folder whose UNet weights are a ``.bin`` only: ``load_pipeline`` refuses it (it asks diffusers for
    safetensors only), even when the pickle holds nothing but plain tensors (diffusers would otherwise load it)."""
    from safetensors.torch import load_file

    from pipeline_data.models import load_pipeline

    d = tmp_path / "base"
    shutil.copytree(Path(tiny_world["model_path"]), d)
    st = d / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), d / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(OSError, match="safetensors"):
        load_pipeline(str(d))


UNPICKLERS = {
    ("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("joblib", "load"),
    ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("marshal", "loads"),
}  # fmt: skip


def test_no_source_module_calls_an_unpickler():
    """AST scan of the four packages: no ``torch.load`` / ``pickle.load(s)`` / ``joblib.load``..., no
    ``np.load(..., allow_pickle=True)``, no ``import pickle``."""
    found = []
    files = [f for pkg in PACKAGES for f in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 40
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            where = f"{f.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for m in mods):
                    found.append(f"{where} imports {mods}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                base = node.func.value
                name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
                if (name, node.func.attr) in UNPICKLERS:
                    found.append(f"{where} calls {name}.{node.func.attr}")
                if node.func.attr == "load" and name in ("np", "numpy"):
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                        found.append(f"{where} calls np.load without allow_pickle=False")
    assert not found, "\n".join(found)


def test_no_operation_takes_a_weights_file(rel_app):
    """The only file uploads of the API are ``photos`` on ``POST /v1/identities`` and ``POST /v1/finetunes`` (images,
    through the same decoder); nothing accepts weights, and (see test_security) no field is a server path or URL."""
    spec = rel_app[0].get("/openapi.json", headers=AUTH).json()
    comps = spec.get("components", {}).get("schemas", {})
    uploads = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for ctype, media in (op.get("requestBody") or {}).get("content", {}).items():
                schema = media.get("schema", {})
                if "$ref" in schema:
                    schema = comps[schema["$ref"].rsplit("/", 1)[-1]]
                for prop, sub in (schema.get("properties") or {}).items():
                    items = sub.get("items", sub)  # a list of files or one file
                    if items.get("format") == "binary" or items.get("contentMediaType") == "application/octet-stream":
                        uploads.append((method.upper(), path, prop))
                assert ctype in ("application/json", "multipart/form-data"), (method, path, ctype)
    assert sorted(uploads) == [("POST", "/v1/finetunes", "photos"), ("POST", "/v1/identities", "photos")], uploads
