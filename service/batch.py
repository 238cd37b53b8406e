"""``difflora batch``: batch personalization without a server (one identity per sub-folder of ``--faces``).

For every identity folder: photos → face embeddings → predicted adapter → one image per prompt (× ``--num-images``).
Output per identity: ``<out>/<identity>/adapter.safetensors`` (native), ``pytorch_lora_weights.safetensors``
(diffusers), ``<prompt #>-<k>.png`` and ``identity.json``; ``<out>/manifest.jsonl`` gets one line per identity.
Every file is written atomically and ``identity.json`` last, so a re-run skips finished identities and redoes the
rest. The same engine as the server does the work (exact apply/restore between identities).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipeline_data.photos import list_photos


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difflora batch", description="Personalize many identities offline.")
    p.add_argument("--faces", required=True, help="folder with one sub-folder of photos per identity")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line ('#' comments)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", default="tiny", choices=["tiny", "sd15", "sdxl"])
    p.add_argument("--model-path", help="local diffusers folder for the base model")
    p.add_argument("--hypernet-path", help="predictor checkpoint directory")
    p.add_argument("--untrained-hypernet", action="store_true", help="use an untrained hypernet (development)")
    p.add_argument("--face-backend", default="dlib", choices=["dlib", "insightface"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--steps", type=int, help="denoising steps (default: per preset)")
    p.add_argument("--size", type=int, help="image side (default: per preset)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--adapter-scale", type=float, default=1.0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="prompt i, image k uses seed + i * num_images + k")
    p.add_argument("--max-photos", type=int, default=10, help="photos read per identity")
    p.add_argument("--ray-address", help="fan identities out over a Ray cluster ('auto', 'local' or host:port)")
    p.add_argument("--ray-workers", type=int, default=2,
                   help="Ray tasks (each loads the models once; --device cuda: one GPU each)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _read_prompts(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path} is not UTF-8 text (byte {e.start})") from None
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


# options that are fields of the HTTP request: checked by the request schema, so the server's limits apply offline
_REQUEST_FLAGS = {
    "steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "adapter_scale": "--adapter-scale",
    "seed": "--seed",
    "num_images": "--num-images",
}


def _bad_args(args: argparse.Namespace) -> str | None:
    """The first option out of range, as a message."""
    from pydantic import ValidationError

    from pipeline_data.cliargs import finite

    from .schemas import GenerateRequest
    from .settings import PRESET_SIZES, check_device

    try:
        finite(args.guidance_scale, "--guidance-scale")
        finite(args.adapter_scale, "--adapter-scale")
        finite(args.max_photos, "--max-photos", 1, 100)
        finite(args.threads, "--threads", 0, 256)
        finite(args.ray_workers, "--ray-workers", lo=1)
        GenerateRequest.model_validate(
            {"prompt": "x", **{k: getattr(args, k) for k in _REQUEST_FLAGS if getattr(args, k) is not None}}
        )
    except ValidationError as e:  # a ValueError too: caught first
        err = e.errors()[0]
        return f"{_REQUEST_FLAGS[err['loc'][0]]}: {err['msg'][0].lower()}{err['msg'][1:]}, got {err['input']}"
    except ValueError as e:
        return str(e)
    top = PRESET_SIZES[args.preset][0]
    if args.size is not None and not (8 <= args.size <= top and args.size % 8 == 0):
        return f"--size must be a multiple of 8 in 8..{top} for the {args.preset} preset, got {args.size}"
    try:  # on a Ray cluster the device must exist on the workers, not on the driver
        check_device(args.device, available=not args.ray_address)
    except ValueError as e:
        return f"--device: {e}"
    return None


def _identity_dirs(faces: Path) -> list[Path]:
    return sorted(d for d in faces.iterdir() if d.is_dir() and list_photos(d))


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)[:100] or "identity"


def _settings(args: argparse.Namespace):
    from .settings import Settings

    return Settings(
        preset=args.preset, model_path=args.model_path, hypernet_path=args.hypernet_path,
        untrained_hypernet=args.untrained_hypernet, face_backend=args.face_backend, device=args.device,
        threads=args.threads, warmup=False, default_steps=args.steps, default_size=args.size,
        max_size=max(args.size or 0, 8) if args.size else None, data_dir=tempfile.mkdtemp(prefix="difflora-batch-"),
    )  # fmt: skip


def run_identities(args: argparse.Namespace, folders: list[str], prompts: list[str]) -> list[dict]:
    """Process identity folders in this process (models loaded once); returns the manifest lines."""
    import numpy as np

    from pipeline_data.faces.identity import build_identity
    from weights.atomic import atomic_write_bytes
    from weights.io import save_adapter

    from .engine import GenParams
    from .metrics import Metrics
    from .state import ServiceState
    from .storage import Storage

    s = _settings(args)
    state = ServiceState(s, Storage(s.data_dir), Metrics())
    state.load()
    if state.load_error:
        raise RuntimeError(state.load_error)
    eng, enc = state.engine, state.encoder
    params = GenParams(steps=s.default_steps, width=s.default_size, height=s.default_size,
                       guidance_scale=args.guidance_scale, adapter_scale=args.adapter_scale)  # fmt: skip
    from tqdm.auto import tqdm

    out, lines = Path(args.out), []
    # one bar over identities x prompts (the images), on stderr; Ray tasks run without one (their logs interleave)
    bar = tqdm(total=len(folders) * len(prompts), desc="batch", unit="prompt", file=sys.stderr,
               disable=not getattr(args, "progress", True))  # fmt: skip
    try:
        for folder in map(Path, folders):
            bar.set_postfix_str(folder.name[:40])
            t0 = time.perf_counter()
            name = _safe(folder.name)
            dest = out / name
            photos = list_photos(folder)[: args.max_photos]
            ident = build_identity(enc, photos)
            line = {"identity": name, "photos": len(photos), "used": len(ident.inliers)}
            if not ident.inliers:
                lines.append({**line, "ok": False, "error": "no usable face in the photos"})
                bar.update(len(prompts))
                continue
            embs = np.stack([ident.photos[i].result.embedding for i in ident.inliers])
            adapter = eng.submit_predict(embs).result()
            dest.mkdir(parents=True, exist_ok=True)
            info = state.export_info(name, len(ident.inliers), f"difflora prediction ({state.base_model})")
            save_adapter(adapter, dest / "adapter.safetensors", "native", info=info)
            save_adapter(adapter, dest / "pytorch_lora_weights.safetensors", "diffusers", info=info)
            eng.cache_put(name, adapter.to(eng.device))
            images = _generate_all(eng, name, params, prompts, args, dest, on_prompt=lambda: bar.update(1))
            line.update(
                ok=True,
                consistency=round(float(ident.consistency), 4),
                images=images,
                seconds=round(time.perf_counter() - t0, 3),
                predictor_trained=state.predictor_trained,
            )
            atomic_write_bytes(
                dest / "identity.json", json.dumps({**line, **ident.to_dict(embedding=False)}, indent=1).encode()
            )
            lines.append(line)
    finally:
        bar.close()
        eng.stop()
        state.storage.close()
        shutil.rmtree(s.data_dir, ignore_errors=True)
    return lines


def ray_task_options(device: str) -> dict:
    """What each Ray task reserves: one CPU, and one GPU when ``device`` is CUDA (Ray then sets the task's
    ``CUDA_VISIBLE_DEVICES`` to the GPU it reserved, so tasks never share a GPU)."""
    return {"num_cpus": 1, "num_gpus": 1 if device.startswith("cuda") else 0, "max_retries": 2}


def ray_worker_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` as a Ray task sees them: ``cuda:N`` becomes ``cuda``, the one GPU Ray made visible to the task."""
    if args.device.startswith("cuda"):
        return argparse.Namespace(**{**vars(args), "device": "cuda"})
    return args


def _generate_all(
    eng, name: str, params, prompts: list[str], args: argparse.Namespace, dest: Path, on_prompt=None
) -> list[str]:
    """Every prompt x ``--num-images`` for the cached identity ``name`` (image k of prompt i has seed
    ``seed + i * n + k``), queued at once so the worker batches them; PNGs written as ``<i>-<k>.png``;
    ``on_prompt()`` after each prompt's images (the progress bar)."""
    from weights.atomic import atomic_write_bytes

    from .routes.generations import encode_png

    n = args.num_images
    futs = [
        eng.submit_generate(name, params, [p] * n, [args.seed + i * n + k for k in range(n)])
        for i, p in enumerate(prompts)
    ]
    images = []
    for i, f in enumerate(futs):
        for k, png in enumerate(encode_png(f.result().images)):
            atomic_write_bytes(dest / f"{i:03d}-{k}.png", png)
            images.append(f"{name}/{i:03d}-{k}.png")
        if on_prompt is not None:
            on_prompt()
    return images


def _run_ray(args: argparse.Namespace, todo: list[str], prompts: list[str]) -> list[dict]:
    import ray

    from pipeline_data.ray_build import connect

    started = not ray.is_initialized()
    connect(args.ray_address, num_cpus=max(1, args.ray_workers))  # an unreachable address fails at once
    try:
        opts = ray_task_options(args.device)
        if opts["num_gpus"] and not ray.cluster_resources().get("GPU"):  # the tasks would wait forever
            raise ValueError("--device cuda: the Ray cluster has no GPU (start its workers with GPUs)")
        task = ray.remote(**opts)(run_identities)
        chunks = [todo[i :: args.ray_workers] for i in range(args.ray_workers)]
        refs = [task.remote(ray_worker_args(args), c, prompts) for c in chunks if c]
        return [line for part in ray.get(refs) for line in part]
    finally:
        if started:  # leave a Ray instance the caller started running
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    faces, prompts_file, out = Path(args.faces), Path(args.prompts), Path(args.out)
    if not faces.is_dir():
        print(f"difflora batch: --faces {faces} is not a folder", file=sys.stderr)
        return 2
    if not prompts_file.is_file():
        print(f"difflora batch: --prompts {prompts_file} is not a file", file=sys.stderr)
        return 2
    bad = _bad_args(args)
    if bad:
        print(f"difflora batch: {bad}", file=sys.stderr)
        return 2
    if out.exists() and not out.is_dir():
        print(f"difflora batch: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        prompts = _read_prompts(prompts_file)
    except ValueError as e:
        print(f"difflora batch: {e}", file=sys.stderr)
        return 2
    folders = _identity_dirs(faces)
    if not prompts or not folders:
        print(
            f"difflora batch: need at least one prompt and one identity folder with photos in {faces}", file=sys.stderr
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    todo = [str(d) for d in folders if not (out / _safe(d.name) / "identity.json").is_file()]
    print(f"difflora batch: {len(folders)} identities ({len(folders) - len(todo)} done already), "
          f"{len(prompts)} prompts", file=sys.stderr)  # fmt: skip
    if not todo:
        return 0
    try:
        args.progress = not args.no_progress and not args.ray_address
        lines = _run_ray(args, todo, prompts) if args.ray_address else run_identities(args, todo, prompts)
    except (ValueError, OSError, RuntimeError) as e:
        from .main import _one_line

        print(f"difflora batch: {_one_line(e) if isinstance(e, ValueError) else e}", file=sys.stderr)
        return 2
    with open(out / "manifest.jsonl", "a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    bad = [ln["identity"] for ln in lines if not ln["ok"]]
    print(f"difflora batch: {len(lines) - len(bad)} identities done, {len(bad)} failed{': ' if bad else ''}"
          f"{', '.join(bad)}", file=sys.stderr)  # fmt: skip
    return 1 if bad else 0
