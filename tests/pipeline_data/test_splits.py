"""The identity split is deterministic, disjoint, and keeps eval identities out of the tiny model's crops."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline_data.splits import EVAL_FRACTION, SPLITS, split_of, split_unit
from tests.utils.faces import FACES, needs_faces


def test_split_is_deterministic_and_one_of_three() -> None:
    names = [("lfw", f"Person_{i}") for i in range(3000)]
    first = [split_of(d, n) for d, n in names]
    assert first == [split_of(d, n) for d, n in names]
    assert set(first) <= set(SPLITS)
    counts = Counter(first)
    assert abs(counts["eval"] / len(names) - EVAL_FRACTION) < 0.02  # ~12 % reserved
    assert counts["train"] > counts["val"] > 0


def test_split_depends_on_dataset_too() -> None:
    assert split_unit("lfw", "7201") != split_unit("celeba", "7201")


@pytest.mark.parametrize("dataset, identity", [("", "x"), ("lfw", ""), ("a/b", "x"), ("lfw", "x/y")])
def test_bad_names_raise(dataset: str, identity: str) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        split_of(dataset, identity)


@needs_faces
def test_tiny_crops_never_list_eval_identities() -> None:
    from pipeline_data.tiny.crops import list_photos

    photos = list_photos(FACES)
    idents = {(d, i) for d, i, _ in photos}
    assert idents and all(split_of(d, i) != "eval" for d, i in idents)
    all_idents = {
        (d.name, i.name)
        for d in FACES.iterdir()
        if d.name in ("lfw", "celeba", "orl")
        for i in d.iterdir()
        if i.is_dir()
    }
    held = {x for x in all_idents if split_of(*x) == "eval"}
    assert held and not held & idents  # some identities are reserved and none of them is trained on
