"""Read a codes dataset (``difflora data build --method basis --basis DIR``) as hypernetwork training data.

Each ok record of ``manifest.jsonl`` gives one row: its fitted code (``codes/<id>.safetensors``, tensor ``code``
(K,)) as code tokens (:mod:`hypernet.code_autoencoder`) and its training photos' face embeddings as condition
tokens; the exported LoRA (``adapters/<id>.safetensors``) is the oracle for evaluation. The identity basis is the
file the dataset's ``config.json`` names (``basis``: a ``data basis`` folder or its ``basis.safetensors``), found
as given, relative to the current directory or to the dataset folder; every record's ``basis`` fingerprint must be
that file's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from weights.adapter import Adapter
from weights.basis import IdentityBasis, basis_to_lora, load_basis

from .adapter_data import read_recipe, split_rows, usable_records
from .code_autoencoder import code_mask, code_token_shape, codes_to_tokens, tokens_to_codes
from .data import HypernetDataset

BASIS_METHOD = "basis"  # the method name of a codes dataset's build config (pipeline_data.recipe)
BASIS_FILE = "basis.safetensors"  # a ``data basis`` folder's basis file


@dataclass
class CodeDataset:
    """Code tokens + conditions of a codes dataset, with the basis that turns codes into adapters."""

    data: HypernetDataset  # rows in ``records`` order; tokens (N, T, D) are the codes cut into tokens
    records: list[dict]  # the manifest records of the rows
    codes: torch.Tensor  # (N, K) the fitted codes (the oracles)
    basis: IdentityBasis  # the frozen basis the codes live in
    basis_path: Path  # its file
    recipe: dict  # the build's config.json
    face_backend: str  # backend of the condition embeddings

    def split(self, *names: str) -> HypernetDataset:
        return self.data.subset(split_rows(self.records, names))

    def adapter(self, row: int, tokens: torch.Tensor | None = None) -> Adapter:
        """Row ``row``'s oracle (its fitted code's LoRA), or the LoRA of code ``tokens`` (T, D) (a baseline's)."""
        code = self.codes[row] if tokens is None else tokens_to_codes(tokens[None], self.basis.num_directions)[0]
        return basis_to_lora(self.basis, code)


def is_code_dataset(directory: str | Path) -> bool:
    """Whether ``directory`` is a codes dataset (its build config's method is ``basis``)."""
    return read_recipe(directory).get("method") == BASIS_METHOD


def resolve_basis(name: str | Path, dataset_dir: str | Path) -> Path:
    """The basis file a dataset names: as given, else relative to the dataset folder (a folder -> its basis file)."""
    p = Path(name).expanduser()
    for cand in [p] if p.is_absolute() else [p, Path(dataset_dir) / p]:
        f = cand / BASIS_FILE if cand.is_dir() else cand
        if f.is_file():
            return f
    raise FileNotFoundError(f"the identity basis {str(name)!r} of dataset {str(dataset_dir)!r} was not found")


def load_code_dataset(
    directory: str | Path,
    *,
    splits: Sequence[str] | None = None,
    basis: str | Path | None = None,
    min_gain: float | None = None,
) -> CodeDataset:
    """Load every ok identity of a codes dataset (optionally only ``splits``; optionally dropping identities whose
    identity-check gain is below ``min_gain``); ``basis`` overrides the basis file the dataset names. A ValueError
    when a record's code was fitted in another basis."""
    from pipeline_data.build import load_dataset_codes

    d = Path(directory)
    recipe = read_recipe(d)
    if recipe.get("method") != BASIS_METHOD:
        raise ValueError(f"{d} is not a codes dataset (its config.json method is {recipe.get('method')!r}, not basis)")
    recs = usable_records(d, splits, min_gain)
    missing = [r["identity"] for r in recs if "code" not in r]
    if missing:
        raise ValueError(f"{d}: records without a fitted code: {missing[:5]}")
    path = resolve_basis(basis if basis is not None else recipe.get("basis", ""), d)
    b = load_basis(path)
    fp = b.fingerprint()
    other = [r["identity"] for r in recs if r.get("basis", fp) != fp]
    if other:
        raise ValueError(f"{d}: codes fitted in another basis than {path}: {other[:5]}")
    by_id = load_dataset_codes(d, [r["identity"] for r in recs])
    codes = torch.stack([by_id[r["identity"]].float().reshape(-1) for r in recs])  # (N, K)
    k = b.num_directions
    if codes.shape[1] != k:
        raise ValueError(f"{d}: codes have {codes.shape[1]} values, the basis {path} has K = {k}")
    T, D = code_token_shape(k)
    cond = [torch.tensor(r["embeddings"], dtype=torch.float32) for r in recs]  # (P_i, E) each
    data = HypernetDataset.from_tensors(
        codes_to_tokens(codes, T, D), cond, names=[r["identity"] for r in recs], mask=code_mask(k, T, D),
        layer_ids=torch.zeros(T, dtype=torch.long),
    )  # fmt: skip
    return CodeDataset(data, recs, codes, b, path, recipe, recipe.get("face_backend", "dlib"))
