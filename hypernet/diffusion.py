"""Gaussian diffusion on latent adapter tokens: noise schedules, training loss and a batched DDIM sampler.

Prediction target (``DenoiserConfig.prediction``):
* ``"v"`` (default): v = sqrt(a) * eps - sqrt(1 - a) * x0, with a = alpha_bar_t. Well-conditioned at both ends
  of the cosine schedule (at t ~ T the x0 estimate from an eps prediction divides by sqrt(a) ~ 0);
* ``"epsilon"``: the noise, as in DDPM / DiT.
Either way an untrained (zero-output) denoiser predicts 0, and the loss is the plain MSE to the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, ...), t (B,)) -> prediction (B, ...)


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal cosine schedule: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2). (T,) float64."""
    f = lambda t: math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_timesteps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), dim=0)


def linear_alphas_cumprod(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM linear beta schedule, rescaled to ``num_timesteps``. (T,) float64."""
    scale = 1000 / num_timesteps
    betas = torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


def _expand(v: Tensor, x: Tensor) -> Tensor:
    """Per-sample scalars (B,) -> broadcastable to x (B, ...)."""
    return v.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


class GaussianDiffusion:
    def __init__(self, num_timesteps: int = 1000, schedule: str = "cosine", prediction: str = "v") -> None:
        if schedule == "cosine":
            ab = cosine_alphas_cumprod(num_timesteps)
        elif schedule == "linear":
            ab = linear_alphas_cumprod(num_timesteps)
        else:
            raise ValueError(f"unknown noise schedule {schedule!r}; choose cosine or linear")
        if prediction not in ("v", "epsilon"):
            raise ValueError(f"unknown prediction target {prediction!r}; choose v or epsilon")
        self.num_timesteps = num_timesteps
        self.prediction = prediction
        self.alphas_cumprod = ab.float()  # (T,)

    def _ab(self, t: Tensor, x: Tensor) -> Tensor:
        return _expand(self.alphas_cumprod.to(x.device)[t], x)  # (B, 1, ...)

    # ------------------------------------------------------------------ training

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(a) x0 + sqrt(1 - a) noise. x0, noise (B, ...); t (B,) int64."""
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        if self.prediction == "epsilon":
            return noise
        ab = self._ab(t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def training_loss(self, model_fn: ModelFn, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """MSE between the model's prediction at x_t and the target (eps or v). Returns a scalar."""
        pred = model_fn(self.q_sample(x0, t, noise), t)
        return ((pred.float() - self.target(x0, t, noise)) ** 2).mean()

    # ------------------------------------------------------------------ sampling

    def split_prediction(self, x_t: Tensor, t: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
        """Model output at x_t -> (x0 estimate, eps estimate), both shaped like x_t."""
        ab = self._ab(t, x_t)
        if self.prediction == "epsilon":
            eps = pred
            x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        else:
            x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * pred
            eps = (1 - ab).sqrt() * x_t + ab.sqrt() * pred
        return x0, eps

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` timesteps from T-1 down to 0, evenly spaced."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"DDIM steps must be in [1, {self.num_timesteps}], got {steps}")
        ts = torch.linspace(self.num_timesteps - 1, 0, steps).round().long().tolist()
        return list(dict.fromkeys(ts))  # unique, descending

    def ddim_sample(self, model_fn: ModelFn, noise: Tensor, *args, **kw) -> Tensor:
        """:meth:`ddim_loop` without autograd (inference)."""
        with torch.no_grad():
            return self.ddim_loop(model_fn, noise, *args, **kw)

    def ddim_loop(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        steps: int = 50,
        eta: float = 0.0,
        generators: list[torch.Generator] | None = None,
    ) -> Tensor:
        """DDIM (Song et al. 2021) from x_T = ``noise`` (B, ...) to x0 (B, ...), autograd kept (the end-to-end
        fine-tune backpropagates through the sampler; :meth:`ddim_sample` is the inference form).

        eta = 0 is deterministic; eta > 0 adds fresh noise each step, drawn row by row from ``generators``
        (one per batch row, so a row's result does not depend on the other rows).
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if eta > 0 and (generators is None or len(generators) != noise.shape[0]):
            raise ValueError("eta > 0 needs one torch.Generator per batch row")
        x = noise
        ts = self.ddim_timesteps(steps)
        ab_all = self.alphas_cumprod.to(x.device)
        for i, t_int in enumerate(ts):
            t = torch.full((x.shape[0],), t_int, dtype=torch.long, device=x.device)
            x0, eps = self.split_prediction(x, t, model_fn(x, t).to(x.dtype))
            ab = ab_all[t_int]
            ab_prev = ab_all[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=x.device)
            sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp_min(0).sqrt() * eps
            if eta > 0 and i + 1 < len(ts):
                z = torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generators])
                x = x + sigma * z.to(x)
        return x
