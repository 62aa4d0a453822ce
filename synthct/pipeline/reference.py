"""The reference stage: the frozen real-only classifier/encoder the gate and the quality checks
judge with, trained on the sites' real ``train`` cases and saved.

Centrally it trains on the pooled ``train`` split (stopping on ``holdout``); federatedly each
site trains on its own rows through Flower (FedAvg) and only weights leave it. The command line
(``synthct reference``) and the demo both make their reference model here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from synthct.config import SynthctConfig
from synthct.reference import ReferenceModel, save_reference

__all__ = ["build_reference", "reference_for_sites"]

logger = logging.getLogger(__name__)


def build_reference(
    config: SynthctConfig,
    manifest: str | Path,
    out: str | Path,
    *,
    federated: bool,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[..., None] | None = None,
) -> ReferenceModel:
    """Train the reference model on ``manifest``'s ``train`` cases and save it in ``out``.
    ``federated``: FedAvg in Flower's simulation (its run files in ``out/federated``), each
    site reading only its own rows; otherwise pooled, on ``device``, with ``progress``."""
    manifest, out = Path(manifest), Path(out)
    if federated:
        from synthct.fed.reference_app import train_reference_federated

        model = train_reference_federated(config, manifest, out / "federated", seed=seed)
    else:
        from synthct.data.dataset import load_cases
        from synthct.reference import train_reference_for

        model = train_reference_for(
            config,
            load_cases(manifest, config, splits=("train",)),
            load_cases(manifest, config, splits=("holdout",)),
            seed=seed,
            progress=progress,
            device=device,
        )
    save_reference(model, out)
    return model


def reference_for_sites(
    config: SynthctConfig, manifest: str | Path, out: str | Path, *, seed: int = 0
) -> ReferenceModel:
    """The reference model in ``out`` for ``manifest``'s sites: kept if already there, the
    shipped one when these are the very phantoms it was trained on, otherwise trained
    federatedly (FedAvg through Flower), as sites that cannot pool their data would."""
    import shutil

    from synthct.pretrained import shipped_reference_for
    from synthct.reference import load_reference

    manifest, out = Path(manifest), Path(out)
    shipped = shipped_reference_for(manifest)
    if shipped is not None and not (out / "reference.json").is_file():
        shutil.copytree(shipped, out, dirs_exist_ok=True)
        logger.info("reference models: the shipped ones (trained on this manifest)")
    if not (out / "reference.json").is_file():
        logger.info(
            "reference models: FedAvg, %d rounds x %d local epochs",
            config.federated.reference_rounds,
            config.federated.local_epochs_reference,
        )
        return build_reference(config, manifest, out, federated=True, seed=seed)
    return load_reference(out, vocabulary_hash=config.labels.vocabulary_hash)
