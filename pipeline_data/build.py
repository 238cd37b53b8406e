"""Build the identity-oriented adapter dataset: identity folders -> filtered photos -> one adapter each.

Output layout (``out/``)::

    adapters/<identity>.safetensors   native format (weights.formats.native), written atomically
    records/<identity>.json           one record per finished identity (ok or skipped), written atomically
    manifest.jsonl                    all records, sorted by identity, rewritten atomically after each one
    config.json                       the BuildConfig (a different training recipe refuses to mix in)
    check.json                        the identity check on a sample (see pipeline_data.check)

Re-running skips identities whose record exists; a build killed at any moment leaves no partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weights.atomic import atomic_write_bytes, atomic_write_json

from .photos import list_photos
from .recipe import BuildConfig
from .splits import split_of


@dataclass(frozen=True)
class IdentitySource:
    """One identity folder."""

    dataset: str  # e.g. "lfw"
    name: str  # folder name, e.g. "George_W_Bush"
    path: str  # folder path

    @property
    def id(self) -> str:
        return safe_id(f"{self.dataset}__{self.name}")


def safe_id(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("._") or "identity"


def discover(faces_dirs: Sequence[str | Path]) -> list[IdentitySource]:
    """Identity folders under each directory, sorted by id, duplicates removed.

    A folder holding images is one identity. Otherwise each sub-folder holding images is an identity of the
    dataset named after the folder (``lfw/<identity>/``), and each sub-folder without images is a dataset whose
    own sub-folders are identities (``faces/<dataset>/<identity>/``).
    """
    found: dict[str, IdentitySource] = {}

    def add(d: Path, dataset: str) -> None:
        src = IdentitySource(dataset, d.name, os.path.abspath(d))  # records name photos from any directory
        found.setdefault(src.id, src)

    def subdirs(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_dir())

    for root in map(Path, faces_dirs):
        if not root.is_dir():
            raise FileNotFoundError(f"faces directory not found: {root}")
        if list_photos(root):
            add(root, root.parent.name)
            continue
        for sub in subdirs(root):
            if list_photos(sub):
                add(sub, root.name)
            else:
                for ident in subdirs(sub):
                    if list_photos(ident):
                        add(ident, sub.name)
    return [found[k] for k in sorted(found)]


def _floats(v: np.ndarray) -> list[float]:
    return [round(float(x), 6) for x in v]


def _rank(identity: str, name: str) -> str:
    return hashlib.sha1(f"{identity}/{name}".encode()).hexdigest()


def prepare_identity(
    src: IdentitySource, cfg: BuildConfig, encoder, size: int, *, min_photos: int | None = None
) -> dict:
    """Decode + embed the photos, drop inconsistent ones, reserve held-out photos, crop the rest.

    Returns a record (``status`` "ok" or "skipped" with a ``reason``); "ok" records carry ``_crops`` (train) and
    ``_heldout_crops`` arrays that the caller strips before writing. ``min_photos`` overrides ``cfg.min_photos``
    (the basis training takes single-photo people: an identity with one usable photo holds none out).
    """
    from .faces.identity import build_identity
    from .tiny.crops import aligned_crop

    need = cfg.min_photos if min_photos is None else min_photos
    paths = list_photos(Path(src.path))[: cfg.max_photos]
    rec: dict = {"identity": src.id, "dataset": src.dataset, "name": src.name, "source": os.path.abspath(src.path)}
    rec["split"] = split_of(src.dataset, src.name)
    if len(paths) < need:
        return {**rec, "status": "skipped", "reason": f"{len(paths)} photos < min_photos {need}"}
    rgbs, results = [], []
    for p in paths:
        rgb, res = None, None
        try:
            rgb = encoder.load_rgb(str(p))
            res = encoder.embed(rgb)
        except Exception as e:  # noqa: BLE001 - every per-photo failure is reported with its reason
            res = e
        rgbs.append(rgb)  # exactly one entry per photo: rgbs[i] is paths[i]'s image (or None)
        results.append(res)
    ident = build_identity(encoder, [str(p) for p in paths], names=[p.name for p in paths], results=results)
    rec["rejected"] = [
        {"photo": r.name, "reason": r.reason if r.outlier else f"{r.error_code}: {r.error}"}
        for r in ident.photos
        if not r.ok or r.outlier
    ]
    inliers = ident.inliers
    rec["consistency"] = float(ident.consistency)
    if len(inliers) < need:
        return {**rec, "status": "skipped", "reason": f"{len(inliers)} usable photos < min_photos {need}"}
    n_held = 0 if len(inliers) < 2 else 2 if len(paths) >= 8 else 1
    order = sorted(inliers, key=lambda i: _rank(src.id, paths[i].name))
    held, train = sorted(order[:n_held]), sorted(order[n_held:])
    crops = {i: aligned_crop(encoder, rgbs[i], ident.photos[i].result.face, size, cfg.crop_padding) for i in inliers}
    emb = {i: ident.photos[i].result.embedding for i in inliers}
    rec.update(
        status="ok",
        photos_used=[paths[i].name for i in train],
        heldout=[paths[i].name for i in held],
        embeddings=[_floats(emb[i]) for i in train],
        heldout_embeddings=[_floats(emb[i]) for i in held],
        # the identity check embeds generated crops as whole images: embed the held-out crops the same way
        heldout_crop_embeddings=[_floats(e) for e in encoder.embed_images_as_faces([crops[i] for i in held])]
        if held
        else [],
        identity_embedding=_floats(np.mean([emb[i] for i in train], axis=0)),
        _crops=np.stack([crops[i] for i in train]),
        _heldout_crops=np.stack([crops[i] for i in held]) if held else np.zeros((0, size, size, 3), np.uint8),
    )
    return rec


# ---- per-process state ------------------------------------------------------------------------------------

_STATE: dict = {}


def _worker_state(cfg: BuildConfig):
    """Pipeline and face encoder, loaded once per process (and per Ray worker)."""
    key = (cfg.base, cfg.device, cfg.face_backend)
    if _STATE.get("key") != key:
        import torch

        from .faces import get_encoder
        from .models import load_pipeline

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        pipe = load_pipeline(cfg.base, device=cfg.device, dtype=torch.float32)
        _STATE.update(key=key, pipe=pipe, encoder=get_encoder(cfg.face_backend), prior=None)
        _STATE["loads"] = _STATE.get("loads", 0) + 1
        if cfg.prior_weight > 0:
            from .adapter_train import prior_latents

            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            _STATE["prior"] = prior_latents(pipe, cfg, size, size)
    return _STATE["pipe"], _STATE["encoder"], _STATE["prior"]


def _basis(cfg: BuildConfig):
    """The identity basis of a method-"basis" recipe, loaded once per process."""
    from weights.basis import load_basis

    from .basis_train import basis_file

    path = str(basis_file(cfg.basis).resolve())
    if _STATE.get("basis_path") != path:
        _STATE.update(basis_path=path, basis=load_basis(path))
    return _STATE["basis"]


def model_loads() -> int:
    """How many times this process loaded the base model, face encoder and prior latents (``_worker_state``)."""
    return _STATE.get("loads", 0)


def run_identity(src: IdentitySource, cfg_dict: dict, out_dir: str) -> dict:
    """Prepare, train and write one identity (the unit of work, local or as a Ray task). Returns its record."""
    from weights.formats.native import save_native
    from weights.safetensors_io import write_safetensors

    from .adapter_train import train_identity
    from .basis_train import fit_code
    from .recipe import BASIS_METHOD

    cfg = BuildConfig.from_dict(cfg_dict)
    out = Path(out_dir)
    pipe, encoder, prior = _worker_state(cfg)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    t0 = time.perf_counter()
    rec = prepare_identity(src, cfg, encoder, size)
    rec["seconds_prepare"] = round(time.perf_counter() - t0, 3)
    if rec["status"] == "ok":
        crops, held = rec.pop("_crops"), rec.pop("_heldout_crops")
        del held  # held-out photos are never trained on; the check uses their embeddings
        if cfg.method == BASIS_METHOD:
            basis = _basis(cfg)
            res = fit_code(pipe, crops, cfg, basis, prior=prior)
            res.adapter.spec.base_model = cfg.base_model_id
            code_path = out / "codes" / f"{src.id}.safetensors"
            write_safetensors(code_path, {"code": res.code}, {"identity": src.id, "basis": basis.fingerprint()})
            rec.update(code=str(code_path.relative_to(out)), basis=basis.fingerprint())
        else:
            res = train_identity(pipe, crops, cfg, base_model=cfg.base_model_id, prior=prior)
        path = out / "adapters" / f"{src.id}.safetensors"
        save_native(res.adapter, path)
        rec.update(
            adapter=str(path.relative_to(out)),
            spec_hash=res.adapter.spec.hash(),
            loss=res.loss_summary(),
            seconds_train=round(res.seconds, 3),
        )
    atomic_write_json(out / "records" / f"{src.id}.json", rec, sort_keys=True)
    return rec


# ---- the build ----------------------------------------------------------------------------------------------


def read_records(out: Path) -> dict[str, dict]:
    recs = {}
    for p in sorted((out / "records").glob("*.json")):
        try:
            recs[p.stem] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # unreadable record: the identity is redone
    return recs


def record_source(rec: dict, dataset_dir: str | Path) -> Path:
    """The identity folder of a record. Records store an absolute path; older ones a path relative to the build's
    working directory, which is looked for in the current directory, then in the dataset folder and its parents."""
    src = Path(rec["source"]).expanduser()
    if src.is_absolute():
        return src
    d = Path(dataset_dir).expanduser().absolute()
    for base in (Path.cwd(), d, *d.parents):
        if (base / src).is_dir():
            return Path(os.path.normpath(base / src))
    return Path(os.path.normpath(Path.cwd() / src))


def write_manifest(out: Path) -> int:
    recs = read_records(out)
    lines = [json.dumps(recs[k], sort_keys=True) for k in sorted(recs)]
    atomic_write_bytes(out / "manifest.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())
    return len(lines)


def changed_fields(path: Path, cfg) -> list[str]:
    """The ``training_dict`` fields in which ``cfg`` differs from the config of its class saved at ``path``
    (none when nothing is saved there)."""
    if not path.exists():
        return []
    old = type(cfg).from_dict(json.loads(path.read_text())).training_dict()
    return sorted(k for k, v in cfg.training_dict().items() if old.get(k) != v)


def _check_config(out: Path, cfg: BuildConfig) -> None:
    path = out / "config.json"
    diff = changed_fields(path, cfg)
    if diff:
        raise ValueError(f"{out} was built with another recipe (differs in: {', '.join(diff)}); use a new --out")
    atomic_write_json(path, json.loads(cfg.to_json()), sort_keys=True)


def build(
    faces_dirs: Sequence[str | Path],
    out_dir: str | Path,
    cfg: BuildConfig,
    *,
    limit: int | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
) -> dict:
    """Build (or resume) the dataset; returns a summary with counts, failures and seconds per identity."""
    from tqdm.auto import tqdm

    from .validate import validate_recipe

    validate_recipe(cfg)  # one clear error before anything is written or processed, not one per identity
    sources = _sources(faces_dirs, limit)
    if ray_address:
        from .ray_build import connect

        connect(ray_address)
    else:
        _worker_state(cfg)  # load the base model now: a model that cannot load is one error, not one per identity
    out = Path(out_dir)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg)
    done = read_records(out)
    todo = [s for s in sources if s.id not in done or not _complete(out, done[s.id])]
    failures: dict[str, str] = {}
    bar = tqdm(
        total=len(sources), initial=len(sources) - len(todo), desc="identities", unit="id", disable=not progress
    )
    cfg_dict = json.loads(cfg.to_json())

    def finished(rec: dict) -> None:
        done[rec["identity"]] = rec
        write_manifest(out)
        if on_record:
            on_record(rec)
        bar.update(1)
        bar.set_postfix(failed=len(failures), skipped=sum(r["status"] != "ok" for r in done.values()))

    t0 = time.perf_counter()
    if ray_address:
        from .ray_build import run_on_ray

        workers = run_on_ray(todo, cfg_dict, str(out), ray_address, finished, failures)
    else:
        for src in todo:
            try:
                finished(run_identity(src, cfg_dict, str(out)))
            except Exception as e:  # noqa: BLE001 - one bad identity must not stop the build; it is retried next run
                failures[src.id] = f"{type(e).__name__}: {e}"
                bar.update(1)
        workers = [{"pid": os.getpid(), "model_loads": model_loads(), "built": len(todo) - len(failures)}]
    bar.close()
    write_manifest(out)
    recs = [done[s.id] for s in sources if s.id in done]
    return {**_summary(recs, len(sources), failures, time.perf_counter() - t0), "workers": workers}


def _sources(faces_dirs: Sequence[str | Path], limit: int | None) -> list[IdentitySource]:
    """The identity folders to build (the first ``limit``); a ValueError when there are none."""
    sources = discover(faces_dirs)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        sources = sources[:limit]
    if not sources:
        raise ValueError(f"no identity folders with photos found in {', '.join(map(str, faces_dirs))}")
    return sources


def _summary(recs: list[dict], identities: int, failures: dict[str, str], wall: float) -> dict:
    """What :func:`build` returns (with ``workers``: per process, identities built this run and model loads):
    counts, skip reasons, failures and seconds per identity."""
    ok = [r for r in recs if r["status"] == "ok"]
    secs = [r.get("seconds_prepare", 0) + r.get("seconds_train", 0) for r in ok]
    return {
        "identities": identities,
        "ok": len(ok),
        "skipped": {r["identity"]: r["reason"] for r in recs if r["status"] != "ok"},
        "failed": failures,
        "seconds_per_identity": float(np.mean(secs)) if secs else None,
        "wall_seconds": round(wall, 1),
    }


def _complete(out: Path, rec: dict) -> bool:
    if rec.get("status") != "ok":
        return True
    return (out / rec.get("adapter", "")).is_file() and ("code" not in rec or (out / rec["code"]).is_file())


def load_dataset_codes(out_dir: str | Path, ids: Sequence[str] | None = None) -> dict:
    """``{identity: code (K,)}`` of a method-"basis" dataset's ok records (optionally only ``ids``)."""
    from weights.safetensors_io import read_safetensors

    out = Path(out_dir)
    recs = read_records(out)
    keep = [k for k, r in recs.items() if r["status"] == "ok" and "code" in r and (ids is None or k in ids)]
    return {k: read_safetensors(out / recs[k]["code"])[0]["code"] for k in sorted(keep)}


def load_dataset_adapters(out_dir: str | Path, ids: Sequence[str] | None = None) -> dict:
    """``{identity: Adapter}`` for the ok records (optionally only ``ids``)."""
    from weights.formats.native import load_native

    out = Path(out_dir)
    recs = read_records(out)
    keep = [k for k, r in recs.items() if r["status"] == "ok" and (ids is None or k in ids)]
    return {k: load_native(out / recs[k]["adapter"]) for k in sorted(keep)}


def run_check(
    out_dir: str | Path, cfg: BuildConfig | None = None, *, limit: int | None = None, progress: bool = False
) -> dict:
    """Identity check on (a deterministic sample of) the dataset; writes ``check.json`` and the figures into the
    sampled identities' records (so weak adapters can be filtered out of the hypernet's training data)."""
    out = Path(out_dir)
    if cfg is None:
        cfg = BuildConfig.from_dict(json.loads((out / "config.json").read_text()))
    n = cfg.check_identities if limit is None else limit
    recs = {k: r for k, r in read_records(out).items() if r["status"] == "ok"}
    ids = sorted(recs, key=lambda k: _rank("check", k))[:n] if n else sorted(recs)
    if len(ids) < 2:
        raise ValueError(f"{out}: the identity check needs at least 2 finished identities, found {len(ids)}")
    from .check import identity_check

    pipe, encoder, _ = _worker_state(cfg)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    adapters = load_dataset_adapters(out, ids)
    heldout = {k: np.asarray(recs[k]["heldout_crop_embeddings"], dtype=np.float32) for k in ids}
    t0 = time.perf_counter()
    res = identity_check(
        pipe, encoder, adapters, heldout, prompt=cfg.caption, seeds=list(range(cfg.check_seeds)),
        steps=cfg.check_steps, guidance=cfg.check_guidance, size=size, progress=progress,
    )  # fmt: skip
    res["seconds"] = round(time.perf_counter() - t0, 1)
    for k, fig in res["per_identity"].items():
        rec = dict(recs[k], check=fig)
        atomic_write_json(out / "records" / f"{k}.json", rec, sort_keys=True)
    write_manifest(out)
    atomic_write_json(out / "check.json", res, sort_keys=True)
    return res
