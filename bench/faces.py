"""Face verification benchmark: same/different pairs from LFW, CelebA and ORL at the backend's threshold.

    python bench/faces.py [--backend dlib|insightface] [--model-dir DIR] [--workers N] [--no-cache]

One embedding pass over a seeded sample of photos (cached in ~/.cache/difflora, so re-runs take seconds), then
>= 1,000 pairs scored at the backend threshold: accuracy, TAR (same pairs accepted), FAR (different pairs
accepted), ROC AUC and the best-threshold accuracy for reference. For LFW it also scores the whole-image
embedding of 64x64 aligned crops (``embed_image_as_face``), the identity metric of the data build. Pairs with a
photo that gave no face are counted as skipped. Writes bench/results/faces.json and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_data.photos import faces_dir, list_photos  # noqa: E402
from weights.atomic import atomic_write_text  # noqa: E402

FACES = faces_dir()
# dataset -> (identities sampled, photos per identity, same pairs, different pairs)
PLAN: dict[str, tuple[int, int, int, int]] = {
    "lfw": (120, 4, 400, 400),
    "celeba": (60, 4, 200, 200),
    "orl": (33, 4, 120, 120),
}


def sample_photos(seed: int) -> dict[str, dict[str, list[Path]]]:
    """dataset -> identity -> photos, a seeded sample following PLAN."""
    rng = random.Random(seed)
    out = {}
    for ds, (n_ids, per_id, _, _) in PLAN.items():
        ids = sorted(d for d in (FACES / ds).iterdir() if d.is_dir())
        ids = [d for d in ids if len(list_photos(d)) >= 2]
        chosen = rng.sample(ids, min(n_ids, len(ids)))
        out[ds] = {}
        for d in sorted(chosen):
            photos = list_photos(d)
            out[ds][d.name] = sorted(rng.sample(photos, min(per_id, len(photos))))
    return out


def make_pairs(ids: dict[str, list[Path]], n_same: int, n_diff: int, seed: int) -> list[tuple[Path, Path, bool]]:
    rng = random.Random(seed)
    same = [(a, b, True) for ps in ids.values() for i, a in enumerate(ps) for b in ps[i + 1 :]]
    same = rng.sample(same, min(n_same, len(same)))
    names = sorted(ids)
    diff: set[tuple[Path, Path, bool]] = set()
    while len(diff) < n_diff:
        x, y = rng.sample(names, 2)
        diff.add((rng.choice(ids[x]), rng.choice(ids[y]), False))
    return same + sorted(diff)


_ENC = None


def _worker_init(backend: str, model_dir: str | None) -> None:
    global _ENC
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from pipeline_data.faces import get_encoder

    _ENC = get_encoder(backend, **({} if model_dir is None else {"model_dir": model_dir}))


def _embed_one(path: str) -> tuple[str, np.ndarray | None, np.ndarray | None, float | None, str | None]:
    """(path, embedding, 64x64-crop whole-image embedding, raw descriptor norm, error code)."""
    from PIL import Image

    from pipeline_data.faces import FaceError, l2_normalize
    from pipeline_data.images import ImageDecodeError, decode_image

    try:
        rgb = decode_image(path)
        h, w = rgb.shape[:2]
        face, _ = _ENC.select_face(_ENC.detect(rgb), (w, h))
        chip = _ENC._recognition_chip(rgb, face)  # what embed() feeds the recogniser
        crop64 = _ENC.align(rgb, face, size=64, padding=0.25)  # what embed_image_as_face() gets in the data build
        n = _ENC.chip_size
        crop_up = np.asarray(Image.fromarray(crop64).resize((n, n), Image.Resampling.BICUBIC))
        raw = _ENC._embed_chips([chip, crop_up])  # (2, D): one batched recogniser call
        emb = l2_normalize(raw)
        return path, emb[0], emb[1], float(np.linalg.norm(raw[0])), None
    except (FaceError, ImageDecodeError) as e:
        return path, None, None, None, e.code


def embed_all(
    paths: list[Path], backend: str, model_dir: str | None, workers: int, cache: Path | None
) -> tuple[dict, dict]:
    """(path -> (embedding, crop embedding, norm, error), timing of the uncached pass); cached on disk."""
    table: dict[str, tuple] = {}
    meta: dict = {}
    if cache is not None and cache.exists():
        with open(cache) as f:
            blob = json.load(f)
        meta = blob["meta"]
        for k, v in blob["table"].items():
            table[k] = (
                None if v[0] is None else np.array(v[0], np.float32),
                None if v[1] is None else np.array(v[1], np.float32),
                v[2],
                v[3],
            )
    todo = [str(p) for p in paths if str(p) not in table]
    if todo:
        from tqdm import tqdm

        t0 = time.perf_counter()

        if workers > 1:
            with ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(backend, model_dir)) as ex:
                it = ex.map(_embed_one, todo, chunksize=8)
                for path, e, c, n, err in tqdm(it, total=len(todo), desc="embedding", unit="photo"):
                    table[path] = (e, c, n, err)
        else:
            _worker_init(backend, model_dir)
            for p in tqdm(todo, desc="embedding", unit="photo"):
                path, e, c, n, err = _embed_one(p)
                table[path] = (e, c, n, err)
        meta = {
            "seconds": round(time.perf_counter() - t0, 2),
            "photos": len(todo),
            "workers": workers,
            "load_average": round(os.getloadavg()[0], 2),
        }
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            ser = {
                k: [None if v[0] is None else v[0].tolist(), None if v[1] is None else v[1].tolist(), v[2], v[3]]
                for k, v in table.items()
            }
            atomic_write_text(cache, json.dumps({"meta": meta, "table": ser}))
    return table, meta


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random same pair scores above a random different pair (ties count half)."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def score(pairs, table, threshold: float, which: int = 0) -> dict:
    sims, labels, skipped = [], [], 0
    for a, b, same in pairs:
        ea, eb = table[str(a)][which], table[str(b)][which]
        if ea is None or eb is None:
            skipped += 1
            continue
        sims.append(float(np.dot(ea, eb)))
        labels.append(same)
    s, y = np.array(sims), np.array(labels, dtype=bool)
    acc_at = lambda t: float(((s >= t) == y).mean())  # noqa: E731
    cand = np.unique(s)
    best_t = float(max(cand, key=acc_at)) if len(cand) else float("nan")
    return {
        "pairs": len(pairs),
        "scored": int(len(s)),
        "same": int(y.sum()),
        "different": int((~y).sum()),
        "skipped_pairs": skipped,
        "threshold": threshold,
        "accuracy": round(acc_at(threshold), 4),
        "tar": round(float((s[y] >= threshold).mean()), 4),
        "far": round(float((s[~y] >= threshold).mean()), 4),
        "auc": round(roc_auc(s, y), 4),
        "best_threshold": round(best_t, 4),
        "best_accuracy": round(acc_at(best_t), 4),
        "mean_similarity_same": round(float(s[y].mean()), 4),
        "mean_similarity_different": round(float(s[~y].mean()), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="dlib", choices=["dlib", "insightface"])
    ap.add_argument("--model-dir", default=None, help="model folder (insightface pack)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="embedding processes")
    ap.add_argument("--no-cache", action="store_true", help="recompute every embedding")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/faces.json")
    args = ap.parse_args(argv)

    from pipeline_data.faces import get_encoder

    t0 = time.perf_counter()
    enc_kw = {} if args.model_dir is None else {"model_dir": args.model_dir}
    enc = get_encoder(args.backend, **enc_kw)
    photos = sample_photos(args.seed)
    pairs = {ds: make_pairs(ids, *PLAN[ds][2:], seed=args.seed + i) for i, (ds, ids) in enumerate(photos.items())}
    paths = sorted({p for ids in photos.values() for ps in ids.values() for p in ps})
    key = hashlib.sha1(f"{args.backend}|{args.model_dir}|{args.seed}|{PLAN}".encode()).hexdigest()[:12]
    cache = None if args.no_cache else Path.home() / ".cache/difflora" / f"faces_bench_{args.backend}_{key}.json"
    cached = cache is not None and cache.exists()
    t1 = time.perf_counter()
    table, meta = embed_all(paths, args.backend, args.model_dir, args.workers, cache)
    t_embed = time.perf_counter() - t1

    results = {ds: score(prs, table, enc.threshold) for ds, prs in pairs.items()}
    all_pairs = [p for prs in pairs.values() for p in prs]
    overall = score(all_pairs, table, enc.threshold)
    crops = score(pairs["lfw"], table, enc.threshold, which=1)
    failed = [k for k, v in table.items() if v[0] is None and k in {str(p) for p in paths}]
    norms = np.array([v[2] for k, v in table.items() if v[2] is not None])
    report = {
        "backend": args.backend,
        "threshold": enc.threshold,
        "similarity": "cosine of L2-normalised embeddings; same person iff similarity >= threshold",
        "seed": args.seed,
        "datasets": results,
        "overall": overall,
        "lfw_64px_crops_whole_image": crops,
        "images": {
            "sampled": len(paths),
            "embedded": len(paths) - len(failed),
            "failed": len(failed),
            "failed_by_dataset": {ds: sum(f"/{ds}/" in f for f in failed) for ds in PLAN},
        },
        "raw_descriptor_norm": {
            "mean": round(float(norms.mean()), 4),
            "min": round(float(norms.min()), 4),
            "max": round(float(norms.max()), 4),
        }
        if len(norms)
        else None,
        "seconds": {
            "this_run_embedding": round(t_embed, 2),
            "this_run_total": round(time.perf_counter() - t0, 2),
            "from_cache": cached,
            # the uncached embedding pass (possibly an earlier run): wall seconds, photos, processes, 1-min load
            "uncached_embedding_pass": meta.get("seconds"),
            "uncached_per_photo": round(meta["seconds"] / meta["photos"], 4) if meta.get("photos") else None,
            "uncached_workers": meta.get("workers"),
            "uncached_load_average": meta.get("load_average"),
        },
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "workers": args.workers},
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")

    cols = ("set", "pairs", "scored", "skipped", "accuracy", "TAR", "FAR", "AUC", "best thr", "best acc")
    print(f"face verification, backend {args.backend}, threshold {enc.threshold}")
    print("  ".join(f"{c:>9}" for c in cols))
    rows = [*results.items(), ("overall", overall), ("lfw 64px", crops)]
    for name, r in rows:
        vals = (
            name,
            r["pairs"],
            r["scored"],
            r["skipped_pairs"],
            r["accuracy"],
            r["tar"],
            r["far"],
            r["auc"],
            r["best_threshold"],
            r["best_accuracy"],
        )
        print("  ".join(f"{v:>9}" if not isinstance(v, float) else f"{v:9.4f}" for v in vals))
    unc = "" if meta.get("seconds") is None else f"; uncached pass {meta['seconds']:.0f} s for {meta['photos']} photos"
    print(
        f"photos {len(paths)} ({len(failed)} without a face), embedding {t_embed:.1f} s"
        f"{' (cached' + unc + ')' if cached else ''}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
