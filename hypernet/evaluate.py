"""The evaluation table: the hypernet against baselines on held-out (``eval`` split) identities.

Candidates (all on the same identities, seeds and noise): ``base`` (no adapter), ``mean`` (training-set mean
adapter), ``nearest`` (adapter of the training identity with the closest face embedding), optionally
``autoencoder`` (the oracle adapter encoded and decoded by the hypernet's autoencoder: the autoencoder validated by
the function of what it decodes), ``mlp`` (direct
regression embedding -> tokens), ``hypernet`` (the diffusion hypernetwork) and ``oracle`` (the identity's own
trained adapter). Metrics per identity, averaged with bootstrap intervals over identities:

* identity recovery = Σ_j (sim_x − sim_base) / Σ_j (sim_oracle − sim_base): the share of the oracle's identity
  gain a candidate recovers. sim = face similarity of its generations (fixed seeds) to the identity's held-out
  photos. (A ratio of sums: per-identity ratios explode where the oracle's own gain is near zero.)
* function fidelity = 1 − E‖ε_x − ε_oracle‖² / E‖ε_base − ε_oracle‖² on the identity's photos at fixed noise
  and timesteps (how much of the oracle adapter's effect on the denoiser the candidate reproduces); also on its
  held-out photos (``function_fidelity_heldout``: the part of the effect that is not the oracle's memory of its
  training photos), and the cosine between the candidate's and the oracle's effects ε_x − ε_base and
  ε_oracle − ε_base on the training photos (``function_cosine``: direction without magnitude; its square is the
  fidelity the candidate would reach at the best scale of its effect);
* weight cosine of the candidate's ΔW to the oracle's; the no-face rate of its generations; seconds/identity;
* held-out loss gain = Σ_j (L_base − L_x) / Σ_j (L_base − L_oracle), L the denoising loss on the identity's
  held-out photos at fixed noise and timesteps: how much the candidate lowers the loss on photos no adapter was
  trained on, as a fraction of what the oracle lowers it (``heldout_loss_gain``).

A checkpoint over identity-basis codes (:mod:`hypernet.basis_predict`) is scored on a codes dataset: the oracle is
the identity's fitted code, the baselines work in code space, and three kinds of rows join the table (in
``variants``): ``refit`` (the oracle re-fitted with another seed: its function fidelity is ``refit_fidelity``, the
ceiling of fidelity), ``refine_N`` (the hypernet's code refined N steps on the identity's photos; seconds include
the prediction). ``split="all"`` scores every identity of a dataset of new people; baselines that learn from
training identities then need ``train_dataset``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline_data.check import generate, generate_with
from pipeline_data.cliargs import finite, positive, refine_steps
from weights.adapter import Adapter
from weights.apply import apply_adapter, restore
from weights.methods import get_method, method_config

from .table import CANDIDATES, tabulate

OPTIONAL = ("mean", "nearest", "mlp", "autoencoder")  # candidates chosen with ``EvalConfig.baselines``
SPLITS = ("eval", "val", "all")  # all: every identity of a dataset of new people


@dataclass
class EvalConfig:
    """How ``difflora hypernet eval`` measures."""

    seeds: int = 8  # generations per candidate and identity
    gen_steps: int = 20  # DDIM steps of the base model's generations
    guidance: float = 3.0  # CFG scale of the generations
    sample_steps: int | None = None  # DDIM steps of the hypernet (None: the checkpoint's default)
    cfg_scale: float | None = None  # hypernet classifier-free guidance (None: the checkpoint's default)
    timesteps: tuple[int, ...] = (50, 200, 400, 600, 800)  # function-fidelity timesteps
    limit: int | None = None  # evaluate only the first N eval identities
    mlp_epochs: int = 300  # regression-MLP baseline training epochs
    split: str = "eval"  # identities evaluated: eval (the table) | val (tuning sampling options, never eval)
    samples: int | None = None  # hypernet samples averaged per prediction (None: the checkpoint's default)
    baselines: tuple[str, ...] = ("mean", "nearest", "mlp")  # besides base and oracle; also: autoencoder
    progress: bool = False  # progress bar over the evaluated identities
    variants: tuple[tuple[float, int, int], ...] = ()  # extra hypernet (cfg_scale, samples, steps) rows (tuning)
    mlp_scales: tuple[float, ...] = ()  # extra rows: the MLP's deviation from the mean adapter amplified x s
    refine_steps: tuple[int, ...] = (5, 20)  # basis checkpoints: rows of the hypernet's code refined N steps
    refit: bool = True  # basis checkpoints: the oracle re-fitted with another seed (refit_fidelity)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        self.refine_steps = tuple(int(n) for n in self.refine_steps)
        for n in self.refine_steps:
            refine_steps(n, "refine steps")
        self.variants = tuple((float(c), int(n), int(k)) for c, n, k in self.variants)  # JSON gives lists
        self.mlp_scales = tuple(float(x) for x in self.mlp_scales)
        for name in ("seeds", "gen_steps", "sample_steps", "limit", "mlp_epochs", "samples"):
            positive(getattr(self, name), name)
        finite(self.cfg_scale, "cfg_scale")
        finite(self.guidance, "guidance")
        for c, n, k in self.variants:
            finite(c, "variant cfg_scale")
            positive(n, "variant samples")
            positive(k, "variant sample_steps")
        for x in self.mlp_scales:
            finite(x, "mlp scale")
        unknown = set(self.baselines) - set(OPTIONAL)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {', '.join(OPTIONAL)}")


def _delta_vector(unet, adapter: Adapter | None) -> torch.Tensor:
    """All targeted layers' ΔW concatenated (zeros for None)."""
    out = []
    method = get_method(adapter.spec.method) if adapter is not None else None
    for lay in adapter.spec.layers if adapter is not None else []:
        W = unet.get_submodule(lay.name).weight
        out.append(method.delta(W, adapter.layer_params(lay.name), method_config(adapter.spec)).float().flatten())
    return torch.cat(out)


def identity_crops(rec: dict, encoder, size: int, padding: float, photos: str = "photos_used") -> np.ndarray:
    """The aligned crops of an identity's training photos (``photos_used``; ``"heldout"`` for the held-out ones),
    as the data build made them."""
    from pipeline_data.tiny.crops import aligned_crop

    crops = []
    for name in rec[photos]:
        rgb = encoder.load_rgb(str(Path(rec["source"]) / name))
        crops.append(aligned_crop(encoder, rgb, encoder.embed(rgb).face, size, padding))
    return np.stack(crops)


@torch.no_grad()
def _eps(pipe, sched, adapter: Adapter | None, latents, noise, t, cond) -> torch.Tensor:
    state = apply_adapter(pipe.unet, adapter) if adapter is not None else None
    try:
        x = sched.add_noise(latents, noise, t)
        return pipe.unet(x, t, **cond).sample.float()
    finally:
        if state is not None:
            restore(pipe.unet, state)


def _load_dataset(directory: str | Path, predictor):
    """The dataset the predictor is scored on: a codes dataset in its basis, or an adapter dataset of its layout."""
    from .adapter_data import load_adapter_dataset
    from .code_data import load_code_dataset

    if predictor.supports_refine:  # a basis predictor
        ds = load_code_dataset(directory)
        if ds.basis.fingerprint() != predictor.basis.fingerprint():
            raise ValueError(f"{directory}: its codes were fitted in another basis than the checkpoint's")
        return ds
    ds = load_adapter_dataset(
        directory, token_dim=predictor.layout.token_dim, canonicalize=predictor.layout.canonicalize
    )
    if ds.layout.spec_hash != predictor.layout.spec_hash:
        raise ValueError("the checkpoint was trained on adapters of another spec than this dataset's")
    return ds


def evaluate(
    dataset_dir: str | Path,
    checkpoint_dir: str | Path,
    cfg: EvalConfig | None = None,
    train_dataset: str | Path | None = None,
) -> dict:
    """Run the whole table (see module docstring); returns the result dict written by :func:`write_results`.

    ``train_dataset``: with ``split="all"``, the dataset whose train/val identities the baselines learn from (without
    it those baselines are left out)."""
    from diffusers import DDPMScheduler

    from pipeline_data.faces import get_encoder
    from pipeline_data.models import load_pipeline

    from .baselines import MeanAdapter, MLPConfig, NearestNeighbour, RegressionMLP
    from .predict import Predictor

    cfg = cfg or EvalConfig()
    predictor = Predictor.load(checkpoint_dir)
    cfg = replace(  # record the sampling options actually used
        cfg,
        cfg_scale=predictor.cfg_scale if cfg.cfg_scale is None else cfg.cfg_scale,
        samples=predictor.samples if cfg.samples is None else cfg.samples,
        sample_steps=predictor.steps if cfg.sample_steps is None else cfg.sample_steps,
    )
    ds = _load_dataset(dataset_dir, predictor)
    basis_kind = predictor.supports_refine
    # baselines learn from what the hypernet learnt from: train+val for the table, train only when tuning on val
    fit_splits = ("train", "val") if cfg.split in ("eval", "all") else ("train",)
    if cfg.split == "all":  # a dataset of new people: every identity; training identities from train_dataset
        eval_rows = list(range(len(ds.records)))[: cfg.limit]
        tds = _load_dataset(train_dataset, predictor) if train_dataset is not None else None
        train_rows = [i for i, r in enumerate(tds.records) if r.get("split") in fit_splits] if tds else []
        train = tds.data.subset(train_rows) if train_rows else None
        if train is None:
            cfg = replace(cfg, baselines=tuple(b for b in cfg.baselines if b == "autoencoder"), mlp_scales=())
    else:
        train_rows = [i for i, r in enumerate(ds.records) if r.get("split") in fit_splits]
        eval_rows = [i for i, r in enumerate(ds.records) if r.get("split") == cfg.split][: cfg.limit]
        if not eval_rows or not train_rows:
            raise ValueError(f"need train and {cfg.split} identities, got {len(train_rows)} and {len(eval_rows)}")
        train = ds.data.subset(train_rows)
    if not eval_rows:
        raise ValueError(f"{dataset_dir}: no identity to evaluate")
    conds = [ds.data.cond[i] for i in eval_rows]
    tokens: dict[str, Any] = {}  # name -> (B, T, D) baseline tokens, or B adapters of a hypernet row
    seconds: dict[str, float] = {}
    models = {
        "mean": MeanAdapter,
        "nearest": NearestNeighbour,
        "mlp": lambda: RegressionMLP(MLPConfig(epochs=cfg.mlp_epochs)),
    }
    if "autoencoder" in cfg.baselines:  # the oracle through the latent: what the autoencoder keeps of its function
        model = predictor.hypernet.model
        with torch.no_grad():
            raw = ds.data.tokens[eval_rows].to(model.mask.device)
            tokens["autoencoder"] = model.decode_raw(model.encode_raw(raw)).float().cpu()  # (B, T, D)
        seconds["autoencoder"] = 0.0
    fitted = {}
    for name in [b for b in cfg.baselines if b != "autoencoder"]:
        fitted[name] = models[name]().fit(train)
        t0 = time.perf_counter()
        tokens[name] = fitted[name].predict(conds)
        seconds[name] = (time.perf_counter() - t0) / len(conds)
    if cfg.mlp_scales:  # the counterpart of the hypernet's CFG scale: amplify what the regression predicts
        mlp = fitted["mlp"] if "mlp" in fitted else models["mlp"]().fit(train)
        t0 = time.perf_counter()
        pred = tokens["mlp"] if "mlp" in tokens else mlp.predict(conds)  # (B, T, D)
        per_id = seconds.get("mlp", (time.perf_counter() - t0) / len(conds))
        mean = mlp.mean * mlp.mask  # (T, D)
        for s in cfg.mlp_scales:
            tokens[f"mlp_x{s:g}"] = mean + s * (pred - mean)
            seconds[f"mlp_x{s:g}"] = per_id
    main = (cfg.cfg_scale, cfg.samples, cfg.sample_steps)
    hyper_rows = {"hypernet": main} | {variant_name(*v): v for v in cfg.variants if v != main}
    for name, (scale, n, steps) in hyper_rows.items():
        t0 = time.perf_counter()
        tokens[name] = predictor.predict_batch(conds, steps=steps, cfg_scale=scale, samples=n)
        seconds[name] = (time.perf_counter() - t0) / len(conds)

    pipe = load_pipeline(ds.recipe.get("base", "tiny"))
    encoder = get_encoder(ds.face_backend)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    seeds = list(range(cfg.seeds))
    caption = ds.recipe.get("caption", "a photo of sks person")
    names = [c for c in CANDIDATES if c not in OPTIONAL or c in cfg.baselines]
    names += [n for n in [*hyper_rows, *tokens] if n not in names]
    per: dict[str, dict[str, dict]] = {c: {} for c in names}
    base_imgs = generate(pipe, caption, seeds, steps=cfg.gen_steps, guidance=cfg.guidance, size=size)  # shared
    from tqdm.auto import tqdm

    if basis_kind:
        names += [n for n in basis_rows(cfg) if n not in names]
        per |= {n: {} for n in basis_rows(cfg)}
    for k, row in enumerate(tqdm(eval_rows, desc=f"{cfg.split} identities", unit="id", disable=not cfg.progress)):
        rec = ds.records[row]
        cands: dict[str, Adapter | None] = {"base": None, "oracle": ds.adapter(row)}
        cands.update({n: tokens[n][k] if n in hyper_rows else ds.adapter(row, tokens[n][k]) for n in tokens})
        if basis_kind:
            crops = identity_crops(rec, encoder, size, ds.recipe.get("crop_padding", 0.3))
            code = predictor.predict_codes([conds[k]], steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                                           samples=cfg.samples)[0]  # fmt: skip
            for name, (adapter, secs) in basis_candidates(pipe, predictor, ds, crops, code, cfg).items():
                cands[name] = adapter
                extra = seconds["hypernet"] if name.startswith("refine") else 0.0  # refine starts from a prediction
                seconds[name] = seconds.get(name, 0.0) + (secs + extra) / len(eval_rows)
        scores = score_candidates(pipe, sched, encoder, rec, cands, cfg, base_imgs, ds.recipe)
        for c, m in scores.items():
            per[c][rec["identity"]] = m
    res = tabulate(per, seconds, cfg)
    if basis_kind and "refit" in res.get("variants", {}):
        res["refit_fidelity"] = res["variants"]["refit"]["function_fidelity"]
    return res


def basis_rows(cfg: EvalConfig) -> list[str]:
    """The extra rows of a basis checkpoint's table: refit (if ``cfg.refit``) and refine_N for each N."""
    return (["refit"] if cfg.refit else []) + [f"refine_{n}" for n in cfg.refine_steps]


def basis_candidates(pipe, predictor, ds, crops: np.ndarray, code: torch.Tensor, cfg: EvalConfig) -> dict:
    """``{row: (adapter, seconds)}`` of one identity: the oracle re-fitted with the recipe's seed + 1 from its
    training crops (``refit``), and the hypernet's ``code`` refined N steps on them (``refine_N``)."""
    from pipeline_data.basis_train import fit_code
    from pipeline_data.recipe import BuildConfig

    out = {}
    if cfg.refit:
        recipe = BuildConfig.from_dict(ds.recipe)
        recipe.seed += 1
        t0 = time.perf_counter()
        res = fit_code(pipe, crops, recipe, ds.basis)
        out["refit"] = (res.adapter, time.perf_counter() - t0)
    for n in cfg.refine_steps:
        r = predictor.refine(pipe, crops, code, n)
        out[f"refine_{n}"] = (r.adapter, r.seconds)
    return out


@torch.no_grad()
def candidate_images(
    pipe, cands: dict[str, Adapter | None], cfg: EvalConfig, base_imgs, recipe: dict
) -> dict[str, np.ndarray]:
    """Every candidate's generations (seeds 0..cfg.seeds-1 of the dataset caption); ``None`` -> ``base_imgs``."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    caption, seeds = recipe.get("caption", "a photo of sks person"), list(range(cfg.seeds))
    return {
        c: base_imgs
        if a is None
        else generate_with(pipe, a, caption, seeds, steps=cfg.gen_steps, guidance=cfg.guidance, size=size)
        for c, a in cands.items()
    }


@torch.no_grad()
def score_candidates(
    pipe,
    sched,
    encoder,
    rec: dict,
    cands: dict[str, Adapter | None],
    cfg: EvalConfig,
    base_imgs,
    recipe: dict,
    images: dict[str, np.ndarray] | None = None,
) -> dict[str, dict]:
    """One identity's metrics for every candidate adapter (``None`` = the base model, whose images are
    ``base_imgs``; ``cands["oracle"]`` is the reference): sim, function_fidelity, function_fidelity_heldout,
    function_cosine, weight_cosine, no_face, heldout_loss. ``images`` holds candidates' generations already made (by
    :func:`candidate_images`, e.g. for another reference); the others are generated."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    caption = recipe.get("caption", "a photo of sks person")
    images = dict(images or {})
    todo = {c: a for c, a in cands.items() if c not in images}
    images |= candidate_images(pipe, todo, cfg, base_imgs, recipe)
    heldout = np.asarray(rec["heldout_crop_embeddings"], dtype=np.float32)  # (H, E)
    # function fidelity inputs: the identity's training and held-out photos, fixed noise and timesteps
    pad = recipe.get("crop_padding", 0.3)
    eps = photo_eps(pipe, sched, cands, identity_crops(rec, encoder, size, pad), cfg.timesteps, caption, 0)
    eps_ho, noise_ho = photo_eps(
        pipe, sched, cands, identity_crops(rec, encoder, size, pad, "heldout"), cfg.timesteps, caption, 1, True
    )
    d_oracle = _delta_vector(pipe.unet, cands["oracle"])
    out = {}
    for c, a in cands.items():
        imgs = images[c]
        emb = encoder.embed_images_as_faces(list(imgs))  # (K, E)
        sim = float(np.mean(encoder.similarity(emb[:, None, :], heldout[None, :, :])))
        no_face = float(np.mean([not encoder.detect(_upscale(im)) for im in imgs]))
        fid, fcos = effect_fidelity(eps, c)
        fid_ho, _ = effect_fidelity(eps_ho, c)
        dv = _delta_vector(pipe.unet, a) if a is not None else torch.zeros_like(d_oracle)
        cos = (
            float(torch.nn.functional.cosine_similarity(dv.double(), d_oracle.double(), dim=0))
            if dv.norm() > 0
            else 0.0
        )
        out[c] = {
            "sim": sim, "function_fidelity": fid, "function_fidelity_heldout": fid_ho, "function_cosine": fcos,
            "weight_cosine": cos, "no_face": no_face, "heldout_loss": float(((eps_ho[c] - noise_ho) ** 2).mean()),
        }  # fmt: skip
    return out


def photo_inputs(pipe, crops: np.ndarray, timesteps, caption: str, seed: int) -> tuple:
    """Function-fidelity inputs on the crops: (latents, noise, timesteps, UNet conditioning), every crop at every
    timestep, with VAE samples and noise fixed by ``seed``."""
    from pipeline_data.adapter_train import encode_latents, unet_conditioning

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    lat = encode_latents(pipe, crops, g, flip=False)
    ts = torch.tensor(timesteps).repeat_interleave(len(lat))
    lat = lat.repeat(len(timesteps), 1, 1, 1)  # (len(ts) * N, C, h, w)
    noise = torch.randn(lat.shape, generator=g)
    return lat, noise, ts, unet_conditioning(pipe, caption, len(lat), size, size)


def photo_eps(
    pipe, sched, cands: dict, crops: np.ndarray, timesteps, caption: str, seed: int, with_noise: bool = False
):
    """Every candidate's noise prediction on the crops, at fixed VAE samples, noise and timesteps (``with_noise``:
    ``(predictions, the noise)``, for the denoising loss)."""
    lat, noise, ts, cond = photo_inputs(pipe, crops, timesteps, caption, seed)
    eps = {c: _eps(pipe, sched, a, lat, noise, ts, cond) for c, a in cands.items()}
    return (eps, noise) if with_noise else eps


def effect_fidelity(eps: dict, c: str) -> tuple[float, float]:
    """(function fidelity, cosine of the effects) of candidate ``c`` against ``eps["oracle"]``, both from base."""
    if "base" not in eps:
        return float("nan"), float("nan")
    d_o, d_c = eps["oracle"] - eps["base"], eps[c] - eps["base"]
    den = float((d_o**2).mean())
    fid = 1.0 - float(((d_c - d_o) ** 2).mean()) / den if den > 0 else float("nan")
    norm = float(d_c.norm() * d_o.norm())
    return fid, (float((d_c * d_o).sum()) / norm if norm > 0 else 0.0)


def variant_name(cfg_scale: float, samples: int, steps: int) -> str:
    """Row name of a hypernet sampling variant, e.g. ``hypernet_cfg2_x4_s25``."""
    return f"hypernet_cfg{cfg_scale:g}_x{samples}_s{steps}"


def _upscale(im: np.ndarray, side: int = 150) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BICUBIC))
