"""The closed-form linear autoencoder: a whitened projection onto the face-predictable subspace, trained into a
hypernetwork with no autoencoder steps, saved and reloaded at its fitted size."""

from __future__ import annotations

import json

import pytest
import torch

from hypernet.baselines import MeanAdapter
from hypernet.config import AutoencoderConfig
from hypernet.data import HypernetDataset, mean_embedding
from hypernet.linear_autoencoder import LinearAutoencoder
from hypernet.metrics import summarize, weight_metrics
from hypernet.sample import Hypernet
from hypernet.train import Trainer, train
from tests.hypernet._factories import tiny_config, tiny_data


def _planted(n: int = 200, k: int = 3, E: int = 16, T: int = 6, D: int = 10, noise: float = 3.0, seed: int = 0):
    """Tokens = (face embedding) @ M restricted to a k-dim subspace + large isotropic noise, like real adapters:
    the face-predictable part is a small share of the variance."""
    g = torch.Generator().manual_seed(seed)
    C = torch.nn.functional.normalize(torch.randn(n, E, generator=g), dim=-1)  # (n, E)
    M = torch.randn(E, k, generator=g) @ torch.randn(k, T * D, generator=g)  # (E, T*D) rank k
    signal = (C @ M).view(n, T, D)
    x = signal + noise * signal.std() * torch.randn(n, T, D, generator=g)
    return x, signal, C


def _ae(k_tokens: int = 1, k_dim: int = 3, T: int = 6, D: int = 10) -> LinearAutoencoder:
    cfg = AutoencoderConfig(kind="linear", num_tokens=T, token_dim=D, latent_tokens=k_tokens, latent_dim=k_dim)
    return LinearAutoencoder(cfg)


def test_cached_float_basis_follows_refits_and_loads() -> None:
    """encode/decode keep a float32 copy of the float16 basis; a refit or a loaded state must replace it."""
    mask = torch.ones(6, 10, dtype=torch.bool)
    a, b = _planted(seed=1), _planted(seed=2)
    ae = _ae()
    ae.fit(a[0], a[2], mask, ridge=1e-3)
    z = torch.randn(4, 1, 3, generator=torch.Generator().manual_seed(0))
    first = ae.decode(z)
    ae.fit(b[0], b[2], mask, ridge=1e-3)  # same shapes, other subspace
    torch.testing.assert_close(ae.decode(z).flatten(1), (z.flatten(1) * ae.scale) @ ae.basis.float())
    assert not torch.allclose(ae.decode(z), first)
    other = _ae()
    other.load_state_dict(ae.state_dict())
    other.decode(z)  # fills its cache
    ae.fit(a[0], a[2], mask, ridge=1e-3)
    other.load_state_dict(ae.state_dict())  # loaded in place into the cached tensors
    torch.testing.assert_close(other.decode(z), first)
    other.basis.mul_(-1)  # edited in place
    torch.testing.assert_close(other.decode(z), -first)


def test_fit_finds_the_face_predictable_subspace_under_noise() -> None:
    x, signal, C = _planted()
    mask = torch.ones(6, 10, dtype=torch.bool)
    mask[-1, 7:] = False  # padding entries are neither stored nor reconstructed
    x, signal = x * mask, signal * mask
    ae = _ae()
    stats = ae.fit(x, C, mask, ridge=1e-3)
    assert ae.basis.shape == (3, int(mask.sum())) and ae.basis.dtype == torch.float16
    gram = ae.basis.float() @ ae.basis.float().T
    assert torch.allclose(gram, torch.eye(3), atol=5e-3)  # orthonormal rows
    assert stats["ae_fitted_share"] < 0.2 and 0.5 < stats["ae_latent_fitted_share"] < 1.0  # noise is fitted too
    z = ae.encode(x)
    assert z.shape == (200, 1, 3)
    assert torch.allclose(z.flatten(1).std(0), torch.ones(3), atol=0.02)  # whitened on the training data
    rec = ae(x)
    assert (rec[:, ~mask] == 0).all()
    assert torch.allclose(ae(rec), rec, atol=1e-2 * rec.abs().max())  # a projection: idempotent
    # the latent is the planted subspace: it keeps the clean signal whole and ~k/n of isotropic noise
    sig = signal - signal.mean(0)
    assert float(ae(sig).norm() / sig.norm()) > 0.9
    noise = (x - signal) - (x - signal).mean(0)
    assert float(ae(noise).norm() / noise.norm()) < 2 * (3 / mask.sum()) ** 0.5


def test_latent_larger_than_the_embedding_rank_uses_the_rank() -> None:
    """10 identities give centred embeddings of rank 9: a 10-dim latent keeps 9 directions and a dead 10th."""
    x, _, C = _planted(n=10, E=16)
    ae = _ae(k_tokens=2, k_dim=5)
    stats = ae.fit(x, C, torch.ones(6, 10, dtype=torch.bool), ridge=1.0)
    assert stats["ae_latent_dims_used"] == 9 and stats["ae_latent_fitted_share"] == pytest.approx(1.0)
    z = ae.encode(x).flatten(1)  # (10, 10)
    assert torch.all(z[:, 9] == 0) and torch.all(ae.basis[9] == 0) and ae.scale[9] == 1.0
    assert torch.allclose(z[:, :9].std(0), torch.ones(9), atol=1e-3)  # unit std on the training data
    gram = ae.basis[:9].float() @ ae.basis[:9].float().T
    assert torch.allclose(gram, torch.eye(9), atol=1e-2)  # orthonormal (float16 storage)
    assert torch.equal(ae.decode(z), ae.decode(torch.cat([z[:, :9], torch.randn(10, 1)], 1).view(10, 2, 5)))
    with pytest.raises(ValueError, match="kind"):
        AutoencoderConfig(kind="pca")
    with pytest.raises(ValueError, match="ridge"):
        AutoencoderConfig(kind="linear", ridge=0.0)


def _linear_cfg(dn_steps: int = 8, **kw):
    return tiny_config(ae_steps=6, dn_steps=dn_steps, **kw).with_overrides(
        {"autoencoder.kind": "linear", "autoencoder.latent_tokens": 2, "autoencoder.latent_dim": 3}
    )


def test_linear_hypernet_trains_without_autoencoder_steps_and_reloads(tmp_path) -> None:
    data = tiny_data(40)
    tr, va = data.split(0.25)
    final = train(_linear_cfg(), tr, tmp_path, val_set=va, device="cpu", progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["autoencoder"]["kind"] == "linear" and saved["train"]["ae_steps"] == 0 and saved["step"] == 8
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 0 and 0 < recs[0]["ae_fitted_share"] < 1 and "val_ae_rel_mse" in recs[0]
    assert {r["stage"] for r in recs[1:-1]} == {"denoiser"} and "ae_latent_share" in final
    hn = Hypernet.load(tmp_path)  # the fitted basis holds only the real entries: loaded at that size
    assert hn.model.autoencoder.basis.shape == (6, int(tr.mask.sum()))
    pred = hn.predict_tokens(va.cond, steps=5)
    s = summarize(weight_metrics(pred, va.tokens, va.mask, hn.model.token_mean))
    assert s["rel_mse"] == pytest.approx(final["val_rel_mse"], rel=1e-4)
    assert (pred[:, ~tr.mask] == 0).all()


def test_linear_hypernet_resume_matches_uninterrupted(tmp_path) -> None:
    data = tiny_data(32)
    train(_linear_cfg(), data, tmp_path / "straight", device="cpu", progress=False)
    Trainer(_linear_cfg(), data, tmp_path / "cut", device="cpu", progress=False).run(stop_after=5)
    t = Trainer(_linear_cfg(), data, tmp_path / "cut", device="cpu", progress=False)
    assert t.resume() and t.step == 5
    # the basis comes from the checkpoint (no refit on resume), the fit statistics from its state
    t._fit_linear_autoencoder = None  # a refit would now fail loudly
    t.run()
    straight, cut = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("straight", "cut"))
    assert straight["ae_fitted_share"] > 0 and {k: cut[k] for k in straight if k.startswith("ae_")} == {
        k: v for k, v in straight.items() if k.startswith("ae_")
    }
    a = Hypernet.load(tmp_path / "straight").predict_tokens(data.cond[:4], steps=4)
    b = Hypernet.load(tmp_path / "cut").predict_tokens(data.cond[:4], steps=4)
    assert torch.allclose(a, b, atol=1e-5)


def test_linear_hypernet_beats_the_mean_adapter_on_held_out_identities(tmp_path) -> None:
    """Synthetic adapters whose identity part is a function of the face: the linear latent + denoiser predicts
    held-out identities far better than the mean adapter (centred cosine 0 by definition)."""
    data = tiny_data(240)
    tr, va = data.split(0.2)
    cfg = _linear_cfg(dn_steps=250, batch_size=64, eval_every=1000, log_every=50, ckpt_every=1000)
    train(cfg, tr, tmp_path, val_set=va, device="cpu", progress=False)
    hn = Hypernet.load(tmp_path)
    pred = hn.predict_tokens(va.cond, steps=10, samples=4)
    s = summarize(weight_metrics(pred, va.tokens, va.mask, hn.model.token_mean))
    mean = summarize(weight_metrics(MeanAdapter().fit(tr).predict(va.cond), va.tokens, va.mask, hn.model.token_mean))
    assert s["centered_cosine"] > 0.4 and s["rel_mse"] < mean["rel_mse"]


def test_mean_embedding_is_the_normalised_photo_mean() -> None:
    conds = [torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([[0.0, -2.0]])]
    out = mean_embedding(conds)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, -1.0]]))
    assert isinstance(HypernetDataset.from_tensors(torch.zeros(2, 1, 2), conds).cond[0], torch.Tensor)


@pytest.mark.parametrize("chunk_values", [1, 7 * 200, 10**9])  # one column per chunk, ragged chunks, one chunk
def test_chunked_fit_equals_the_one_pass_fit(chunk_values: int) -> None:
    """The fit streams column chunks (bounded memory at SD 1.5 size); the result must not depend on the chunking."""
    x, _, C = _planted(n=200)
    mask = torch.ones(6, 10, dtype=torch.bool)
    mask[5, 4:] = False  # padded entries: chunks are over the real ones
    ref, ae = _ae(), _ae()
    s_ref = ref.fit(x, C, mask, ridge=1.0, chunk_values=10**9)
    s = ae.fit(x, C, mask, ridge=1.0, chunk_values=chunk_values)
    assert ae.basis.shape == (3, 54) and s == pytest.approx(s_ref, rel=1e-9)
    torch.testing.assert_close(ae.basis.float(), ref.basis.float(), atol=1e-3, rtol=0)  # float16 storage
    torch.testing.assert_close(ae.scale, ref.scale, rtol=1e-6, atol=0)
    # and it is the reduced-rank regression of the module docstring, formed densely here
    X = x.flatten(1)[:, mask.flatten()].double()
    X, Cc = X - X.mean(0), C.double() - C.double().mean(0)
    Y = Cc @ torch.linalg.solve(Cc.T @ Cc + torch.eye(Cc.shape[1], dtype=Cc.dtype), Cc.T @ X)  # (N, n) fitted
    V = torch.linalg.svd(Y, full_matrices=False).Vh[:3]  # (3, n) top right singular vectors
    assert torch.allclose((V @ ae.basis.double().T).abs().diagonal(), torch.ones(3, dtype=V.dtype), atol=1e-3)
    torch.testing.assert_close(ae.scale.double(), (X @ V.T).std(0), rtol=1e-3, atol=0)
