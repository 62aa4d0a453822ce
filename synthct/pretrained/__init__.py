"""The shipped phantom generator: trained federatedly by synthct itself on the demo sites.

``phantom/generator`` is a sampling-only generator checkpoint (autoencoder + EMA UNet,
safetensors, hash-checked), ``phantom/reference`` the real-only reference classifier/encoder,
``phantom/TRAINING.md`` the exact command and scores (its training logs stay in the repository,
``bench/results/shipped_generator_training``). Nothing is downloaded at run time: the files are
package data.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch

from synthct.checkpoint import CheckpointError, Generator, load_generator
from synthct.reference import ReferenceModel, load_reference

__all__ = [
    "phantom_dir",
    "generator_folder",
    "load_phantom_generator",
    "load_phantom_reference",
    "shipped_reference_for",
]


def phantom_dir() -> Path:
    """Folder of the shipped phantom generator and its reference models."""
    return Path(str(files("synthct.pretrained") / "phantom"))


def generator_folder(run: str) -> Path:
    """``RUN`` (its ``generator/``), a generator folder itself, or ``pretrained`` (the shipped
    phantom generator): what ``--generator`` and a SuperNode's ``generator`` name."""
    if run == "pretrained":
        return phantom_dir() / "generator"
    path = Path(run)
    return (
        path
        if (path / "config.json").is_file() and not (path / "generator").is_dir()
        else path / "generator"
    )


def load_phantom_generator(device: torch.device | str = "cpu") -> Generator:
    """The shipped generator (hash-checked); a clear error if this install lacks it."""
    path = phantom_dir() / "generator"
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: the pretrained phantom generator is not part of this install; "
            "train one with `synthct train` or use `synthct demo --from-scratch`"
        )
    return load_generator(path, device)


def load_phantom_reference(vocabulary_hash: str | None = None) -> ReferenceModel:
    """The shipped real-only reference classifier/encoder of the demo phantoms (train split of
    the demo sites at seed 0; holdout accuracy in its ``reference.json``)."""
    path = phantom_dir() / "reference"
    if not (path / "reference.json").is_file():
        raise CheckpointError(f"{path}: the phantom reference models are not part of this install")
    return load_reference(path, vocabulary_hash=vocabulary_hash)


def shipped_reference_for(manifest: str | Path) -> Path | None:
    """The shipped reference folder if it was trained on exactly this manifest (same bytes:
    the demo's phantom sites at the shipped seed), so the demo need not retrain it."""
    from synthct.artifacts import read_json, sha256_file

    path = phantom_dir() / "reference"
    record = path / "trained_on.json"
    if not record.is_file() or not Path(manifest).is_file():
        return None
    return path if read_json(record).get("manifest_sha256") == sha256_file(manifest) else None
