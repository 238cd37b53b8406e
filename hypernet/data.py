"""The hypernetwork's view of a LoRA dataset: adapter tokens, their layout, and face-embedding conditions.

One row per identity: its adapter as tokens (T, D) (all adapters of a dataset share one layout: the layer id
of every token and which entries are real rather than padding) and its condition tokens (P_i, E): one per
reference photo (face embedding, optionally concatenated image features). Splits are always by identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class HypernetDataset:
    tokens: Tensor  # (N, T, D) float32 raw (un-normalised) adapter tokens, padded entries 0
    mask: Tensor  # (T, D) bool, True = a real adapter entry, False = padding
    layer_ids: Tensor  # (T,) int64, the layer of every token
    cond: list[Tensor]  # N tensors (P_i, E): one condition token per reference photo
    names: list[str]  # N identity names, unique

    @classmethod
    def from_tensors(
        cls,
        tokens: Tensor,
        cond: list[Tensor],
        names: list[str] | None = None,
        mask: Tensor | None = None,
        layer_ids: Tensor | None = None,
    ) -> HypernetDataset:
        """Validate and normalise dtypes. ``mask`` defaults to all entries real (a (T,) token mask is broadcast
        over D); ``layer_ids`` defaults to one layer per token; ``names`` to ``id00000``..."""
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be (N, T, D), got shape {tuple(tokens.shape)}")
        N, T, D = tokens.shape
        if mask is None:
            mask = torch.ones(T, D, dtype=torch.bool)
        elif mask.shape == (T,):
            mask = mask[:, None].expand(T, D)
        if mask.shape != (T, D):
            raise ValueError(f"mask must be (T, D) = ({T}, {D}) or (T,), got {tuple(mask.shape)}")
        if layer_ids is None:
            layer_ids = torch.arange(T)
        names = [f"id{i:05d}" for i in range(N)] if names is None else list(names)
        tokens = tokens.detach().float().cpu() * mask  # padded entries exactly 0
        return cls(
            tokens, mask.bool().cpu().contiguous(), layer_ids.long().cpu(), [c.float().cpu() for c in cond], names
        )

    def __post_init__(self) -> None:
        N, T, D = self.tokens.shape
        if self.mask.shape != (T, D):
            raise ValueError(f"mask must be (T, D) = ({T}, {D}), got {tuple(self.mask.shape)}")
        if self.layer_ids.shape != (T,):
            raise ValueError(f"layer_ids must be (T,) = ({T},), got {tuple(self.layer_ids.shape)}")
        if len(self.cond) != N or len(self.names) != N:
            raise ValueError(f"{N} adapters but {len(self.cond)} condition sets and {len(self.names)} names")
        if len(set(self.names)) != N:
            raise ValueError("identity names must be unique")
        dims = {c.shape[-1] for c in self.cond}
        if any(c.ndim != 2 or c.shape[0] < 1 for c in self.cond) or len(dims) > 1:
            raise ValueError(f"every condition set must be (P_i >= 1, E) with one E; got dims {sorted(dims)}")
        if not torch.isfinite(self.tokens).all():
            raise ValueError("tokens contain NaN or inf")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def token_dim(self) -> int:
        return self.tokens.shape[2]

    @property
    def num_layers(self) -> int:
        return int(self.layer_ids.max()) + 1

    @property
    def cond_dim(self) -> int:
        return self.cond[0].shape[-1]

    def subset(self, indices: list[int] | Tensor) -> HypernetDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return HypernetDataset(
            self.tokens[idx], self.mask, self.layer_ids, [self.cond[i] for i in idx.tolist()],
            [self.names[i] for i in idx.tolist()],
        )  # fmt: skip

    def split(self, fraction: float, seed: int = 0) -> tuple[HypernetDataset, HypernetDataset]:
        """Split by identity: (rest, held-out ``fraction`` of identities), reproducible for a seed."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
        n_out = max(1, round(len(self) * fraction))
        if n_out >= len(self):
            raise ValueError(f"cannot hold out {n_out} of {len(self)} identities")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        return self.subset(sorted(perm[n_out:])), self.subset(sorted(perm[:n_out]))


# ----------------------------------------------------------------------------------------------------------------
# Token normalisation (dataset statistics, stored with the checkpoint)
# ----------------------------------------------------------------------------------------------------------------


def fit_token_stats(tokens: Tensor, mask: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics of the training adapters: mean (T, D) per entry, std (T, D) per token (pooled over its real
    entries, so near-constant entries are not blown up), scale () = mean |x| over real entries."""
    m = mask.float()  # (T, D)
    mean = tokens.mean(0) * m  # (T, D)
    var = ((tokens - mean) ** 2 * m).sum((0, 2)) / (m.sum(1) * tokens.shape[0]).clamp_min(1)  # (T,)
    std = var.sqrt().clamp_min(eps)[:, None].expand_as(mean).contiguous()  # (T, D)
    scale = (tokens.abs() * m).sum() / (m.sum() * tokens.shape[0]).clamp_min(1)  # ()
    return mean, std, scale.clamp_min(eps)


# ----------------------------------------------------------------------------------------------------------------
# Condition batching
# ----------------------------------------------------------------------------------------------------------------


def pad_conditions(conds: list[Tensor]) -> tuple[Tensor, Tensor]:
    """B tensors (P_i, E) -> padded (B, P_max, E) and mask (B, P_max) bool, True = a real photo."""
    if not conds:
        raise ValueError("no condition sets given")
    if any(c.ndim != 2 or c.shape[0] < 1 for c in conds):
        raise ValueError(f"each condition set must be (P_i >= 1, E), got {[tuple(c.shape) for c in conds]}")
    E, P = conds[0].shape[1], max(c.shape[0] for c in conds)
    if any(c.shape[1] != E for c in conds):
        raise ValueError(f"condition sets have different embedding dims: {sorted({c.shape[1] for c in conds})}")
    out = conds[0].new_zeros(len(conds), P, E)  # (B, P, E)
    mask = torch.zeros(len(conds), P, dtype=torch.bool, device=conds[0].device)  # (B, P)
    for i, c in enumerate(conds):
        out[i, : c.shape[0]] = c
        mask[i, : c.shape[0]] = True
    return out, mask


def mean_embedding(conds: list[Tensor]) -> Tensor:
    """B condition sets (P_i, E) -> (B, E): the L2-normalised mean of each identity's photo embeddings."""
    return torch.nn.functional.normalize(torch.stack([c.float().mean(0) for c in conds]), dim=-1)


def sample_condition_subsets(conds: list[Tensor], max_photos: int, generator: torch.Generator) -> list[Tensor]:
    """For each identity a random non-empty subset of 1..min(P_i, max_photos) of its photos (training aug.)."""
    out = []
    for c in conds:
        hi = min(c.shape[0], max_photos)
        k = int(torch.randint(1, hi + 1, (1,), generator=generator))
        out.append(c[torch.randperm(c.shape[0], generator=generator)[:k]])
    return out
