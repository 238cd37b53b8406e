"""Identity check: do an identity's adapter's generations look like that person's held-out photos?

For identities j with adapters a_j and held-out face embeddings h_j, generate K images per adapter (fixed seeds,
the same seeds for every adapter and for the base model) and embed each whole image as a face (on the tiny
world the generation is an aligned crop). With S[i, j] = mean similarity of adapter i's images to identity j's
held-out photos and S_base[j] the same for the base model:

* ``identity_gain[j]   = S[j, j] − S_base[j]``       (the adapter moves generations toward the person)
* ``identity_margin[j] = S[j, j] − mean_{i≠j} S[i, j]`` (more than other people's adapters do: the control)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline_data.stats import mean_ci
from weights.adapter import Adapter
from weights.apply import apply_adapter, restore


def summarize(values: Sequence[float]) -> dict:
    """Mean, bootstrap 95 % interval and count of per-identity values."""
    return {**mean_ci(values), "n": len(values)}


@torch.no_grad()
def generate(pipe, prompt: str, seeds: Sequence[int], *, steps: int, guidance: float, size: int) -> np.ndarray:
    """(K, size, size, 3) uint8 images, one CPU generator per seed (reproducible across devices)."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(
        [prompt] * len(seeds),
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gens,
        output_type="np",
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def generate_with(
    pipe, adapter: Adapter | None, prompt: str, seeds: Sequence[int], *, steps: int, guidance: float, size: int,
    scale: float = 1.0,
) -> np.ndarray:  # fmt: skip
    """:func:`generate` with ``adapter`` applied for the call (None = the base model); the UNet is restored."""
    state = apply_adapter(pipe.unet, adapter, scale) if adapter is not None else None
    try:
        return generate(pipe, prompt, seeds, steps=steps, guidance=guidance, size=size)
    finally:
        if state is not None:
            restore(pipe.unet, state)


def generation_embeddings(
    pipe,
    encoder,
    adapters: dict[str, Adapter | None],
    *,
    prompt: str,
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    size: int,
    scale: float = 1.0,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Face embeddings (K, E) of the generations of each adapter (None = the base model); ``progress``: a tqdm bar
    over the adapters on stderr."""
    import sys

    from tqdm.auto import tqdm

    out: dict[str, np.ndarray] = {}
    bar = tqdm(adapters.items(), total=len(adapters), desc="identity check", unit="adapter", disable=not progress,
               file=sys.stderr)  # fmt: skip
    for name, adapter in bar:
        imgs = generate_with(pipe, adapter, prompt, seeds, steps=steps, guidance=guidance, size=size, scale=scale)
        out[name] = np.asarray(encoder.embed_images_as_faces(list(imgs)), dtype=np.float32)
    return out


def similarity_matrix(encoder, gen: dict[str, np.ndarray], heldout: dict[str, np.ndarray]) -> np.ndarray:
    """S[i, j]: mean similarity of generator i's images to identity j's held-out photos."""
    names = list(heldout)
    S = np.zeros((len(gen), len(names)), dtype=np.float64)
    for i, g in enumerate(gen.values()):
        for j, n in enumerate(names):
            S[i, j] = float(np.mean(encoder.similarity(g[:, None, :], heldout[n][None, :, :])))
    return S


def gain_and_margin(S: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gain, margin, own similarity) per identity from ``S`` (1 + n, n): row 0 the base model, row 1 + j identity
    j's generator, column j identity j's held-out photos (see the module docstring)."""
    base, own = S[0], S[1:]
    diag = np.diag(own)
    others = (own.sum(axis=0) - diag) / (own.shape[0] - 1)
    return diag - base, diag - others, diag


def identity_check(
    pipe,
    encoder,
    adapters: dict[str, Adapter],
    heldout: dict[str, np.ndarray],
    *,
    prompt: str,
    seeds: Sequence[int],
    steps: int = 20,
    guidance: float = 3.0,
    size: int = 64,
    progress: bool = False,
) -> dict:
    """Per-identity gain and margin (see module docstring) plus their means with bootstrap intervals."""
    ids = [i for i in adapters if i in heldout]
    if len(ids) < 2:
        raise ValueError(
            f"the identity check needs at least 2 identities with adapters and held-out photos, got {len(ids)}"
        )
    gens = generation_embeddings(
        pipe, encoder, {"__base__": None, **{i: adapters[i] for i in ids}},
        prompt=prompt, seeds=seeds, steps=steps, guidance=guidance, size=size, progress=progress,
    )  # fmt: skip
    S = similarity_matrix(encoder, gens, {i: heldout[i] for i in ids})  # (1 + n, n)
    base, own = S[0], S[1:]
    n = len(ids)
    gain, margin, diag = gain_and_margin(S)
    top1 = float(np.mean(np.argmax(own, axis=0) == np.arange(n)))
    per = {
        i: {"gain": float(gain[k]), "margin": float(margin[k]), "sim_own": float(diag[k]), "sim_base": float(base[k])}
        for k, i in enumerate(ids)
    }
    return {
        "n_identities": n,
        "seeds": [int(s) for s in seeds],
        "prompt": prompt,
        "identity_gain": summarize(gain),
        "identity_margin": summarize(margin),
        "top1": top1,
        "top1_chance": 1.0 / n,
        "per_identity": per,
    }
