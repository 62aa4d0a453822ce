"""Per-volume features the cohort metrics compare: hand-crafted radiomics-style features and
tissue HU medians (for MAISI-style HU sanity), plus the frozen reference encoder's features.

Tissues come from thresholds on HU: the body is everything denser than -400 HU with its
holes (the lungs) filled; lung is body air below -400 HU; bone is body above 250 HU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.feature import graycomatrix, graycoprops

from synthct.data.preprocess import model_to_hu
from synthct.reference import ReferenceModel

__all__ = [
    "TISSUES",
    "RADIOMICS_NAMES",
    "FeatureSet",
    "tissue_masks",
    "tissue_medians",
    "radiomics_features",
    "extract_features",
]

TISSUES = ("body", "lung", "bone")
_WINDOWS = {"lung": (-1000.0, -400.0), "soft": (-200.0, 250.0), "bone": (250.0, 1500.0)}
_GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
RADIOMICS_NAMES = (
    [f"{w}_{s}" for w in _WINDOWS for s in ("fraction", "mean", "std")]
    + ["lung_volume_fraction", "body_p10", "body_p50", "body_p90"]
    + [f"glcm_{p}" for p in _GLCM_PROPS]
)


def tissue_masks(hu: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean body / lung / bone / soft-tissue masks of one X×Y×Z HU volume."""
    dense = hu > -400
    body = ndimage.binary_fill_holes(dense)
    for axis in range(3):  # lungs that touch a face of the volume are filled slice by slice
        body |= np.stack(
            [ndimage.binary_fill_holes(s) for s in np.moveaxis(dense, axis, 0)], axis=axis
        )
    lung = body & ~dense
    bone = body & (hu > 250)
    soft = body & dense & ~bone
    return {"body": body, "lung": lung, "bone": bone, "soft": soft}


def tissue_medians(hu_volumes: torch.Tensor) -> np.ndarray:
    """N×3 median HU of soft body tissue, lung and bone (NaN where a tissue is absent)."""
    out = np.full((len(hu_volumes), len(TISSUES)), np.nan)
    for i, vol in enumerate(hu_volumes):
        hu = vol[0].numpy()
        masks = tissue_masks(hu)
        for j, name in enumerate(("soft", "lung", "bone")):
            if masks[name].sum() >= 5:
                out[i, j] = float(np.median(hu[masks[name]]))
    return out


def _glcm(hu: np.ndarray) -> list[float]:
    """Texture of three axial slices in the lung-to-soft-tissue window, 32 grey levels."""
    z = hu.shape[2]
    levels = 32
    values = []
    for k in (int(z * 0.4), z // 2, int(z * 0.6)):
        s = np.clip((hu[:, :, k] + 1000.0) / 1250.0, 0, 1)
        q = np.minimum((s * levels).astype(np.uint8), levels - 1)
        m = graycomatrix(q, [1], [0, np.pi / 2], levels=levels, symmetric=True, normed=True)
        values.append([float(graycoprops(m, p).mean()) for p in _GLCM_PROPS])
    return list(np.mean(values, axis=0))


def radiomics_features(hu_volumes: torch.Tensor) -> np.ndarray:
    """N×F hand-crafted features (see ``RADIOMICS_NAMES``) of N×1×X×Y×Z HU volumes."""
    rows = []
    for vol in hu_volumes:
        hu = vol[0].numpy().astype(np.float64)
        masks = tissue_masks(hu)
        body_hu = hu[masks["body"]] if masks["body"].any() else hu.ravel()
        feats = []
        for lo, hi in _WINDOWS.values():
            inside = body_hu[(body_hu >= lo) & (body_hu < hi)]
            frac = inside.size / max(body_hu.size, 1)
            # an empty window reports the edge nearest the body's median HU, where the last
            # voxels leave it as the tissue fades (continuous; the window centre made one
            # bone-free volume dominate a cubic-kernel KID)
            if inside.size:
                mean = float(inside.mean())
            else:
                mean = float(np.clip(np.median(body_hu), lo, hi))
            std = float(inside.std()) if inside.size > 1 else 0.0
            feats += [frac, mean, std]
        feats.append(masks["lung"].sum() / max(masks["body"].sum(), 1))
        feats += list(np.percentile(body_hu, [10, 50, 90]))
        feats += _glcm(hu)
        rows.append(feats)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(RADIOMICS_NAMES))


@dataclass
class FeatureSet:
    """Everything the metrics need about one set of volumes."""

    encoder: np.ndarray  # N×D reference-encoder features
    radiomics: np.ndarray  # N×F
    medians: np.ndarray  # N×3 tissue medians (soft, lung, bone)
    images: torch.Tensor  # N×1×X×Y×Z model space, for image-space privacy and diversity
    labels: np.ndarray  # N class indices
    sites: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> FeatureSet:
        idx = np.asarray(index, dtype=np.int64)
        return FeatureSet(
            self.encoder[idx],
            self.radiomics[idx],
            self.medians[idx],
            self.images[torch.as_tensor(idx)],
            self.labels[idx],
            [self.sites[i] for i in idx],
        )

    @staticmethod
    def concat(parts: list[FeatureSet]) -> FeatureSet:
        return FeatureSet(
            np.concatenate([p.encoder for p in parts]),
            np.concatenate([p.radiomics for p in parts]),
            np.concatenate([p.medians for p in parts]),
            torch.cat([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            [s for p in parts for s in p.sites],
        )

    def space(self, name: str) -> np.ndarray:
        return {"encoder": self.encoder, "radiomics": self.radiomics}[name]


def extract_features(
    images: torch.Tensor,
    labels: torch.Tensor,
    sites: list[str],
    reference: ReferenceModel,
    hu_window: tuple[float, float],
) -> FeatureSet:
    """Features of model-space images (N×1×X×Y×Z in [-1, 1])."""
    hu = model_to_hu(images, hu_window)
    return FeatureSet(
        encoder=reference.features(images).double().numpy(),
        radiomics=radiomics_features(hu),
        medians=tissue_medians(hu),
        images=images,
        labels=labels.numpy().astype(np.int64),
        sites=list(sites),
    )
