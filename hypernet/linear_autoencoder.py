"""A closed-form linear weight autoencoder whose latent is the face-predictable subspace of the adapters.

Why: per-identity adapters trained with Adam for a few dozen steps are mostly optimiser noise that no photo
predicts (on the tiny dataset the leading principal component holds 0.8 % of the variance, the top 32 hold 10 %);
a reconstruction-trained autoencoder then spends its latent on that noise (or collapses to the mean), and the
denoiser has nothing identity-specific to generate. This autoencoder keeps only the directions along which the
adapters co-vary with the face: a reduced-rank regression (RRR) basis.

Fit (normalised tokens X (N, T·D), training identities' mean face embeddings C (N, E), ridge λ):

    W  = (C̃ᵀC̃ + λI)⁻¹ C̃ᵀX̃          (E, T·D)  ridge regression face -> adapter (C̃, X̃ centred)
    Ŷ  = C̃ W                          (N, T·D)  its fitted values
    Ŷ  = U S Vᵀ,  basis = V[:, :k]ᵀ   (k, T·D)  the top-k directions of the face-predictable part
    scale = std over identities of X̃ basisᵀ   (k,)

encode(x) = (x basisᵀ) / scale -> (T_lat, D_lat);  decode(z) = (z · scale) basis. Only the real (unmasked)
entries are stored, in float16, to keep the checkpoint small.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import AutoencoderConfig


class LinearAutoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k = cfg.latent_tokens * cfg.latent_dim
        n = cfg.num_tokens * cfg.token_dim  # until fitted (or loaded): every entry
        self.register_buffer("layer_ids", torch.zeros(cfg.num_tokens, dtype=torch.long))  # (T,)
        self.register_buffer("real", torch.ones(cfg.num_tokens, cfg.token_dim, dtype=torch.bool))  # (T, D) stored
        self.register_buffer("basis", torch.zeros(k, n, dtype=torch.float16))  # (k, n) orthonormal rows
        self.register_buffer("scale", torch.ones(k))  # (k,) std of the training coefficients
        self._work: tuple[Tensor, Tensor] | None = None  # see _working
        self._work_src: tuple | None = None  # the tensors (and versions) _work was made from

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # the number of real entries is a property of the fitted data: take the stored buffers' shapes
        if prefix + "basis" in state_dict:
            self.basis = torch.empty_like(state_dict[prefix + "basis"], device=self.basis.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_layer_ids(self, layer_ids: Tensor) -> None:
        if layer_ids.shape != (self.cfg.num_tokens,):
            raise ValueError(f"layer_ids must have shape ({self.cfg.num_tokens},), got {tuple(layer_ids.shape)}")
        self.layer_ids.copy_(layer_ids)

    @property
    def latent_size(self) -> int:
        return self.cfg.latent_tokens * self.cfg.latent_dim

    @torch.no_grad()
    def fit(
        self, x: Tensor, cond: Tensor, mask: Tensor, ridge: float, chunk_values: int = 1 << 26
    ) -> dict[str, float]:
        """x (N, T, D) normalised training tokens, cond (N, E) their mean face embeddings, mask (T, D).

        Sets ``real``, ``basis`` and ``scale``; returns fit statistics (shares of variance). Two passes over column
        chunks of about ``chunk_values`` float64 values each, so memory stays O(N²) + one chunk + the basis at any
        adapter size (SD 1.5's 3.65 M values x 1,000 identities would be 29 GB as one float64 matrix)."""
        k = self.latent_size
        entries = mask.flatten().nonzero().squeeze(1)  # (n,)
        flat = x.flatten(1)  # (N, T*D)
        step = max(1, chunk_values // flat.shape[0])
        spans = [entries[i : i + step] for i in range(0, len(entries), step)]

        def centred(idx: Tensor) -> Tensor:  # (N, len(idx)) float64 columns, centred over identities
            cols = flat[:, idx].double()
            return cols - cols.mean(0)

        C = cond.double() - cond.double().mean(0)  # (N, E)
        # beyond the rank of the face embeddings (at most min(E, N - 1)) there is no face-predictable direction:
        # those latent coordinates get a zero basis row (always 0 on encode, ignored on decode)
        used = min(k, int(torch.linalg.matrix_rank(C)))
        A = torch.linalg.solve(C.T @ C + ridge * torch.eye(C.shape[1], dtype=C.dtype), C.T)  # (E, N)
        # ridge W = A X (E, n) and fitted values Y = C W (N, n) are never formed: YYᵀ = (CA) XXᵀ (CA)ᵀ needs only
        # the N x N Gram matrix of the centred adapters, accumulated over column chunks
        gram = sum(c @ c.T for c in map(centred, spans))  # (N, N)
        CA = C @ A  # (N, N)
        ev, U = torch.linalg.eigh(CA @ gram @ CA.T)  # ascending
        ev, U = ev.flip(0).clamp_min(0), U.flip(1)
        Q = CA.T @ U[:, :used] / ev[:used].sqrt().clamp_min(1e-12)  # (N, used): V = Yᵀ U / √ev = Xᵀ Q
        basis = torch.zeros(k, len(entries), dtype=torch.float16, device=flat.device)  # (k, n)
        at = 0
        for idx in spans:  # second pass: the basis, column chunk by column chunk
            basis[:used, at : at + len(idx)] = (centred(idx).T @ Q).T.half()
            at += len(idx)
        coef = gram @ Q  # (N, used) = X V
        self.real.copy_(mask)
        self.basis = basis
        scale = torch.ones(k, dtype=torch.float64, device=flat.device)
        scale[:used] = coef.std(0).clamp_min(1e-8)
        self.scale = scale.float()
        total = float(gram.trace())
        return {
            "ae_fitted_share": float(ev.sum()) / total,  # variance of the adapters the face regression explains
            "ae_latent_share": float((coef**2).sum()) / total,  # variance of the adapters inside the latent
            "ae_latent_fitted_share": float(ev[:used].sum() / ev.sum()),  # of the fitted variance, kept by k dims
            "ae_latent_dims_used": used,  # k, or fewer when the face embeddings have lower rank
        }

    def _working(self) -> tuple[Tensor, Tensor]:
        """(float32 basis (k, n), flat indices of the stored entries (n,)), converted once per basis: the float16
        basis keeps checkpoints small, converting it on every call cost a third of a prediction."""
        b, r = self.basis, self.real
        src = self._work_src  # holds the tensors themselves: identity, not an address, is compared
        if src is None or src[0] is not b or src[1] != b._version or src[2] is not r or src[3] != r._version:
            self._work = (b.float(), r.flatten().nonzero().squeeze(1))
            self._work_src = (b, b._version, r, r._version)
        return self._work

    def encode(self, x: Tensor) -> Tensor:
        """x (B, T, D) normalised tokens -> latent (B, T_lat, D_lat), unit std per coordinate on training data."""
        basis, entries = self._working()
        flat = x.flatten(1)[:, entries].float()  # (B, n)
        z = (flat @ basis.T) / self.scale  # (B, k)
        return z.view(-1, self.cfg.latent_tokens, self.cfg.latent_dim)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, T_lat, D_lat) -> normalised tokens (B, T, D) (padded entries 0)."""
        B, T, D = z.shape[0], self.cfg.num_tokens, self.cfg.token_dim
        basis, entries = self._working()
        flat = (z.flatten(1).float() * self.scale) @ basis  # (B, n)
        out = flat.new_zeros(B, T * D)
        out[:, entries] = flat
        return out.view(B, T, D)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruction (B, T, D) -> (B, T, D): the projection onto the latent subspace (no noise)."""
        return self.decode(self.encode(x))
