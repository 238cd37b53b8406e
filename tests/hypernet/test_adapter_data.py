"""A built adapter dataset read as hypernetwork data: tokens round-trip to the stored adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hypernet.adapter_data import load_adapter_dataset
from pipeline_data.build import load_dataset_adapters
from weights.convert import canonicalize_lora


@pytest.mark.parametrize("canonicalize", [False, True])
def test_tokens_round_trip_to_the_dataset_adapters(tiny_dataset: Path, canonicalize: bool) -> None:
    ds = load_adapter_dataset(tiny_dataset, token_dim=32, canonicalize=canonicalize)
    assert ds.layout.canonicalize is canonicalize
    stored = load_dataset_adapters(tiny_dataset)
    assert ds.data.tokens.shape[0] == 3 and ds.data.token_dim == 32
    assert [r["identity"] for r in ds.records] == sorted(stored)
    assert ds.data.cond_dim == 128 and all(
        c.shape[0] == len(r["photos_used"]) for c, r in zip(ds.data.cond, ds.records)
    )
    for i, r in enumerate(ds.records):
        back = ds.adapter(i)
        ref = canonicalize_lora(stored[r["identity"]]) if canonicalize else stored[r["identity"]]
        assert back.tensors.keys() == ref.tensors.keys()
        for k in ref.tensors:
            if canonicalize:
                torch.testing.assert_close(back.tensors[k], ref.tensors[k])
            else:  # raw factors come back bit for bit
                assert torch.equal(back.tensors[k], ref.tensors[k].float())


def test_split_and_gain_filters(tiny_dataset: Path) -> None:
    ds = load_adapter_dataset(tiny_dataset)
    splits = {r["split"] for r in ds.records}
    sub = ds.split(*splits)
    assert len(sub) == 3
    with pytest.raises(ValueError, match="no usable identities"):
        load_adapter_dataset(tiny_dataset, splits=["no-such-split"])


def test_manifest_photo_folders_resolve_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Older datasets store photo folders relative to the build's working directory (data/tiny-lora:
    ``../shared/data/faces/...``); eval and tune read the photos from wherever they are run."""
    import json

    from hypernet.adapter_data import read_manifest

    (tmp_path / "faces" / "ann").mkdir(parents=True)
    ds = tmp_path / "repo" / "data" / "ds"
    ds.mkdir(parents=True)
    recs = [{"status": "ok", "source": "../faces/ann"}, {"status": "ok", "source": str(tmp_path / "abs")}]
    (ds / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    elsewhere = tmp_path / "x" / "y"  # where ../faces/ann does not exist
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    got = [r["source"] for r in read_manifest(ds)]
    assert got == [str(tmp_path / "faces" / "ann"), str(tmp_path / "abs")]
