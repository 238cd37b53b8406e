"""Identity from 1..N photos: per-photo results, pairwise similarities, outliers, one aggregated embedding.

Rule for outliers: photos are linked when their similarity reaches the backend's threshold; the largest connected
group (ties: the higher mean similarity) is the person. Photos outside it are outliers ("matches none of the
other photos" / "matches only ..."), and so are members whose similarity to the mean of the *other* members is
below the threshold (a chain through a look-alike). With no link at all among two or more photos there is no
consensus: nothing is dropped and ``consistent`` is False. Photos that gave no embedding are reported as failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline_data.faces.base import FaceEncoder, FaceResult, l2_normalize
from pipeline_data.images import ImageDecodeError

__all__ = ["IdentityResult", "PhotoResult", "build_identity", "identity_from_embeddings", "similarity"]


def similarity(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """Cosine similarity of face embeddings (the measure every backend's ``threshold`` is defined on)."""
    a, b = l2_normalize(a), l2_normalize(b)
    return np.sum(a * b, axis=-1) if a.ndim > 1 or b.ndim > 1 else float(np.dot(a, b))


@dataclass
class PhotoResult:
    """One reference photo's outcome."""

    name: str  # file name or "photo[i]"
    result: FaceResult | None = None  # None when the photo failed
    error: str | None = None  # the failure's message
    error_code: str | None = None  # e.g. "no_face", "not_an_image", "too_large"
    outlier: bool = False  # left out of the identity embedding
    reason: str | None = None  # why it is an outlier
    mean_similarity: float | None = None  # mean similarity to the other embedded photos

    @property
    def ok(self) -> bool:
        return self.result is not None

    def to_dict(self, *, embedding: bool = False) -> dict:
        d = {"name": self.name, "ok": self.ok, "outlier": self.outlier}
        if self.result is not None:
            d.update(self.result.to_dict(embedding=embedding))
            d["mean_similarity"] = None if self.mean_similarity is None else round(self.mean_similarity, 4)
        else:
            d.update(error=self.error, error_code=self.error_code)
        if self.outlier:
            d["reason"] = self.reason
        return d


@dataclass
class IdentityResult:
    """The identity built from a set of photos."""

    photos: list[PhotoResult]  # in input order
    embedding: np.ndarray | None  # (D,) L2-normalised mean of the inliers; None if no photo embedded
    similarities: np.ndarray  # (N, N) pairwise similarity over all photos (NaN where a photo failed)
    consistency: float  # mean pairwise similarity among the inliers (1.0 for a single photo, 0.0 for none)
    consistent: bool  # a consensus exists and every embedded photo agrees with it
    backend: str
    threshold: float  # the verification threshold used
    warnings: list[str] = field(default_factory=list)

    @property
    def inliers(self) -> list[int]:
        return [i for i, p in enumerate(self.photos) if p.ok and not p.outlier]

    @property
    def outliers(self) -> list[int]:
        return [i for i, p in enumerate(self.photos) if p.outlier]

    @property
    def failed(self) -> list[int]:
        return [i for i, p in enumerate(self.photos) if not p.ok]

    def to_dict(self, *, embedding: bool = True) -> dict:
        d = {
            "type": "identity",
            "backend": self.backend,
            "threshold": self.threshold,
            "num_photos": len(self.photos),
            "inliers": [self.photos[i].name for i in self.inliers],
            "outliers": [{"name": self.photos[i].name, "reason": self.photos[i].reason} for i in self.outliers],
            "failed": [{"name": self.photos[i].name, "error": self.photos[i].error} for i in self.failed],
            "consistency": round(float(self.consistency), 4),
            "consistent": self.consistent,
            "warnings": list(self.warnings),
        }
        if embedding:
            d["embedding"] = None if self.embedding is None else [round(float(v), 6) for v in self.embedding]
        return d


def _components(adj: np.ndarray) -> list[list[int]]:
    n, seen, comps = len(adj), set(), []
    for s in range(n):
        if s in seen:
            continue
        stack, comp = [s], []
        seen.add(s)
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in np.flatnonzero(adj[i]):
                if int(j) not in seen:
                    seen.add(int(j))
                    stack.append(int(j))
        comps.append(sorted(comp))
    return comps


def identity_from_embeddings(
    embeddings: np.ndarray, threshold: float
) -> tuple[np.ndarray, list[int], dict[int, str], float, bool, list[str]]:
    """Core rule on ``(M, D)`` embeddings -> (similarities, inlier indices, outlier reasons, consistency,
    consistent, warnings)."""
    m = len(embeddings)
    if m == 0:
        return np.zeros((0, 0), np.float32), [], {}, 0.0, False, ["no photo gave a face embedding"]
    e = l2_normalize(np.asarray(embeddings, dtype=np.float32).reshape(m, -1))  # (M, D)
    sims = e @ e.T  # (M, M)
    if m == 1:
        return sims, [0], {}, 1.0, True, []
    adj = (sims >= threshold) & ~np.eye(m, dtype=bool)
    warns: list[str] = []
    if not adj.any():
        warns.append(f"no two of the {m} photos match (threshold {threshold:.3f}); all kept, identity uncertain")
        off = sims[~np.eye(m, dtype=bool)]
        return sims, list(range(m)), {}, float(off.mean()), False, warns
    comps = _components(adj)

    def mean_sim(c: list[int]) -> float:
        if len(c) < 2:
            return -1.0
        sub = sims[np.ix_(c, c)]
        return float(sub[~np.eye(len(c), dtype=bool)].mean())

    main = max(comps, key=lambda c: (len(c), mean_sim(c)))
    reasons: dict[int, str] = {}
    for i in range(m):
        if i in main:
            continue
        best = float(sims[i, main].max())
        links = int(adj[i].sum())
        what = "matches none of the other photos" if links == 0 else f"matches only {links} photo(s) outside the group"
        reasons[i] = f"{what} (best similarity {best:.3f} < threshold {threshold:.3f} to the main group)"
    if len(main) >= 3:  # a member only chained in through one look-alike: check against the others' mean
        for i in list(main):
            rest = [j for j in main if j != i and j not in reasons]
            centre = l2_normalize(e[rest].mean(axis=0))
            s = float(e[i] @ centre)
            if s < threshold:
                reasons[i] = f"similarity to the other photos' mean {s:.3f} < threshold {threshold:.3f}"
    inliers = [i for i in range(m) if i not in reasons]
    if reasons:
        warns.append(f"{len(reasons)} of {m} photos do not match the main group of {len(inliers)}; left out")
    if len(comps) > 1 and len([c for c in comps if len(c) == len(main)]) > 1:
        warns.append("two equally large groups of matching photos; kept the more similar one")
    consistency = mean_sim(inliers) if len(inliers) > 1 else 1.0
    return sims, inliers, reasons, consistency, not reasons, warns


def build_identity(
    encoder: FaceEncoder,
    photos: Sequence[np.ndarray | bytes | str | Path],
    *,
    names: Sequence[str] | None = None,
    results: Sequence[FaceResult | Exception] | None = None,
) -> IdentityResult:
    """Embed 1..N photos and build the identity. Failed photos (no face, bad file) are reported, not raised.

    ``results`` may pass precomputed ``encoder.embed_many(..., errors="return")`` output (skips embedding).
    """
    n = len(photos) if results is None else len(results)
    if names is None:
        names = [Path(p).name if isinstance(p, (str, Path)) else f"photo[{i}]" for i, p in enumerate(photos)]
    if len(names) != n:
        raise ValueError(f"got {len(names)} names for {n} photos")
    if results is None:
        results = encoder.embed_many(photos, errors="return")
    rows: list[PhotoResult] = []
    for name, r in zip(names, results):
        if isinstance(r, FaceResult):
            rows.append(PhotoResult(name, result=r))
        elif isinstance(r, Exception):
            code = getattr(r, "code", "invalid_image" if isinstance(r, ImageDecodeError) else "error")
            rows.append(PhotoResult(name, error=str(r), error_code=code))
        else:
            raise TypeError(f"results must hold FaceResult or Exception, got {type(r).__name__}")
    ok = [i for i, p in enumerate(rows) if p.ok]
    embs = np.stack([rows[i].result.embedding for i in ok]) if ok else np.zeros((0, encoder.dim), np.float32)
    sims_ok, inl, reasons, consistency, consistent, warns = identity_from_embeddings(embs, encoder.threshold)
    sims = np.full((n, n), np.nan, dtype=np.float32)
    if ok:
        sims[np.ix_(ok, ok)] = sims_ok
    for k, i in enumerate(ok):
        if len(ok) > 1:
            rows[i].mean_similarity = float(np.delete(sims_ok[k], k).mean())
        if k in reasons:
            rows[i].outlier, rows[i].reason = True, reasons[k]
    embedding = l2_normalize(embs[inl].mean(axis=0)) if inl else None
    if rows and not ok:
        consistent = False
    if len(ok) < n:
        warns.append(f"{n - len(ok)} of {n} photos gave no face embedding")
    return IdentityResult(rows, embedding, sims, consistency, consistent, encoder.name, encoder.threshold, warns)
