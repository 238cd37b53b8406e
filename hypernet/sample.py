"""Inference: load a trained hypernetwork (EMA weights) and predict adapter tokens from condition embeddings.

No optimiser or training imports here: this module is on the serving path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pipeline_data.cliargs import finite
from pipeline_data.cliargs import seed as check_seed

from .checkpoint import EMA_NAME, MODEL_NAME, load_config, load_state
from .config import HypernetConfig
from .data import pad_conditions
from .model import HypernetModel


class Hypernet:
    """A trained hypernetwork ready to sample: ``predict_tokens(conds) -> (B, T, D)`` raw adapter tokens."""

    def __init__(self, model: HypernetModel, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.diffusion = model.diffusion()

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True) -> Hypernet:
        """Load ``config.json`` + ``ema.safetensors`` (or ``model.safetensors``) from a checkpoint directory."""
        path = Path(path)
        cfg = load_config(path)
        model = HypernetModel(cfg)
        weights = path / (EMA_NAME if use_ema else MODEL_NAME)
        state = load_state(weights)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches: torch lists every tensor on its own line; name the first
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise ValueError(f"{weights}: does not match config.json ({(lines[1:] or lines)[0]})") from None
        if missing or unexpected:
            raise ValueError(
                f"{path}: checkpoint does not match its config (missing {missing}, unexpected {unexpected})"
            )
        return cls(model, device)

    @property
    def config(self) -> HypernetConfig:
        return self.model.cfg

    @property
    def layer_ids(self) -> Tensor:
        return self.model.autoencoder.layer_ids.cpu()  # (T,)

    @property
    def mask(self) -> Tensor:
        return self.model.mask.cpu()  # (T, D)

    @torch.no_grad()
    def predict_latents(
        self, cond_embeddings: list[Tensor], steps: int = 50, cfg_scale: float = 1.0, eta: float = 0.0, seed: int = 0
    ) -> Tensor:
        """B condition sets (P_i, E) -> diffusion-space latents (B, T_lat, D_lat).

        Every row starts from the noise of ``torch.Generator().manual_seed(seed)``, so a row's result depends only
        on its own photos and the seed, not on the rest of the batch (up to float rounding).
        """
        return self.sample_latents(cond_embeddings, steps, cfg_scale, eta, seed)

    def sample_latents(
        self, cond_embeddings: list[Tensor], steps: int = 50, cfg_scale: float = 1.0, eta: float = 0.0,
        seed: int = 0, noise: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """:meth:`predict_latents` with autograd kept (the end-to-end fine-tune); ``noise`` (B, T_lat, D_lat), if
        given, replaces the seeded starting noise."""
        E = self.model.cfg.denoiser.cond_dim
        if any(c.ndim != 2 or c.shape[-1] != E for c in cond_embeddings):
            raise ValueError(f"condition sets must be (P_i, {E}); got {[tuple(c.shape) for c in cond_embeddings]}")
        cond, mask = pad_conditions([c.float() for c in cond_embeddings])  # (B, P, E), (B, P)
        cond, mask = cond.to(self.device), mask.to(self.device)
        gens = [torch.Generator().manual_seed(seed) for _ in cond_embeddings]
        if noise is None:
            noise = torch.stack(
                [torch.randn(self.model.cfg.autoencoder.latent_shape, generator=g) for g in gens]
            )  # (B, T_lat, D_lat)
        dn = self.model.denoiser

        def model_fn(x: Tensor, t: Tensor) -> Tensor:
            if cfg_scale == 1.0:
                return dn(x, t, cond, mask)
            return dn.forward_with_cfg(x, t, cond, mask, cfg_scale)

        return self.diffusion.ddim_loop(model_fn, noise.to(self.device), steps=steps, eta=eta, generators=gens)

    @torch.no_grad()
    def predict_tokens(
        self,
        cond_embeddings: list[Tensor],
        steps: int = 50,
        cfg_scale: float = 1.0,
        eta: float = 0.0,
        seed: int = 0,
        batch_size: int = 256,
        samples: int = 1,
    ) -> Tensor:
        """B condition sets (P_i, E) -> raw adapter tokens (B, T, D) on the CPU (padded entries 0).

        ``samples`` > 1 averages the decoded tokens of that many samples (seeds ``seed .. seed + samples - 1``):
        an estimate of the posterior mean, which drops the photo-specific variation no face embedding predicts.
        """
        if not cond_embeddings:
            raise ValueError("no condition sets given")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {steps}")
        finite(cfg_scale, "cfg_scale")
        check_seed(seed, "seed")
        out = []
        for i in range(0, len(cond_embeddings), batch_size):
            acc = None
            for j in range(samples):
                zn = self.predict_latents(cond_embeddings[i : i + batch_size], steps, cfg_scale, eta, seed + j)
                tok = self.model.decode_raw(zn).float().cpu()  # (b, T, D)
                acc = tok if acc is None else acc + tok
            out.append(acc / samples)
        return torch.cat(out)
