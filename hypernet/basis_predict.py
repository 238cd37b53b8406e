"""Zero-shot personalization in an identity basis: face embeddings -> a code ``c ∈ R^K`` -> its LoRA adapter.

The predictor of a hypernet trained on a codes dataset (autoencoder kind ``basis``). Its directory holds the
hypernetwork checkpoint (``config.json``, ``ema.safetensors``) plus:

* ``basis.safetensors`` — the frozen identity basis (``weights.basis``) that turns codes into adapters;
* ``code_layout.json`` — K, the code token shape, the face backend, the base model and the build recipe the codes
  were fitted with (refine reuses its learning rate, batch and caption);
* ``dataset_recipe.json`` — the ``difflora data build`` options of the dataset it was trained on.

``predict_batch`` returns ordinary LoRA adapters (``basis_to_lora``), so ``difflora predict``, the service and
every other caller of :class:`hypernet.predict.Predictor` use it like any predictor. ``refine`` (HyperDreamBooth's
fast fine-tune, cheaper) starts from the predicted code and optimises only the code on the user's photos
(denoising loss, basis frozen) for N steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline_data.cliargs import refine_steps as check_refine_steps
from weights.adapter import Adapter
from weights.basis import IdentityBasis, basis_to_lora, load_basis, save_basis

from .code_autoencoder import code_token_shape, tokens_to_codes
from .predict import Predictor, _failures
from .sample import Hypernet

CODE_LAYOUT_NAME = "code_layout.json"
BASIS_NAME = "basis.safetensors"


def save_basis_meta(
    directory: str | Path, basis: IdentityBasis, face_backend: str, base: str, recipe: dict | None = None
) -> None:
    """Write the basis and ``code_layout.json`` next to a hypernetwork checkpoint (atomically)."""
    from weights.safetensors_io import atomic_write_bytes

    from .strict_json import dumps

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_basis(basis, d / BASIS_NAME)
    T, D = code_token_shape(basis.num_directions)
    meta = {
        "K": basis.num_directions, "num_tokens": T, "token_dim": D, "face_backend": face_backend, "base": base,
        "basis_fingerprint": basis.fingerprint(), "recipe": _refine_recipe(recipe or {}),
    }  # fmt: skip
    atomic_write_bytes(d / CODE_LAYOUT_NAME, (dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def _refine_recipe(recipe: dict) -> dict:
    """The build-config fields refine reads (seed, lr, batch_size, caption, crop_padding)."""
    keys = ("seed", "lr", "batch_size", "caption", "crop_padding")
    return {k: recipe[k] for k in keys if k in recipe}


@dataclass
class RefineResult:
    """A refined code (K,), its adapter, the seconds the refine took and its per-step losses."""

    code: Tensor
    adapter: Adapter
    seconds: float
    losses: list[float] = field(default_factory=list)


class BasisPredictor(Predictor):
    """``predict(embeddings) -> Adapter`` through an identity basis; ``refine`` fits the code further."""

    supports_refine = True

    def __init__(
        self,
        hypernet: Hypernet,
        basis: IdentityBasis,
        *,
        face_backend: str = "dlib",
        base: str = "tiny",
        recipe: dict | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        samples: int | None = None,
        trained: bool = True,
    ) -> None:
        ae = hypernet.config.autoencoder
        if ae.kind != "basis":
            raise ValueError(f"a basis predictor needs a hypernet of autoencoder kind 'basis', got {ae.kind!r}")
        T, D = code_token_shape(basis.num_directions)
        if (ae.num_tokens, ae.token_dim) != (T, D):
            raise ValueError(
                f"hypernet makes ({ae.num_tokens}, {ae.token_dim}) tokens, a K = {basis.num_directions} code needs "
                f"({T}, {D})"
            )
        self.hypernet, self.basis, self.spec = hypernet, basis, basis.spec
        self.layout, self.template = None, None  # the LoRA family's token layout: the basis replaces both
        sc = hypernet.config.sampling  # defaults: the checkpoint's sampling.json
        self.steps = sc.steps if steps is None else steps
        self.cfg_scale = sc.cfg_scale if cfg_scale is None else cfg_scale
        self.samples = sc.samples if samples is None else samples
        self.face_backend, self.trained, self.base = face_backend, trained, base
        self.recipe = _refine_recipe(recipe or {})

    @property
    def num_directions(self) -> int:
        return self.basis.num_directions

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu", **kw) -> BasisPredictor:
        from .checkpoint import read_json

        d = Path(directory)
        for name in ("config.json", CODE_LAYOUT_NAME, BASIS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d} is not a basis hypernetwork checkpoint: {name} is missing")
        meta = read_json(d / CODE_LAYOUT_NAME)
        if not isinstance(meta, dict) or not {"K", "face_backend"} <= set(meta):
            raise ValueError(f"{d / CODE_LAYOUT_NAME}: expected an object with 'K' and 'face_backend'")
        basis = load_basis(d / BASIS_NAME)
        fp = basis.fingerprint()
        if basis.num_directions != meta["K"] or fp != meta.get("basis_fingerprint", fp):
            raise ValueError(f"{d / BASIS_NAME} is not the basis {d / CODE_LAYOUT_NAME} names")
        hypernet = Hypernet.load(d, device)
        try:
            return cls(
                hypernet, basis, face_backend=meta["face_backend"], base=meta.get("base", "tiny"),
                recipe=meta.get("recipe"), **kw,
            )  # fmt: skip
        except ValueError as e:
            raise ValueError(f"{d / CODE_LAYOUT_NAME}: {e}") from None

    def _save_meta(self, d: Path) -> None:
        save_basis_meta(d, self.basis, self.face_backend, self.base, self.recipe)

    # ---- prediction -------------------------------------------------------------------------------------------
    def predict_codes(
        self, identities: Sequence[np.ndarray | Tensor], *, seed: int = 0, steps: int | None = None,
        cfg_scale: float | None = None, samples: int | None = None,
    ) -> Tensor:  # fmt: skip
        """(B, K) codes of B identities (each a (P_i, E) array of its photos' embeddings), sampled as one batch."""
        toks = self.predict_tokens(identities, seed=seed, steps=steps, cfg_scale=cfg_scale, samples=samples)
        return tokens_to_codes(toks, self.num_directions)

    def adapter(self, code: Tensor) -> Adapter:
        """The LoRA adapter of a code (K,)."""
        return basis_to_lora(self.basis, code)

    def predict_batch(self, identities: Sequence[np.ndarray | Tensor], **kw) -> list[Adapter]:
        return [self.adapter(c) for c in self.predict_codes(identities, **kw)]

    # ---- refine -------------------------------------------------------------------------------------------------
    def refine_config(self, steps: int):
        """The build recipe refine optimises with: the codes' recipe (lr, batch, caption, seed), ``steps`` steps."""
        from pipeline_data.recipe import BuildConfig

        return BuildConfig.from_dict({**self.recipe, "base": self.base, "steps": steps})

    def crops(self, encoder, rgbs: Sequence[np.ndarray], faces: Sequence, size: int) -> np.ndarray:
        """Aligned crops (N, size, size, 3) of the photos' faces, framed as the codes' training photos were."""
        from pipeline_data.tiny.crops import aligned_crop

        pad = self.recipe.get("crop_padding", 0.3)
        return np.stack([aligned_crop(encoder, rgb, f, size, pad) for rgb, f in zip(rgbs, faces, strict=True)])

    def refine(self, pipe, crops: np.ndarray, code: Tensor, steps: int, *, seed: int | None = None) -> RefineResult:
        """Optimise ``code`` (K,) on ``crops`` ((N, H, W, 3) uint8 aligned faces at the pipeline's size) for ``steps``
        steps with the denoising loss, the basis and the UNet frozen (``pipeline_data.basis_train.fit_code``)."""
        from pipeline_data.basis_train import fit_code

        check_refine_steps(steps, "refine steps")
        t0 = time.perf_counter()
        if steps == 0:
            c = torch.as_tensor(code).detach().float().reshape(-1)
            return RefineResult(c, self.adapter(c), 0.0, [])
        cfg = self.refine_config(steps)
        if seed is not None:
            cfg.seed = seed
        res = fit_code(pipe, crops, cfg, self.basis, init=torch.as_tensor(code).float().reshape(-1))
        return RefineResult(res.code, self.adapter(res.code), time.perf_counter() - t0, list(res.losses))

    def predict_photos(
        self, photos: Sequence, encoder=None, *, refine_steps: int = 0, pipe=None, **kw
    ) -> tuple[Adapter, dict]:
        """Photos -> (adapter, identity report); ``refine_steps`` > 0 refines the predicted code on the photos with
        ``pipe`` (loaded from the checkpoint's base model when None); the report's ``refine_seconds`` says how long."""
        from pipeline_data.faces import get_encoder
        from pipeline_data.faces.identity import build_identity

        check_refine_steps(refine_steps)
        photos = list(photos)
        encoder = encoder or get_encoder(self.face_backend)
        ident = build_identity(encoder, list(photos))
        if ident.embedding is None:
            raise ValueError(f"no usable face in the photos ({'; '.join(_failures(ident))})")
        embs = np.stack([ident.photos[i].result.embedding for i in ident.inliers])
        report = ident.to_dict(embedding=False)
        code = self.predict_codes([embs], **kw)[0]
        if refine_steps == 0:
            return self.adapter(code), {**report, "refine_seconds": 0.0}
        if pipe is None:
            from pipeline_data.models import load_pipeline

            pipe = load_pipeline(self.base)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        rgbs = [encoder.load_rgb(photos[i]) for i in ident.inliers]
        crops = self.crops(encoder, rgbs, [ident.photos[i].result.face for i in ident.inliers], size)
        res = self.refine(pipe, crops, code, refine_steps)
        return res.adapter, {**report, "refine_seconds": res.seconds}
