"""Load a manifest's volumes into model-ready tensors (one split, optionally one site).

A site's client calls this with ``sites=[its own name]``: rows of other sites are dropped
*before* any file is opened, so a client never reads another site's files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from synthct.config import SynthctConfig
from synthct.data.manifest import ManifestError, read_manifest
from synthct.data.preprocess import prepare_volume
from synthct.data.volume_io import VolumeError, read_volume

__all__ = ["CaseSet", "load_cases", "coarser_than_config", "geometry_note", "COARSER_FACTOR"]

logger = logging.getLogger(__name__)

COARSER_FACTOR = 1.5  # source voxels this much larger than the config's: upsampling, not CT


def coarser_than_config(spacing: Iterable[float], config: SynthctConfig) -> bool:
    """Whether a volume's voxel spacing is coarser than the config's by more than
    ``COARSER_FACTOR`` on some axis (axes compared sorted, so orientation does not matter):
    such data is upsampled to the model grid, a sign it was made for another config (smoke
    phantoms under the demo config) or that the config asks for detail the scans lack."""
    have, want = sorted(float(s) for s in spacing), sorted(config.data.spacing_mm)
    return any(h > COARSER_FACTOR * w for h, w in zip(have, want, strict=True))


def geometry_note(where: str | Path, coarse: list[tuple[str, tuple]], total: int, config) -> str:
    """One line saying how many of ``total`` volumes are coarser than the config's grid."""
    path, spacing = coarse[0]
    mm = "x".join(f"{s:g}" for s in spacing)
    want = "x".join(f"{s:g}" for s in config.data.spacing_mm)
    return (
        f"{where}: {len(coarse)} of {total} volumes have coarser voxels than the config's "
        f"{want} mm (e.g. {Path(path).name}: {mm} mm); they are upsampled to the model grid: "
        "check that the config fits this data"
    )


@dataclass
class CaseSet:
    """Volumes of one selection of a manifest.

    Attributes:
        images: N×1×X×Y×Z float32 in [-1, 1].
        labels: N int64 vocabulary indices.
        sites: N site names.
        paths: N resolved file paths.
    """

    images: torch.Tensor
    labels: torch.Tensor
    sites: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | list[int]) -> CaseSet:
        idx = torch.as_tensor(index, dtype=torch.long)
        return CaseSet(
            self.images[idx],
            self.labels[idx],
            [self.sites[i] for i in idx.tolist()],
            [self.paths[i] for i in idx.tolist()],
        )

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.labels, minlength=num_classes).tolist()


def load_cases(
    manifest: str | Path,
    config: SynthctConfig,
    *,
    splits: Iterable[str] = ("train",),
    sites: Iterable[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CaseSet:
    """Read, preprocess and stack the rows of ``manifest`` in ``splits`` (and ``sites``).

    Raises:
        ManifestError: bad manifest, unknown label, or a volume that fails to load (the
            message names the file and the problem).
    """
    manifest = Path(manifest)
    wanted_splits = set(splits)
    wanted_sites = None if sites is None else set(sites)
    rows = [
        r
        for r in read_manifest(manifest)
        if r.split in wanted_splits and (wanted_sites is None or r.site in wanted_sites)
    ]
    images, labels, site_names, paths = [], [], [], []
    coarse: list[tuple[str, tuple]] = []
    for i, row in enumerate(rows):
        try:
            label = config.labels.index(config.resolve_label(row.site, row.label))
        except KeyError as exc:
            raise ManifestError(f"{manifest}: {exc.args[0]}") from None
        path = row.resolve(manifest.parent)
        try:
            prepared = prepare_volume(read_volume(path), config.data)
        except VolumeError as exc:
            raise ManifestError(f"{manifest}: cannot load case: {exc}") from None
        if coarser_than_config(prepared.original_spacing, config):
            coarse.append((str(path), prepared.original_spacing))
        images.append(prepared.image)
        labels.append(label)
        site_names.append(row.site)
        paths.append(str(path))
        if progress is not None:
            progress(i + 1, len(rows))
    if coarse:
        logger.warning(geometry_note(manifest, coarse, len(rows), config))
    if not rows:
        shape = (0, 1, *config.data.shape)
        return CaseSet(torch.zeros(shape), torch.zeros(0, dtype=torch.long), [], [])
    logger.info(
        "loaded %d cases (%s) from %s", len(rows), ",".join(sorted(wanted_splits)), manifest
    )
    return CaseSet(torch.stack(images), torch.tensor(labels, dtype=torch.long), site_names, paths)
