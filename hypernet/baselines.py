"""Baselines on the same adapter tokens as the hypernetwork: mean adapter, nearest neighbour by face
embedding, and a direct regression MLP (mean condition embedding -> tokens).

Every baseline has ``fit(train: HypernetDataset) -> self`` and ``predict(conds: list[(P_i, E)]) -> (B, T, D)``
raw tokens, so the evaluation treats them and :class:`hypernet.sample.Hypernet` alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data import HypernetDataset, fit_token_stats, mean_embedding, sample_condition_subsets

__all__ = ["BASELINES", "MLPConfig", "MeanAdapter", "NearestNeighbour", "RegressionMLP", "mean_embedding"]


class MeanAdapter:
    """Predicts the training-set mean adapter for everyone."""

    def fit(self, train: HypernetDataset) -> MeanAdapter:
        self.mean = train.tokens.mean(0)  # (T, D)
        return self

    def predict(self, conds: list[Tensor]) -> Tensor:
        return self.mean.expand(len(conds), -1, -1).clone()  # (B, T, D)


class NearestNeighbour:
    """Predicts the adapter of the training identity whose mean face embedding is closest (cosine)."""

    def fit(self, train: HypernetDataset) -> NearestNeighbour:
        self.keys = mean_embedding(train.cond)  # (N, E)
        self.tokens = train.tokens  # (N, T, D)
        return self

    def predict(self, conds: list[Tensor]) -> Tensor:
        sim = mean_embedding(conds) @ self.keys.T  # (B, N)
        return self.tokens[sim.argmax(1)].clone()  # (B, T, D)


@dataclass
class MLPConfig:
    hidden: int = 256  # MLP width
    depth: int = 2  # hidden layers
    steps: int = 1500  # AdamW steps
    epochs: int | None = None  # if set, train this many passes over the identities instead (overrides steps)
    lr: float = 1e-3  # learning rate (cosine decay to 0)
    weight_decay: float = 1e-2  # AdamW weight decay
    batch_size: int = 64  # identities per step
    max_cond_photos: int = 8  # random photo subsets of 1..min(P_i, this) per step, as for the hypernet
    seed: int = 0  # init and batch RNG


class RegressionMLP:
    """Direct regression: mean condition embedding (E) -> normalised tokens (T*D), masked MSE."""

    def __init__(self, cfg: MLPConfig | None = None) -> None:
        self.cfg = cfg or MLPConfig()

    def fit(self, train: HypernetDataset) -> RegressionMLP:
        c = self.cfg
        gen = torch.Generator().manual_seed(c.seed)
        T, D = train.num_tokens, train.token_dim
        self.mask = train.mask  # (T, D)
        self.mean, self.std, _ = fit_token_stats(train.tokens, train.mask)  # (T, D) each
        target = (train.tokens - self.mean) / self.std * self.mask  # (N, T, D)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(c.seed)
            layers: list[nn.Module] = []
            d_in = train.cond_dim
            for _ in range(c.depth):
                layers += [nn.Linear(d_in, c.hidden), nn.GELU()]
                d_in = c.hidden
            self.net = nn.Sequential(*layers, nn.Linear(d_in, T * D))
        opt = torch.optim.AdamW(self.net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        steps = c.steps if c.epochs is None else c.epochs * -(-len(train) // c.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        m = self.mask.float()
        for _ in range(steps):
            idx = torch.randint(len(train), (c.batch_size,), generator=gen)
            x = mean_embedding(sample_condition_subsets([train.cond[i] for i in idx], c.max_cond_photos, gen))
            pred = self.net(x).view(-1, T, D)  # (B, T, D)
            loss = ((pred - target[idx]) ** 2 * m).sum() / (m.sum() * len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        self.net.eval()
        return self

    @torch.no_grad()
    def predict(self, conds: list[Tensor]) -> Tensor:
        T, D = self.mask.shape
        pred = self.net(mean_embedding(conds)).view(-1, T, D)  # (B, T, D) normalised
        return (pred * self.std + self.mean) * self.mask


BASELINES = {"mean": MeanAdapter, "nearest": NearestNeighbour, "mlp": RegressionMLP}
