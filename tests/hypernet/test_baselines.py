"""Baselines and weight-space metrics on the synthetic dataset."""

from __future__ import annotations

import pytest
import torch

from hypernet.baselines import BASELINES, MeanAdapter, MLPConfig, NearestNeighbour, RegressionMLP
from hypernet.metrics import summarize, weight_metrics
from tests.hypernet._factories import tiny_data


@pytest.fixture(scope="module")
def split():
    return tiny_data(80).split(0.25)


def test_metrics_of_perfect_and_mean_predictions(split):
    tr, te = split
    mean = tr.tokens.mean(0)
    perfect = summarize(weight_metrics(te.tokens, te.tokens, te.mask, mean))
    assert perfect == pytest.approx({"cosine": 1.0, "centered_cosine": 1.0, "rel_mse": 0.0}, abs=1e-5)
    m = summarize(weight_metrics(mean.expand_as(te.tokens), te.tokens, te.mask, mean))
    assert m["rel_mse"] == pytest.approx(1.0) and m["centered_cosine"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_shapes_and_padding(split, name):
    tr, te = split
    kw = {"cfg": MLPConfig(epochs=1)} if name == "mlp" else {}
    pred = BASELINES[name](**kw).fit(tr).predict(te.cond)
    assert pred.shape == te.tokens.shape
    assert torch.equal(pred[:, ~te.mask], torch.zeros_like(pred[:, ~te.mask]))


def test_mean_adapter_is_the_training_mean(split):
    tr, te = split
    pred = MeanAdapter().fit(tr).predict(te.cond[:3])
    assert torch.equal(pred, tr.tokens.mean(0).expand(3, -1, -1))


def test_nearest_neighbour_finds_a_training_identity_from_its_own_photos(split):
    tr, _ = split
    pred = NearestNeighbour().fit(tr).predict(tr.cond[:5])
    assert torch.equal(pred, tr.tokens[:5])


def test_regression_mlp_beats_mean_on_heldout(split):
    tr, te = split
    mean = tr.tokens.mean(0)
    mlp = RegressionMLP(MLPConfig(steps=300, hidden=64)).fit(tr)
    s = summarize(weight_metrics(mlp.predict(te.cond), te.tokens, te.mask, mean))
    assert s["rel_mse"] < 0.8, s
