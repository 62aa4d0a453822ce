"""Cohorts with a known verdict, made from phantoms, to test a gate's rules (and ours).

``fresh_real_cohort`` renders new phantoms (another seed) with a requested class mix: real data
a good gate must pass. The hard negatives each break one property: ``near_copies`` (flipped,
shifted, noised train cases, for all or part of a cohort), ``mode_collapse`` (one or a few
volumes per class, lightly noised), ``smoothed`` (noise and texture blurred away),
``hu_shift`` (every volume offset by some HU), ``relabelled`` (labels rotated, for all or part
of a cohort), ``single_site`` (every case in one hospital's scanner style), ``sites_shuffled``
(each case claims to be made for another site) and ``one_style_for_all_sites`` (cases claimed
for every site, all in one site's style).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from synthct.config import SynthctConfig
from synthct.data.manifest import ManifestRow, write_manifest
from synthct.data.phantoms import HU_MAX, HU_MIN, render_phantom
from synthct.data.volume_io import read_volume, write_nifti

__all__ = [
    "write_cohort",
    "fresh_real_cohort",
    "near_copies",
    "mode_collapse",
    "smoothed",
    "hu_shift",
    "relabelled",
    "sites_shuffled",
    "one_style_for_all_sites",
]


def write_cohort(
    out: str | Path,
    volumes: Sequence[np.ndarray],
    labels: Sequence[str],
    spacings: Sequence[tuple[float, float, float]],
    *,
    source: str,
    sites: Sequence[str] | None = None,
) -> Path:
    """Write HU volumes (RAS) as a cohort folder with ``manifest.csv``; returns the manifest.
    ``sites``: the site each case is for (default: ``pooled``, for everyone)."""
    out = Path(out)
    rows = []
    sites = list(sites) if sites is not None else ["pooled"] * len(volumes)
    for i, (hu, label, spacing) in enumerate(zip(volumes, labels, spacings, strict=True)):
        rel = f"cases/{label}/{i:04d}.nii.gz"
        write_nifti(out / rel, np.clip(hu, HU_MIN, HU_MAX), spacing)
        rows.append(ManifestRow(rel, label, sites[i], "train", {"source": source}))
    write_manifest(out / "manifest.csv", rows)
    return out / "manifest.csv"


def fresh_real_cohort(
    config: SynthctConfig,
    counts: dict[str, int],
    out: str | Path,
    *,
    seed: int,
    sites: Sequence[str] | None = None,
    claim_sites: Sequence[str] | None = None,
) -> Path:
    """New phantoms of ``counts`` per class, cycling over ``sites`` (default: every site).
    Each case is for the site it was rendered at; ``claim_sites`` instead cycles the claimed
    site over those names (a style mismatch on purpose). A single-site cohort is pooled."""
    names = list(sites) if sites else config.site_names
    volumes, labels, spacings, rendered_at = [], [], [], []
    k = 0
    for label, n in counts.items():
        for _ in range(n):
            site = config.site(names[k % len(names)])
            hu, spacing = render_phantom(
                np.random.default_rng([seed, k, 104729]),
                label,
                site,
                config.data.shape,
                config.data.lesions,
            )
            volumes.append(hu)
            labels.append(label)
            spacings.append(spacing)
            rendered_at.append(site.name)
            k += 1
    tag = "single-site" if sites and len(names) == 1 else "fresh-real"
    if claim_sites:
        claimed = [claim_sites[i % len(claim_sites)] for i in range(len(volumes))]
        tag = "claimed-sites"
    elif len(names) == 1:
        claimed = None  # pooled: one site's style offered to everyone
    else:
        claimed = rendered_at
    return write_cohort(
        out, volumes, labels, spacings, source=f"phantoms:{tag}:{seed}", sites=claimed
    )


def _volumes(paths: Sequence[str | Path]) -> list[tuple[np.ndarray, tuple[float, float, float]]]:
    out = []
    for p in paths:
        v = read_volume(p)
        out.append((v.hu, v.spacing))
    return out


def _copy_transform(hu: np.ndarray, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    """A disguised copy: random axis flips, a shift of 1-3 voxels (edges replicated), noise."""
    for axis in range(3):
        if rng.random() < 0.5:
            hu = np.flip(hu, axis)
    shift = rng.integers(-3, 4, size=3)
    hu = ndimage.shift(hu, shift, order=0, mode="nearest")
    return hu + rng.normal(0, noise_hu, hu.shape)


def near_copies(
    train_paths: Sequence[str | Path],
    train_labels: Sequence[str],
    base: tuple[Sequence[np.ndarray], Sequence[str], Sequence[tuple]],
    out: str | Path,
    *,
    fraction: float,
    seed: int = 0,
    noise_hu: float = 30.0,
) -> Path:
    """Replace ``fraction`` of the ``base`` cohort's cases with disguised train cases."""
    rng = np.random.default_rng(seed)
    volumes, labels, spacings = (list(x) for x in base)
    n_copy = int(round(fraction * len(volumes)))
    picks = rng.choice(len(train_paths), size=n_copy, replace=n_copy > len(train_paths))
    for slot, (pick, (hu, spacing)) in enumerate(
        zip(picks, _volumes([train_paths[i] for i in picks]), strict=True)
    ):
        volumes[slot] = _copy_transform(hu, rng, noise_hu)
        labels[slot] = train_labels[pick]
        spacings[slot] = spacing
    return write_cohort(out, volumes, labels, spacings, source=f"negative:copies:{fraction}")


def mode_collapse(
    base: tuple[Sequence[np.ndarray], Sequence[str], Sequence[tuple]],
    out: str | Path,
    *,
    seed: int = 0,
    noise_hu: float = 10.0,
    distinct: int = 1,
) -> Path:
    """Every case of a class is one of the class's first ``distinct`` cases plus light noise."""
    rng = np.random.default_rng(seed)
    volumes, labels, spacings = (list(x) for x in base)
    originals = [v.copy() for v in volumes]
    seen: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        kept = seen.setdefault(label, [])
        if len(kept) < distinct:  # one of the class's few originals
            kept.append(i)
            j = i
        else:  # a noised repeat of one of them
            j = kept[0] if distinct == 1 else kept[int(rng.integers(distinct))]
        volumes[i] = originals[j] + rng.normal(0, noise_hu, originals[j].shape)
        spacings[i] = spacings[j]
    tag = "mode-collapse" if distinct == 1 else f"mode-collapse:{distinct}"
    return write_cohort(out, volumes, labels, spacings, source=f"negative:{tag}")


def _each_volume(base, out: str | Path, transform, source: str) -> Path:
    """The ``base`` cohort with ``transform`` applied to every volume (labels kept)."""
    volumes, labels, spacings = (list(x) for x in base)
    return write_cohort(out, [transform(v) for v in volumes], labels, spacings, source=source)


def smoothed(
    base: tuple[Sequence[np.ndarray], Sequence[str], Sequence[tuple]],
    out: str | Path,
    *,
    sigma_vox: float,
) -> Path:
    """Every volume blurred by a Gaussian of ``sigma_vox`` voxels: the scanner's noise and
    fine texture gone, as in the samples of an autoencoder trained without a texture loss."""
    return _each_volume(
        base,
        out,
        lambda v: ndimage.gaussian_filter(v, sigma_vox),
        f"negative:smoothed:{sigma_vox}",
    )


def hu_shift(
    base: tuple[Sequence[np.ndarray], Sequence[str], Sequence[tuple]],
    out: str | Path,
    *,
    offset_hu: float,
) -> Path:
    """Every voxel inside the body offset by ``offset_hu`` (air stays air)."""
    return _each_volume(
        base, out, lambda v: np.where(v > -900, v + offset_hu, v), f"negative:hu-shift:{offset_hu}"
    )


def relabelled(
    base: tuple[Sequence[np.ndarray], Sequence[str], Sequence[tuple]],
    out: str | Path,
    *,
    classes: Sequence[str],
    fraction: float = 1.0,
    seed: int = 0,
) -> Path:
    """Labels rotated through the vocabulary: ``fraction`` of the cases (chosen at random)
    claim the next class (label noise)."""
    volumes, labels, spacings = (list(x) for x in base)
    rotate = {c: classes[(i + 1) % len(classes)] for i, c in enumerate(classes)}
    n = int(round(fraction * len(labels)))
    wrong = set(np.random.default_rng(seed).choice(len(labels), size=n, replace=False).tolist())
    noisy = [rotate[x] if i in wrong else x for i, x in enumerate(labels)]
    tag = "relabelled" if n == len(labels) else f"relabelled:{fraction}"
    return write_cohort(out, volumes, noisy, spacings, source=f"negative:{tag}")


def one_style_for_all_sites(
    config: SynthctConfig, counts: dict[str, int], out: str | Path, *, seed: int, style: str
) -> Path:
    """Cases claimed for every configured site, all rendered at site ``style``."""
    return fresh_real_cohort(
        config, counts, out, seed=seed, sites=[style], claim_sites=config.site_names
    )


def sites_shuffled(manifest: str | Path, out: str | Path) -> Path:
    """The same cases, each claimed for the next site in sorted order (every site's cases now
    carry another site's scanner style)."""
    from synthct.data.manifest import read_manifest

    rows = read_manifest(manifest)
    names = sorted({r.site for r in rows})
    rotate = {s: names[(i + 1) % len(names)] for i, s in enumerate(names)}
    volumes = _volumes([r.resolve(Path(manifest).parent) for r in rows])
    return write_cohort(
        out,
        [v for v, _ in volumes],
        [r.label for r in rows],
        [s for _, s in volumes],
        source="negative:sites-shuffled",
        sites=[rotate[r.site] for r in rows],
    )


def load_cohort_volumes(manifest: str | Path) -> tuple[list[np.ndarray], list[str], list[tuple]]:
    """HU volumes, labels and spacings of a cohort written by :func:`write_cohort`."""
    from synthct.data.manifest import read_manifest

    manifest = Path(manifest)
    rows = read_manifest(manifest)
    vols = _volumes([r.resolve(manifest.parent) for r in rows])
    return [v for v, _ in vols], [r.label for r in rows], [s for _, s in vols]
