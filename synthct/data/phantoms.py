"""Procedural multi-site chest-CT phantoms: the embedded default data.

Anatomy is defined in millimetres (RAS world: +x patient left, +y anterior, +z superior) and
rendered on each site's own scanner grid: matrix ``data.shape``, in-plane spacing
``fov_mm / matrix``, slice spacing ``slice_mm``. Rendering supersamples 2x per axis (partial
volume), blurs with the site's reconstruction kernel, adds correlated noise and a HU offset, and
clips to the scanner range [-1024, 3071]. The loader later resamples every site to the model
grid exactly as it does real scans, so phantoms and real data share one path.

Classes: ``normal``; ``nodule`` (solid round lesion in a lung); ``ground_glass`` (hazy patch,
-700..-300 HU); ``consolidation`` (dense lung region conforming to the lung, the rare class).
Lesion sizes are fixed in mm so that at the default 32^3 grid (11 mm voxels) a nodule is >= 6
voxels across and a ground-glass patch larger still; they survive 4x latent compression.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from synthct.config import LesionProfile, SiteProfile, SynthctConfig

__all__ = [
    "HU_MIN",
    "HU_MAX",
    "PhantomCase",
    "site_geometry",
    "render_phantom",
    "plan_site_cases",
    "assign_splits",
]

logger = logging.getLogger(__name__)

HU_MIN, HU_MAX = -1024.0, 3071.0
_SUPERSAMPLE = 2
# Cases rendered at once by write_phantom_sites (128^3: ~6 s and 8 MB each on one core).
_RENDER_THREADS = 8

# Tissue values in HU (before site offset / noise).
_AIR, _FAT, _SOFT, _BLOOD, _LUNG = -1000.0, -100.0, 40.0, 45.0, -860.0
_BONE_CORTEX, _BONE_CANCELLOUS, _RIB = 750.0, 280.0, 550.0


@dataclass(frozen=True)
class PhantomCase:
    """One planned case: who, what, which split; rendering is deterministic from ``seed``."""

    case_id: str
    site: str
    label: str
    split: str
    seed: tuple[int, ...]


def site_geometry(site: SiteProfile, shape: tuple[int, int, int]) -> tuple[float, float, float]:
    """Voxel spacing (x, y, z) in mm of a site's native scanner grid."""
    return (site.fov_mm / shape[0], site.fov_mm / shape[1], float(site.slice_mm))


def _ellipsoid(x, y, z, centre, semi) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipsoid."""
    return (
        ((x - centre[0]) / semi[0]) ** 2
        + ((y - centre[1]) / semi[1]) ** 2
        + ((z - centre[2]) / semi[2]) ** 2
    )


def _vessel_tree(rng: np.random.Generator, hilum: np.ndarray, side: float) -> np.ndarray:
    """Points (N, 4: x, y, z, weight) along random branching paths leaving a hilum."""
    points = []
    stack = []
    for _ in range(7):
        direction = np.array([side * 0.8, rng.uniform(-0.8, 0.8), rng.uniform(-1.0, 1.0)])
        stack.append((hilum.copy(), direction / np.linalg.norm(direction), 1.0, 0))
    while stack:
        pos, direction, weight, depth = stack.pop()
        for _ in range(rng.integers(5, 9)):
            direction = direction + rng.normal(0, 0.25, 3)
            direction /= np.linalg.norm(direction)
            pos = pos + direction * 7.0
            points.append((*pos, weight))
            if depth < 2 and rng.random() < 0.18:
                stack.append(
                    (pos.copy(), direction + rng.normal(0, 0.6, 3), weight * 0.7, depth + 1)
                )
            weight *= 0.9
    return np.asarray(points, dtype=np.float64)


def _splat(points: np.ndarray, axes: tuple[np.ndarray, ...], sigma_vox: float) -> np.ndarray:
    """Add weighted points into a grid (nearest voxel) and smooth them into tubes."""
    grid = np.zeros(tuple(len(a) for a in axes), dtype=np.float32)
    idx = []
    for d, axis in enumerate(axes):
        step = axis[1] - axis[0]
        i = np.round((points[:, d] - axis[0]) / step).astype(int)
        idx.append(i)
    idx = np.stack(idx, 1)
    ok = np.all((idx >= 0) & (idx < np.array(grid.shape)), axis=1)
    np.add.at(grid, tuple(idx[ok].T), points[ok, 3].astype(np.float32))
    return ndimage.gaussian_filter(grid, sigma_vox, mode="constant")


def render_phantom(
    rng: np.random.Generator,
    label: str,
    site: SiteProfile,
    shape: tuple[int, int, int],
    lesions: LesionProfile | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Render one chest CT in HU on the site's native grid.

    Args:
        rng: source of all randomness for this case.
        label: vocabulary class (``normal``, ``nodule``, ``ground_glass``, ``consolidation``).
        site: scanner profile (noise, offset, blur, slice thickness, field of view).
        shape: matrix (x, y, z).
        lesions: lesion size and contrast ranges (default: the original, easy phantoms).

    Returns:
        ``(hu, spacing)``: float32 array X×Y×Z in RAS voxel order, spacing in mm.
    """
    if label not in ("normal", "nodule", "ground_glass", "consolidation"):
        raise ValueError(f"phantoms know no class {label!r}")
    les = lesions or LesionProfile()
    spacing = site_geometry(site, shape)
    ss = _SUPERSAMPLE
    axes = tuple(
        ((np.arange(n * ss) + 0.5) / ss - n / 2) * sp for n, sp in zip(shape, spacing, strict=True)
    )
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)

    # --- patient: size, position, body outline tapering towards the neck ------------------
    ax, ay = rng.uniform(132, 165), rng.uniform(95, 118)
    cx, cy, cz = rng.uniform(-10, 10), rng.uniform(-8, 8), rng.uniform(-15, 15)
    taper = 1.0 - 0.10 * np.clip((z - cz) / 160.0, 0, None) ** 2
    r_body = ((x - cx) / (ax * taper)) ** 2 + ((y - cy) / (ay * taper)) ** 2
    fat = rng.uniform(8, 20)
    r_inner = ((x - cx) / (ax * taper - fat)) ** 2 + ((y - cy) / (ay * taper - fat)) ** 2
    hu = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), _AIR, dtype=np.float32)
    hu[np.broadcast_to(r_body < 1, hu.shape)] = _FAT
    hu[np.broadcast_to(r_inner < 1, hu.shape)] = _SOFT

    # --- ribs: an interrupted bony ring just inside the fat rim -----------------------------
    r_rib_out = ((x - cx) / (ax * taper - fat - 2)) ** 2 + ((y - cy) / (ay * taper - fat - 2)) ** 2
    r_rib_in = ((x - cx) / (ax * taper - fat - 11)) ** 2 + ((y - cy) / (ay * taper - fat - 11)) ** 2
    rib_phase = rng.uniform(0, 2 * np.pi)
    ribs = (r_rib_out < 1) & (r_rib_in >= 1) & (np.sin(2 * np.pi * z / 28.0 + rib_phase) > 0.35)
    hu[ribs] = _RIB

    # --- lungs: two ellipsoids with a domed diaphragm, parenchyma with gravity gradient -----
    lungs = []
    for side in (-1.0, 1.0):  # -x is patient right
        centre = np.array([cx + side * 0.5 * ax, cy + 0.02 * ay, cz + 5 + rng.uniform(-8, 8)])
        semi = np.array(
            [
                0.36 * ax * rng.uniform(0.92, 1.05),
                0.66 * ay * rng.uniform(0.92, 1.05),
                rng.uniform(95, 120),
            ]
        )
        if side > 0:  # the heart takes room on the left
            semi[0] *= 0.9
        dome = centre[2] - 0.72 * semi[2] + 0.006 * ((x - centre[0]) ** 2 + (y - centre[1]) ** 2)
        mask = (_ellipsoid(x, y, z, centre, semi) < 1) & (z > dome)
        lungs.append((side, centre, semi, mask))
    lung_any = lungs[0][3] | lungs[1][3]
    gradient = 35.0 * np.clip(-(y - cy) / ay, -1, 1)  # dependent (posterior) lung is denser
    texture = ndimage.gaussian_filter(rng.normal(0, 1, hu.shape).astype(np.float32), 2.0) * 60
    lung_hu = (_LUNG + gradient + texture).astype(np.float32)

    # vessels: branching trees from each hilum, denser near the hilum
    vessels = np.zeros(hu.shape, dtype=np.float32)
    fine_step = spacing[0] / ss
    for side, centre, semi, _ in lungs:
        hilum = np.array([centre[0] - side * 0.55 * semi[0], centre[1], centre[2] - 0.1 * semi[2]])
        pts = _vessel_tree(rng, hilum, side)
        vessels += _splat(pts, axes, sigma_vox=max(3.0 / fine_step, 0.6))
    if vessels.max() > 0:
        vessels *= 2.2 / np.percentile(vessels[vessels > 0], 99)
    lung_hu = lung_hu + np.clip(vessels, 0, 1) * (_BLOOD - _LUNG)

    # --- lesions -------------------------------------------------------------------------
    side_idx = int(rng.integers(0, 2))
    _, lc, ls, lmask = lungs[side_idx]
    if label == "nodule":
        radius = rng.uniform(*les.nodule_radius_mm)
        offset = np.array(
            [rng.uniform(-1, 1) * max(ls[i] - 0.8 * radius, 0) * 0.6 for i in range(3)]
        )
        centre = lc + offset
        wobble = 1.0 + 0.08 * np.sin(3 * np.arctan2(y - centre[1], x - centre[0]))
        inside = _ellipsoid(x, y, z, centre, (radius * wobble,) * 3) < 1
        lung_hu = np.where(inside & lmask, rng.uniform(*les.nodule_hu), lung_hu)
    elif label == "ground_glass":
        radius = rng.uniform(*les.ground_glass_radius_mm)
        offset = np.array([rng.uniform(-1, 1) * ls[i] * 0.35 for i in range(3)])
        d2 = _ellipsoid(x, y, z, lc + offset, (radius,) * 3)
        weight = np.exp(-(d2**2)).astype(np.float32) * lmask
        target = rng.uniform(*les.ground_glass_hu) + texture * 0.8
        lung_hu = lung_hu * (1 - weight) + target * weight
    elif label == "consolidation":
        # dependent region of one lung: posterior-inferior half-space intersected with the lung
        t = rng.uniform(*les.consolidation_cut)
        u = -(y - lc[1]) / ls[1] * rng.uniform(0.5, 0.8) - (z - lc[2]) / ls[2] * rng.uniform(
            0.6, 0.9
        )
        region = (u > t) & lmask
        bronchi = np.clip(vessels, 0, 1) > 0.55  # air bronchograms along the vessel tree
        dense = np.where(bronchi, -650.0, rng.uniform(25, 50)).astype(np.float32)
        lung_hu = np.where(region, dense + texture * 0.3, lung_hu)
    hu = np.where(lung_any, lung_hu, hu)

    # --- mediastinum: heart, aorta; spine and sternum ------------------------------------
    heart_c = (cx + rng.uniform(8, 25), cy + 0.22 * ay, cz - 25 + rng.uniform(-10, 10))
    heart_s = (rng.uniform(48, 60), rng.uniform(42, 52), rng.uniform(55, 68))
    hu[np.broadcast_to(_ellipsoid(x, y, z, heart_c, heart_s) < 1, hu.shape)] = _SOFT
    aorta = (((x - cx - 22) ** 2 + (y - cy + 0.45 * ay) ** 2) < 12.0**2) & (z > cz - 90)
    hu[np.broadcast_to(aorta, hu.shape)] = _BLOOD
    spine_c = (cx, cy - ay + 40)
    r_spine = np.sqrt((x - spine_c[0]) ** 2 + (y - spine_c[1]) ** 2)
    disc = np.abs(((z - rng.uniform(0, 28)) % 28.0) - 14.0) > 11.0
    body = np.broadcast_to(r_spine < 17, hu.shape)
    hu[body] = _BONE_CANCELLOUS
    hu[np.broadcast_to((r_spine < 17) & (r_spine > 13.5), hu.shape)] = _BONE_CORTEX
    hu[body & np.broadcast_to(disc, hu.shape)] = 80.0
    process = (np.abs(x - spine_c[0]) < 5) & (y < spine_c[1] - 14) & (y > spine_c[1] - 40)
    hu[np.broadcast_to(process & (r_body < 1), hu.shape)] = _BONE_CORTEX * 0.8
    sternum = (np.abs(x - cx) < 14) & (np.abs(y - (cy + ay - fat - 8)) < 5) & (z < cz + 120)
    hu[np.broadcast_to(sternum, hu.shape)] = _BONE_CANCELLOUS + 100

    # --- scanner: reconstruction blur, partial volume, correlated noise, offset, range ----
    if site.blur_mm > 0:
        sigma = [site.blur_mm / (sp / ss) for sp in spacing[:2]] + [0.25 * ss]
        hu = ndimage.gaussian_filter(hu, sigma)
    hu = hu.reshape(shape[0], ss, shape[1], ss, shape[2], ss).mean(axis=(1, 3, 5))
    noise = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), (0.6, 0.6, 0.0))
    noise *= site.noise_hu / max(float(noise.std()), 1e-6)
    hu = hu + noise + site.hu_offset
    return np.clip(hu, HU_MIN, HU_MAX).astype(np.float32), spacing


# Seed offset of the balanced test cases: far from any site's case count, so their seeds never
# coincide with a train/holdout case's.
_TEST_SEED_OFFSET = 1_000_000


def plan_site_cases(config: SynthctConfig, seed: int) -> list[PhantomCase]:
    """Every phantom case of every site with its split; same seed, same plan.

    With ``data.test_per_class`` each site also gets that many ``test`` cases of every class
    (its own seeds, so train/holdout cases are the same whatever the test size).
    """
    cases: list[PhantomCase] = []
    for site_index, site in enumerate(config.data.sites):
        labels = [name for name in config.labels.classes for _ in range(site.counts.get(name, 0))]
        rng = np.random.default_rng([seed, site_index, 7919])
        order = rng.permutation(len(labels))
        labels = [labels[i] for i in order]
        splits = assign_splits(labels, config.data.splits, rng)
        for k, (label, split) in enumerate(zip(labels, splits, strict=True)):
            cases.append(
                PhantomCase(
                    case_id=f"{site.name}_{k:04d}",
                    site=site.name,
                    label=label,
                    split=split,
                    seed=(seed, site_index, k),
                )
            )
        per_class = config.data.test_per_class
        for c, label in enumerate(config.labels.classes):
            for j in range(per_class):
                k = c * per_class + j
                cases.append(
                    PhantomCase(
                        case_id=f"{site.name}_test{k:04d}",
                        site=site.name,
                        label=label,
                        split="test",
                        seed=(seed, site_index, _TEST_SEED_OFFSET + k),
                    )
                )
    return cases


def assign_splits(labels: list[str], fractions, rng: np.random.Generator) -> list[str]:
    """Stratified split per class: each class with >= 3 cases puts >= 1 in holdout and test."""
    out = [""] * len(labels)
    for name in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == name]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        n = len(idx)
        if fractions.test == 0:  # the test split is a separate balanced set
            n_test = 0
            n_hold = round(n * fractions.holdout / (fractions.train + fractions.holdout))
            n_hold = max(n_hold, 1) if n >= 2 else 0
        else:
            n_test = round(n * fractions.test)
            n_hold = round(n * fractions.holdout)
            if n >= 3:
                n_test, n_hold = max(n_test, 1), max(n_hold, 1)
        n_test = min(n_test, max(n - 1, 0))
        n_hold = min(n_hold, max(n - 1 - n_test, 0))
        for j, i in enumerate(idx):
            out[i] = "test" if j < n_test else "holdout" if j < n_test + n_hold else "train"
    return out


def write_phantom_sites(
    config: SynthctConfig,
    out_dir: str | Path,
    *,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Render every site's phantoms into ``out_dir/<site>/*.nii.gz`` plus ``manifest.csv``.

    Labels are written in each site's own vocabulary (inverse of its ``label_map``), as a real
    hospital would. Returns the manifest path.
    """
    from synthct.data.manifest import ManifestRow, write_manifest
    from synthct.data.volume_io import write_nifti

    out = Path(out_dir)
    seed = config.seed if seed is None else seed
    cases = plan_site_cases(config, seed)

    def render_and_write(case: PhantomCase) -> ManifestRow:
        site = config.site(case.site)
        hu, spacing = render_phantom(
            np.random.default_rng(case.seed),
            case.label,
            site,
            config.data.shape,
            config.data.lesions,
        )
        rel = Path(case.site) / f"{case.case_id}.nii.gz"
        write_nifti(out / rel, hu, spacing, orientation=site.orientation)
        local = {v: k for k, v in site.label_map.items()}.get(case.label, case.label)
        return ManifestRow(path=str(rel), label=local, site=case.site, split=case.split)

    # Threads: numpy, scipy's filters and zlib release the GIL on large arrays, each case has
    # its own seed (same files whatever the order), and no process is forked under torch.
    workers = max(1, min(os.cpu_count() or 1, _RENDER_THREADS, len(cases)))
    rows: list[ManifestRow] = []
    with ThreadPoolExecutor(workers) as pool:
        for row in pool.map(render_and_write, cases):
            rows.append(row)
            if progress is not None:
                progress(len(rows), len(cases))
    manifest = out / "manifest.csv"
    write_manifest(manifest, rows)
    logger.info("wrote %d phantom cases for %d sites to %s", len(rows), len(config.data.sites), out)
    return manifest
