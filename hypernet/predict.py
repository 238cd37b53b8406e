"""Zero-shot personalization: face embeddings -> a predicted adapter for the base model (the serving path).

A predictor directory holds the hypernetwork checkpoint (``config.json``, ``ema.safetensors``, see
:mod:`hypernet.checkpoint`) plus what turns its tokens back into an adapter:

* ``adapter_layout.json`` — the adapter spec, the token layout and the face backend of the condition embeddings;
* ``adapter_template.safetensors`` — the frozen tensors shared by every identity (SVFit's U/V, LoLDU's LU
  factors, ...; empty for LoRA), in the native adapter format;
* ``dataset_recipe.json`` — the ``difflora data build`` options of the dataset it was trained on.

No optimiser or training imports here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from weights.adapter import Adapter
from weights.spec import AdapterSpec
from weights.tokens import TokenLayout, adapter_to_tokens, split_template, tokens_to_adapter

from .sample import Hypernet

LAYOUT_NAME = "adapter_layout.json"
TEMPLATE_NAME = "adapter_template.safetensors"
RECIPE_NAME = "dataset_recipe.json"


def save_adapter_meta(
    directory: str | Path, layout: TokenLayout, spec: AdapterSpec, template: Adapter, face_backend: str
) -> None:
    """Write the layout/spec and the frozen-tensor template next to a hypernetwork checkpoint (atomically)."""
    from weights.atomic import atomic_write_bytes
    from weights.formats.native import save_native

    from .strict_json import dumps

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"spec": spec.to_dict(), "layout": layout.to_dict(), "face_backend": face_backend}
    atomic_write_bytes(d / LAYOUT_NAME, dumps(meta, sort_keys=True).encode())
    save_native(template, d / TEMPLATE_NAME)


def read_adapter_meta(path: Path) -> tuple[AdapterSpec, TokenLayout, str]:
    """(spec, token layout, face backend) of an ``adapter_layout.json``; a ValueError naming the file if it is
    not what :func:`save_adapter_meta` writes."""
    from .checkpoint import read_json

    meta = read_json(path)
    if not isinstance(meta, dict) or not {"spec", "layout"} <= set(meta):
        got = f"keys {sorted(meta)}" if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise ValueError(f"{path}: expected an object with 'spec' and 'layout', got {got}")
    backend = meta.get("face_backend", "dlib")
    if not isinstance(backend, str):
        raise ValueError(f"{path}: face_backend must be a string, got {backend!r}")
    try:
        return AdapterSpec.from_dict(meta["spec"]), TokenLayout.from_dict(meta["layout"]), backend
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: invalid adapter layout ({type(e).__name__}: {e})") from None


def load_recipe(directory: str | Path | None, base: str = "tiny"):
    """The :class:`pipeline_data.recipe.BuildConfig` of the dataset a predictor directory was trained on (its
    ``dataset_recipe.json``; the defaults when it has none, or when ``directory`` is None), with ``base`` as the
    base model."""
    import json

    from pipeline_data.recipe import BuildConfig

    path = Path(directory) / RECIPE_NAME if directory is not None else None
    if path is None or not path.is_file():
        return BuildConfig(base=base)
    try:
        flags = json.loads(path.read_text())
        if not isinstance(flags, dict):
            raise ValueError(f"expected a JSON object, got {type(flags).__name__}")
        return BuildConfig.from_flags(flags, base=base)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a dataset recipe ({e})") from None


def _failures(ident) -> list[str]:
    """``name: why`` of every photo that gave no face embedding (the error names the file already, or not)."""
    out = []
    for p in ident.photos:
        if not p.ok:
            out.append(p.error if p.error and p.name in p.error else f"{p.name}: {p.error}")
    return out


class Predictor:
    """``predict(embeddings) -> Adapter``: one identity's photos (their face embeddings) to its adapter."""

    def __init__(
        self,
        hypernet: Hypernet,
        layout: TokenLayout,
        spec: AdapterSpec,
        template: Adapter,
        *,
        face_backend: str = "dlib",
        steps: int | None = None,
        cfg_scale: float | None = None,
        samples: int | None = None,
        trained: bool = True,
    ) -> None:
        if layout.spec_hash != spec.hash():
            raise ValueError("the adapter spec does not match the token layout")
        T, D = hypernet.config.autoencoder.num_tokens, hypernet.config.autoencoder.token_dim
        if (T, D) != (layout.num_tokens, layout.token_dim):
            raise ValueError(f"hypernet makes ({T}, {D}) tokens, the layout needs ({layout.num_tokens}, {D})")
        self.hypernet, self.layout, self.spec, self.template = hypernet, layout, spec, template
        s = hypernet.config.sampling  # defaults: the checkpoint's sampling.json (chosen by `hypernet tune`)
        self.steps = s.steps if steps is None else steps
        self.cfg_scale = s.cfg_scale if cfg_scale is None else cfg_scale
        self.samples = s.samples if samples is None else samples
        self.face_backend, self.trained = face_backend, trained

    @property
    def cond_dim(self) -> int:
        return self.hypernet.config.denoiser.cond_dim

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu", **kw) -> Predictor:
        """A trained predictor from a checkpoint directory (clear errors for missing files)."""
        from weights.formats.native import load_native

        from .checkpoint import load_config

        d = Path(directory)
        if (d / "config.json").is_file() and load_config(d).autoencoder.kind == "basis":
            from .basis_predict import BasisPredictor  # codes of an identity basis (hypernet/basis_predict.py)

            return BasisPredictor.load(d, device, **kw)
        for name in ("config.json", LAYOUT_NAME, TEMPLATE_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d} is not a hypernetwork checkpoint: {name} is missing")
        spec, layout, backend = read_adapter_meta(d / LAYOUT_NAME)
        template = load_native(d / TEMPLATE_NAME)
        template = Adapter(spec, template.tensors)
        hypernet = Hypernet.load(d, device)
        try:
            return cls(hypernet, layout, spec, template, face_backend=backend, **kw)
        except ValueError as e:  # the layout does not fit the spec or the hypernet's token shape
            raise ValueError(f"{d / LAYOUT_NAME}: {e}") from None

    @classmethod
    def untrained(
        cls,
        pipe,
        recipe=None,
        *,
        preset: str = "tiny",
        token_dim: int = 64,
        cond_dim: int = 128,
        face_backend: str = "dlib",
        seed: int = 0,
        settings: Sequence[str] = (),
    ) -> Predictor:
        """A real hypernetwork with fresh weights whose token statistics pin every prediction to the method's
        initial adapter (ΔW = 0 for zero-init methods): the service works before a checkpoint exists.
        ``settings`` are ``section.field=value`` overrides of the preset (as ``hypernet train --set``)."""
        from pipeline_data.recipe import BuildConfig
        from weights.inject import inject_adapter, remove_adapter

        from .config import PRESETS
        from .model import HypernetModel

        recipe = recipe or BuildConfig()
        spec = recipe.adapter_spec()
        inject_adapter(pipe.unet, spec, generator=torch.Generator().manual_seed(seed))
        init = remove_adapter(pipe.unet)
        trainable, template = split_template(init)
        layout = TokenLayout.from_adapter(init, token_dim, canonicalize=False)
        base = PRESETS[preset]().with_overrides(list(settings))
        cfg = base.for_data(layout.num_tokens, token_dim, len(layout.groups), cond_dim)
        model = HypernetModel(cfg)
        raw = adapter_to_tokens(init, layout)  # (T, D) the init adapter
        model.set_layout(layout.layer_ids, layout.mask)
        model.set_token_stats(raw, torch.zeros_like(raw), torch.ones(()))
        return cls(Hypernet(model), layout, init.spec, template, face_backend=face_backend, trained=False)

    def save(self, directory: str | Path) -> None:
        """Write a self-contained predictor directory (hypernet config + EMA weights + adapter layout/template)."""
        from .checkpoint import EMA_NAME, atomic_save_tensors, save_config, state_to_tensors

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_config(self.hypernet.config, d)
        atomic_save_tensors(state_to_tensors(self.hypernet.model.state_dict()), d / EMA_NAME)
        self._save_meta(d)

    def _save_meta(self, d: Path) -> None:
        """The files beside the checkpoint that turn its tokens into adapters."""
        save_adapter_meta(d, self.layout, self.spec, self.template, self.face_backend)

    # ---- prediction -------------------------------------------------------------------------------------------
    def _cond(self, emb: np.ndarray | Tensor | Sequence) -> Tensor:
        c = torch.as_tensor(np.asarray(emb, dtype=np.float32))
        if c.ndim == 1:
            c = c[None]
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] != self.cond_dim:
            raise ValueError(
                f"face embeddings must be (photos, {self.cond_dim}) from the {self.face_backend!r} backend, "
                f"got {tuple(c.shape)}"
            )
        if not torch.isfinite(c).all():
            raise ValueError("face embeddings contain NaN or inf")
        return c

    def predict_batch(
        self, identities: Sequence[np.ndarray | Tensor], *, seed: int = 0, steps: int | None = None,
        cfg_scale: float | None = None, samples: int | None = None,
    ) -> list[Adapter]:  # fmt: skip
        """One adapter per identity (each a (P_i, E) array of its photos' embeddings), sampled as one batch."""
        toks = self.predict_tokens(identities, seed=seed, steps=steps, cfg_scale=cfg_scale, samples=samples)
        return [tokens_to_adapter(t, self.layout, self.spec, self.template) for t in toks]

    def predict_tokens(
        self, identities: Sequence[np.ndarray | Tensor], *, seed: int = 0, steps: int | None = None,
        cfg_scale: float | None = None, samples: int | None = None,
    ) -> Tensor:  # fmt: skip
        """Raw tokens (B, T, D) of B identities at the predictor's sampling options (None: its defaults)."""
        return self.hypernet.predict_tokens(
            [self._cond(e) for e in identities], steps=self.steps if steps is None else steps, seed=seed,
            cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale,
            samples=self.samples if samples is None else samples,
        )  # fmt: skip

    def predict(self, embeddings: np.ndarray | Tensor, **kw) -> Adapter:
        """The adapter of one identity from its photos' face embeddings ((P, E) or (E,))."""
        return self.predict_batch([embeddings], **kw)[0]

    supports_refine = False  # refine (optimising the predicted code on the photos) needs an identity basis

    def predict_photos(
        self, photos: Sequence, encoder=None, *, refine_steps: int = 0, pipe=None, **kw
    ) -> tuple[Adapter, dict]:
        """Photos (paths, bytes or RGB arrays) -> (adapter, identity report). Outlier photos are left out.
        ``refine_steps`` > 0 is a ValueError here: only basis predictors (hypernet.basis_predict) refine."""
        if refine_steps:
            raise ValueError(
                f"refine needs a hypernet over identity-basis codes; this checkpoint predicts {self.spec.method} "
                "adapters through a token layout (train one on a `data build --method basis` dataset)"
            )
        del pipe
        from pipeline_data.faces import get_encoder
        from pipeline_data.faces.identity import build_identity

        encoder = encoder or get_encoder(self.face_backend)
        ident = build_identity(encoder, list(photos))
        if ident.embedding is None:
            raise ValueError(f"no usable face in the photos ({'; '.join(_failures(ident))})")
        embs = np.stack([ident.photos[i].result.embedding for i in ident.inliers])
        return self.predict(embs, **kw), ident.to_dict(embedding=False)
