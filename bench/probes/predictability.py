"""How predictable are a dataset's adapters from face embeddings? Weight-space diagnostics, no generation.

On the train+val identities of a built dataset (raw factor tokens, as the hypernet sees them): the spectrum of the
identity-to-identity variation (share of variance in the top principal components), and leave-one-out
predictions from the mean face embedding by ridge regression and by the nearest neighbour, scored by the
centred cosine to the true adapter (0 = the mean adapter, 1 = exact).

    .venv/bin/python -m bench.probes.predictability [--dataset data/tiny-lora]

Writes bench/results/predictability.json and prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hypernet.adapter_data import load_adapter_dataset
from weights.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[2]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=REPO / "data" / "tiny-lora")
    ap.add_argument("--token-dim", type=int, default=512)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predictability.json")
    args = ap.parse_args(argv)

    ds = load_adapter_dataset(args.dataset, token_dim=args.token_dim, splits=("train", "val"))
    mask = ds.data.mask.flatten().numpy()
    X = ds.data.tokens.flatten(1).numpy()[:, mask].astype(np.float32)  # (N, values)
    E = np.stack([c.float().mean(0).numpy() for c in ds.data.cond])
    E /= np.linalg.norm(E, axis=1, keepdims=True)  # (N, E) mean face embedding per identity
    n = len(X)
    Xc = X - X.mean(0)
    s = np.linalg.svd(Xc, compute_uv=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    spectrum = {str(k): round(float(share[k - 1]), 4) for k in (1, 8, 32, 128) if k <= n}

    Ec = E - E.mean(0)
    ridge = {}
    for lam in (0.3, 1.0, 3.0):
        H = Ec @ np.linalg.solve(Ec.T @ Ec + lam * np.eye(Ec.shape[1]), Ec.T)  # (N, N) hat matrix
        h = np.diag(H)[:, None]
        loo = (H @ Xc - h * Xc) / (1 - h)  # leave-one-out predictions, exact for ridge
        ridge[str(lam)] = {
            "centred_cosine": round(float(_cos(loo, Xc).mean()), 4),
            "rel_mse": round(float((np.sum((loo - Xc) ** 2, 1) / np.sum(Xc**2, 1)).mean()), 4),
        }
    S = E @ E.T
    np.fill_diagonal(S, -np.inf)
    nn = S.argmax(1)
    res = {
        "dataset": str(args.dataset),
        "identities": n,
        "values_per_adapter": int(X.shape[1]),
        "pca_variance_share_top_k": spectrum,
        "ridge_loo": ridge,
        "nearest_neighbour_centred_cosine": round(float(_cos(Xc[nn], Xc).mean()), 4),
        "mean_norm_over_centred_norm": round(float(np.linalg.norm(X.mean(0)) / np.linalg.norm(Xc, axis=1).mean()), 4),
    }
    atomic_write_json(args.out, res, indent=2)
    print(f"{n} identities, {X.shape[1]} values each")
    print("variance share of the top-k principal components:", spectrum)
    for lam, r in ridge.items():
        print(f"ridge (lambda {lam}) LOO: centred cosine {r['centred_cosine']:+.3f}, rel. MSE {r['rel_mse']:.3f}")
    print(f"nearest neighbour by face embedding: centred cosine {res['nearest_neighbour_centred_cosine']:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
