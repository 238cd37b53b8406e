"""Seconds from photos to a ready adapter: the hypernet (embed + sample + decode) vs training the same identity's
adapter with the dataset recipe, in one process on one machine. Also batched hypernet throughput.

    .venv/bin/python bench/personalize.py [--base tiny] [--checkpoint assets/tiny/hypernet] [--photos DIR]
    .venv/bin/python bench/personalize.py --base sd15-random --time-steps 2 --train-batch 2

Writes bench/results/personalize.json (sd15-random: personalize_sd15.json) and prints a table, with the face stages
of the hypernet path timed apart (decode, detection with landmarks, chips, descriptor net) beside the budget a 200x
end-to-end speedup leaves (fine-tune seconds / 200).

``sd15-random`` is SD 1.5's architecture with random weights (scripts/gpu_smoke.py) and an untrained ``sd15``-preset
hypernet: timing only. Training it for the recipe's steps on a CPU takes hours, so ``--time-steps N`` trains 1 + N
steps at ``--train-batch`` images; the recipe's time is set-up (latents, text, injection and the first step) +
steps x batch size x the seconds per image of the fastest of the other N steps (the table prints the measured
parts). The fastest step understates a step's time; scaling per image from ``--train-batch`` to the recipe's batch
assumes no fixed cost per step, which holds where a step is seconds of convolution (SD 1.5 on a CPU) but not on the
tiny world, where a smaller timed batch overstates the fine-tune: time it at the recipe's batch there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypernet.predict import Predictor, load_recipe  # noqa: E402
from pipeline_data.adapter_train import train_identity  # noqa: E402
from pipeline_data.build import IdentitySource, prepare_identity  # noqa: E402
from pipeline_data.faces import get_encoder  # noqa: E402
from pipeline_data.models import load_pipeline  # noqa: E402
from pipeline_data.recipe import BuildConfig  # noqa: E402
from weights.atomic import atomic_write_json  # noqa: E402

DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "faces" / "lfw" / "Abdullah_Gul"


def _recipe(checkpoint: Path, base: str) -> BuildConfig:
    return load_recipe(checkpoint, base)


def _face_stages(encoder, blobs: list[bytes], reps: int) -> dict[str, float]:
    """Median seconds of each stage ``embed_many`` runs on the photos, timed apart with the same encoder calls:
    decode, detect (with landmarks) and pick the face, recognition chips, descriptor net (one batch)."""
    times: dict[str, list[float]] = {k: [] for k in ("decode", "detect_landmarks", "chips", "descriptor")}
    for _ in range(reps):
        t0 = time.perf_counter()
        rgbs = [encoder.load_rgb(b) for b in blobs]
        t1 = time.perf_counter()
        faces = [encoder.select_face(encoder.detect(rgb), rgb.shape[1::-1])[0] for rgb in rgbs]
        t2 = time.perf_counter()
        chips = [encoder._recognition_chip(rgb, f) for rgb, f in zip(rgbs, faces)]
        t3 = time.perf_counter()
        encoder._embed_chips(chips)
        t4 = time.perf_counter()
        for k, a, b in zip(times, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            times[k].append(b - a)
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--checkpoint", default=str(REPO / "assets" / "tiny" / "hypernet"))
    ap.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="one identity's photo folder")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-steps", type=int, default=0, help="time N training steps and extrapolate (0: train all)")
    ap.add_argument("--train-batch", type=int, default=0, help="images per timed step (0: the recipe's batch size)")
    ap.add_argument("--token-dim", type=int, default=512, help="token size of an untrained hypernet")
    ap.add_argument(
        "--hypernet-set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="preset override of an untrained hypernet, e.g. autoencoder.kind=linear (repeatable)",
    )  # fmt: skip
    ap.add_argument("--out", default=None, help="result JSON (default: bench/results/personalize[_sd15].json)")
    args = ap.parse_args(argv)
    if args.time_steps < 0 or args.train_batch < 0:
        ap.error("--time-steps and --train-batch must be >= 0")
    torch.set_num_threads(args.threads)
    random_sd15 = args.base == "sd15-random"
    out = args.out or str(REPO / "bench" / "results" / f"personalize{'_sd15' if random_sd15 else ''}.json")

    ckpt = Path(args.checkpoint)
    if random_sd15:
        from scripts.gpu_smoke import build_sd15_from_config

        pipe, recipe, trained = build_sd15_from_config(), BuildConfig(base="sd15"), False
    else:
        pipe, recipe = load_pipeline(args.base), _recipe(ckpt, args.base)
        trained = (ckpt / "config.json").is_file()
    preset = "sd15" if random_sd15 else "tiny"
    if trained and args.hypernet_set:
        ap.error(f"--hypernet-set changes an untrained hypernet; {ckpt} is a trained checkpoint")
    predictor = (
        Predictor.load(ckpt)
        if trained
        else Predictor.untrained(pipe, recipe, preset=preset, token_dim=args.token_dim, settings=args.hypernet_set)
    )
    encoder = get_encoder(predictor.face_backend)
    photos = sorted(p for p in Path(args.photos).iterdir() if p.is_file())
    blobs = [p.read_bytes() for p in photos]
    warm = predictor.predict(np.zeros((1, predictor.cond_dim), np.float32))  # warm-up

    t_pred, t_model = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        embs = np.stack([r.embedding for r in encoder.embed_many(blobs)])
        t1 = time.perf_counter()
        predictor.predict(embs)  # sample + decode
        t_pred.append(time.perf_counter() - t0)
        t_model.append(time.perf_counter() - t1)

    stages = _face_stages(encoder, blobs, args.reps)

    # the fine-tuning baseline: the dataset recipe on the same photos (decode, embed, filter, crop, train)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    src = IdentitySource("bench", Path(args.photos).name, args.photos)
    t0 = time.perf_counter()
    rec = prepare_identity(src, recipe, encoder, size)
    if rec["status"] != "ok":
        print(f"photos not usable: {rec.get('reason')}", file=sys.stderr)
        return 2
    t_prepare = time.perf_counter() - t0
    timing = {}
    if args.time_steps:  # 1 + N steps; the first (one-off allocations) counts as set-up, the fastest of the rest
        batch = args.train_batch or recipe.batch_size
        part = replace(recipe, steps=1 + args.time_steps, batch_size=batch)
        res = train_identity(pipe, rec["_crops"], part, base_model=recipe.base_model_id)
        # steps still speed up after the first few (SD 1.5 on a CPU: 30, 23, 18, 17 s), and noise only adds time:
        # the fastest timed step understates a step (per-image scaling to the recipe's batch: see the docstring)
        per_image = min(res.step_seconds[1:]) / batch
        setup = res.seconds - sum(res.step_seconds[1:])  # latents, text, injection, first step
        t_train_model = setup + recipe.steps * per_image * recipe.batch_size
        t_train = t_prepare + t_train_model
        timing = {"timed_steps": args.time_steps, "timed_batch": batch, "seconds_setup": round(setup, 2),
                  "seconds_steps_timed": [round(x, 2) for x in res.step_seconds],
                  "seconds_per_image_step": round(per_image, 3), "seconds_prepare_photos": round(t_prepare, 2),
                  "extrapolated": True}  # fmt: skip
    else:
        t1 = time.perf_counter()
        train_identity(pipe, rec["_crops"], recipe, base_model=recipe.base_model_id)
        t_train = time.perf_counter() - t0
        t_train_model = time.perf_counter() - t1

    throughput = {}
    rng = np.random.default_rng(0)
    for b in (1, 8) if random_sd15 else (1, 8, 32):
        conds = [rng.normal(size=(4, predictor.cond_dim)).astype(np.float32) for _ in range(b)]
        t0 = time.perf_counter()
        predictor.predict_batch(conds)
        throughput[str(b)] = round(b / (time.perf_counter() - t0), 2)

    pred, model = statistics.median(t_pred), statistics.median(t_model)
    res = {
        "base": args.base,
        "checkpoint": str(ckpt) if trained else f"untrained {preset} preset (timing only)",
        "photos": len(photos),
        "method": recipe.method,
        "recipe_steps": recipe.steps,
        "hypernet_sample_steps": predictor.steps,
        "hypernet_autoencoder": predictor.hypernet.config.autoencoder.kind,
        "hypernet_settings": args.hypernet_set,
        "hypernet_samples_averaged": predictor.samples,
        "seconds_personalize": round(pred, 4),
        "seconds_finetune": round(t_train, 2),
        "speedup_vs_finetune": round(t_train / pred, 1),
        # model time only: hypernet sample + decode vs adapter training (face decoding/embedding/cropping, which
        # both paths need and which dominates on the tiny world, left out)
        "seconds_model_hypernet": round(model, 4),
        "seconds_model_finetune": round(t_train_model, 2),
        "speedup_model_time": round(t_train_model / model, 1),
        # where the hypernet path's time goes (the face stages timed apart, same photos), and the most it may take
        # for a 200x end-to-end speedup against this fine-tune
        "seconds_face_stages": stages,
        "seconds_budget_200x": round(t_train / 200, 4),
        "identities_per_second": throughput,
        "adapter_values": sum(t.numel() for t in warm.tensors.values()),
        **timing,
        "threads": args.threads,
        "device": "cpu",
    }
    atomic_write_json(out, res, indent=2)
    print(f"{'path':<34}{'seconds':>10}")
    print(f"{'photos -> adapter (hypernet)':<34}{pred:>10.3f}")
    print(f"{'photos -> adapter (fine-tune)':<34}{t_train:>10.2f}")
    print(f"{'model time: hypernet sample':<34}{model:>10.3f}")
    print(f"{'model time: adapter training':<34}{t_train_model:>10.2f}")
    for k, v in stages.items():
        print(f"{'  face stage: ' + k:<34}{v:>10.3f}")
    print(f"{'budget for 200x end to end':<34}{t_train / 200:>10.3f}")
    if timing:
        print(f"(training extrapolated: set-up {timing['seconds_setup']} s + {recipe.steps} steps x "
              f"{recipe.batch_size} images x {timing['seconds_per_image_step']} s)")  # fmt: skip
    print(f"speedup_vs_finetune: {res['speedup_vs_finetune']}x   model time: {res['speedup_model_time']}x   "
          f"batched identities/s: {throughput}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
