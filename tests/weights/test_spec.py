"""AdapterSpec serialisation: to_dict is what dataclasses.asdict gave (hashes of committed files stay valid)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from weights.spec import AdapterSpec, LayerInfo
from weights.tokens import TokenLayout

REPO = Path(__file__).resolve().parents[2]

SPECS = [
    AdapterSpec(),
    AdapterSpec(
        method="snell",
        rank=8,
        alpha=4.0,
        params={"sparsity": 0.5, "nested": {"a": [1, 2]}},
        targets=["to_q", "re:.*conv.*"],
        layers=[LayerInfo("a.to_q", (8, 4)), LayerInfo("b.conv", (8, 4, 3, 3), "conv")],
        base_model="tiny",
    ),
]


def _asdict_reference(spec: AdapterSpec) -> dict:
    d = asdict(spec)
    d["layers"] = [{"name": lay.name, "shape": list(lay.shape), "kind": lay.kind} for lay in spec.layers]
    return d


@pytest.mark.parametrize("spec", SPECS, ids=["default", "every-field"])
def test_to_dict_matches_asdict_in_content_and_order(spec):
    d = spec.to_dict()
    ref = _asdict_reference(spec)
    assert d == ref and list(d) == list(ref)
    assert json.dumps(d) == json.dumps(ref)
    assert AdapterSpec.from_dict(d) == spec


def test_to_dict_is_a_deep_copy():
    spec = SPECS[1]
    d = spec.to_dict()
    d["params"]["nested"]["a"].append(3)
    d["targets"].append("to_v")
    assert spec.params["nested"]["a"] == [1, 2] and spec.targets == ["to_q", "re:.*conv.*"]


def test_committed_hypernet_spec_hash_is_stable():
    """The shipped tiny hypernet's token layout records the spec hash it was built with."""
    meta = json.loads((REPO / "assets" / "tiny" / "hypernet" / "adapter_layout.json").read_text())
    spec, layout = AdapterSpec.from_dict(meta["spec"]), TokenLayout.from_dict(meta["layout"])
    assert len(spec.layers) > 100 and spec.hash() == layout.spec_hash
