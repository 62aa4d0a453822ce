"""Class-balanced synthetic cohorts: plan what each class (and site) lacks, sample it, write it.

A cohort is a folder: ``cases/<site>/<label>/<case_id>.nii.gz`` (or, as DICOM, a CT series
folder ``<case_id>/`` per case, marked synthetic), ``manifest.csv``
(``path,label,site,split,source,seed,sampler,steps,guidance,site_condition``; ``site`` is the
site a case is meant for, ``pooled`` when it is meant for everyone, ``site_condition`` the site
a site-aware generator (site-conditioned UNet or site-styled decoder) was asked to render it
for (``null``: site-agnostic, ``none``: a generator that ignores sites), ``split`` is ``train`` because synthetic cases only ever train) and
``cohort.json`` (plan, generator sha256, versions). The plan is fixed when the cohort starts;
while it is being made its cases are listed in ``manifest.partial.csv`` and ``manifest.csv``
appears only when every planned case is on disk, so an interrupted cohort is never gated or
used as if whole. A rerun generates only cases that are not yet on disk, so an interrupted
cohort resumes without redoing or duplicating anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synthct.artifacts import read_json, write_json
from synthct.checkpoint import Generator, generator_sha256
from synthct.config import SynthctConfig
from synthct.data.manifest import (
    ManifestError,
    ManifestRow,
    partial_manifest_path,
    read_manifest,
    write_manifest,
)
from synthct.data.volume_io import write_dicom_series, write_nifti
from synthct.errors import SynthctError
from synthct.models.conditioning import UnknownSiteError
from synthct.sampling import (
    class_scales,
    inference_settings,
    labels_to_indices,
    sample_volumes,
    sites_to_indices,
)

__all__ = [
    "POOLED",
    "CohortError",
    "PlannedCase",
    "reference_counts",
    "parse_counts",
    "plan_cohort",
    "generate_cohort",
]

logger = logging.getLogger(__name__)

POOLED = "pooled"
COHORT_FORMAT = 1


class CohortError(SynthctError, ValueError):
    """A cohort cannot be planned or continued; the message says why."""


@dataclass(frozen=True)
class PlannedCase:
    case_id: str
    label: str
    site: str


def reference_counts(
    manifest: str | Path, config: SynthctConfig, *, splits: tuple[str, ...] = ("train",)
) -> dict[str, Counter]:
    """Cases of ``splits`` per site and vocabulary class (site labels mapped), from the
    manifest."""
    counts: dict[str, Counter] = {}
    for row in read_manifest(manifest):
        if row.split not in splits:
            continue
        try:
            label = config.resolve_label(row.site, row.label)
        except KeyError as exc:
            raise ManifestError(f"{manifest}: {exc.args[0]}") from None
        counts.setdefault(row.site, Counter())[label] += 1
    if not counts:
        raise ManifestError(f"{manifest}: no {' or '.join(splits)} rows to count")
    return counts


def parse_counts(text: str, classes: list[str]) -> dict[str, int]:
    """``"nodule=10,consolidation=20"`` -> counts; unknown classes and bad numbers are errors."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in classes:
            raise CohortError(f"--counts item {item!r}: expected class=n with class in {classes}")
        try:
            n = int(value)
        except ValueError:
            raise CohortError(f"--counts item {item!r}: {value!r} is not an integer") from None
        if n < 0:
            raise CohortError(f"--counts item {item!r}: a count cannot be negative")
        out[name.strip()] = n
    return out


def _deficit(counts: Counter, classes: list[str]) -> dict[str, int]:
    top = max((counts[c] for c in classes), default=0)
    return {c: top - counts[c] for c in classes}


def plan_cohort(
    counts: dict[str, Counter],
    classes: list[str],
    *,
    target: str | dict[str, int] = "balanced",
    per_site: bool = False,
) -> list[PlannedCase]:
    """Cases to generate. ``balanced`` fills every class up to the largest one (pooled over
    sites, or within each site with ``per_site`` so a site gets the classes it lacks);
    explicit counts ask for that many of each class (per site with ``per_site``)."""
    groups = {site: counts[site] for site in sorted(counts)} if per_site else None
    wanted: list[tuple[str, dict[str, int]]] = []
    if groups is None:
        pooled = sum(counts.values(), Counter())
        wanted.append((POOLED, _deficit(pooled, classes) if target == "balanced" else target))
    else:
        for site, site_counts in groups.items():
            wanted.append(
                (site, _deficit(site_counts, classes) if target == "balanced" else target)
            )
    plan = []
    for site, per_class in wanted:
        for label in classes:
            for i in range(int(per_class.get(label, 0))):
                plan.append(PlannedCase(f"{site}-{label}-{i:04d}", label, site))
    return plan


MANIFEST = "manifest.csv"
PARTIAL_MANIFEST = partial_manifest_path(Path(MANIFEST)).name


def _batch_seed(seed: int, first_case: str) -> int:
    digest = hashlib.sha256(f"{seed}|{first_case}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


VOLUME_FORMATS = ("nifti", "dicom")


def _case_path(case: PlannedCase, volume_format: str = "nifti") -> str:
    """A case's file (NIfTI) or series folder (DICOM, one file per slice)."""
    stem = f"cases/{case.site}/{case.label}/{case.case_id}"
    return f"{stem}.nii.gz" if volume_format == "nifti" else stem


def _write_case(
    out: Path, path: str, volume: np.ndarray, spacing, volume_format: str, description: str
) -> None:
    if volume_format == "nifti":
        write_nifti(out / path, volume, spacing)
        return
    # a series appears whole or not at all: slices go to a temporary folder renamed at the end
    final = out / path
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_dicom_series(staging, volume, spacing, synthetic=description)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)


def _load_or_start(out: Path, settings: dict) -> list[ManifestRow]:
    """Rows already written; a rerun must use the same plan and settings (unless nothing was
    written yet: then the new settings simply replace the old ones)."""
    meta_path = out / "cohort.json"
    rows = []
    for name in (PARTIAL_MANIFEST, MANIFEST):  # an unfinished run's own list first
        if (out / name).is_file():
            rows = [r for r in read_manifest(out / name) if (out / r.path).exists()]
            break
    if not meta_path.is_file() or not rows:
        write_json(meta_path, settings, kind="synthct-cohort")
        return []
    # what cohorts begun before a setting existed were made with: NIfTI, one guidance
    previous = {
        "volume_format": "nifti",
        "class_guidance": {},
        "scanner_noise": False,
        **read_json(meta_path),
    }
    changed = [k for k in settings if previous.get(k) != settings[k]]
    if changed:
        raise CohortError(
            f"{out} holds a cohort made with different {', '.join(changed)}; "
            "use a new --out folder or the same settings to resume"
        )
    return rows


def generate_cohort(
    gen: Generator,
    generator_dir: str | Path,
    plan: list[PlannedCase],
    out: str | Path,
    *,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: Callable[..., None] | None = None,
    denoiser: Callable[..., torch.Tensor] | None = None,
    plugins: str | None = None,
    volume_format: str = "nifti",
    scanner_noise: bool | None = None,
) -> Path:
    """Sample every planned case not yet on disk; returns the cohort manifest path.

    ``denoiser`` replaces the EMA UNet (a plugin Mixture); ``plugins`` describes what was merged
    into the generator (recorded in the cohort's provenance). ``volume_format``: ``nifti`` (one
    ``.nii.gz`` per case) or ``dicom`` (one CT series folder per case, marked synthetic, naming
    the generator and its sha256, without patient identifiers). ``scanner_noise``: add each
    case's target-site scanner noise (default: the generator's inference setting)."""
    if volume_format not in VOLUME_FORMATS:
        raise CohortError(f"unknown volume format {volume_format!r}; known: {list(VOLUME_FORMATS)}")
    out = Path(out)
    inference = inference_settings(gen, sampler, steps, guidance, scanner_noise)
    scanner_noise = inference["scanner_noise"]
    sampler, steps, guidance = inference["sampler"], inference["steps"], inference["guidance"]
    class_guidance = inference["class_guidance"]
    case_guidance = class_scales(gen, guidance, class_guidance)
    labels_to_indices(gen, sorted({c.label for c in plan}))  # unknown classes fail first
    try:  # and unknown sites, naming the ones the generator knows
        sites_to_indices(gen, sorted({c.site for c in plan}))
    except UnknownSiteError as exc:
        raise CohortError(str(exc)) from None
    conditioned = gen.renders_sites
    source = generator_sha256(generator_dir) + (f"+{plugins}" if plugins else "")
    settings = {
        "format": COHORT_FORMAT,
        "generator_sha256": source,
        "plan": [[c.case_id, c.label, c.site] for c in plan],
        "seed": seed,
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "class_guidance": class_guidance,
        "scanner_noise": scanner_noise,
        "batch_size": batch_size,
        "vocabulary_hash": gen.config.labels.vocabulary_hash,
        "volume_format": volume_format,
    }
    out.mkdir(parents=True, exist_ok=True)
    rows = _load_or_start(out, settings)
    done = {Path(r.path).name.removesuffix(".nii.gz") for r in rows}
    description = f"synthct synthetic CT; generator sha256 {source}"
    todo = [c for c in plan if c.case_id not in done]
    if done:
        logger.info("cohort %s: %d of %d cases already on disk", out, len(done), len(plan))
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in batches:
        batch_seed = _batch_seed(seed, batch[0].case_id)
        volumes = sample_volumes(
            gen,
            labels_to_indices(gen, [c.label for c in batch]),
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            class_guidance=class_guidance,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(batch_seed),
            device=device,
            denoiser=denoiser,
            sites=[c.site for c in batch],
            scanner_noise=scanner_noise,
        )
        for case, volume in zip(batch, volumes, strict=True):
            path = _case_path(case, volume_format)
            _write_case(
                out, path, volume[0].numpy(), gen.config.data.spacing_mm, volume_format, description
            )
            extra = {
                "source": f"synthct:{source}",
                "seed": str(batch_seed),
                "sampler": sampler,
                "steps": str(steps),
                "guidance": f"{case_guidance[case.label]:g}",
                "site_condition": (
                    ("null" if case.site == POOLED else case.site) if conditioned else "none"
                ),
                "scanner_noise": _noise_source(gen, case.site) if scanner_noise else "none",
            }
            rows.append(ManifestRow(path, case.label, case.site, "train", extra))
        # until every planned case is on disk the list is only the partial one: an interrupted
        # cohort cannot be mistaken for a whole one (gated, used); a rerun resumes from it
        write_manifest(out / PARTIAL_MANIFEST, _in_plan_order(rows, plan))
        if progress is not None:
            progress(len(rows), len(plan))
    write_manifest(out / MANIFEST, _in_plan_order(rows, plan))
    (out / PARTIAL_MANIFEST).unlink(missing_ok=True)
    logger.info("cohort %s: %d cases (%s)", out, len(rows), dict(Counter(r.label for r in rows)))
    return out / MANIFEST


def _noise_source(gen: Generator, site: str) -> str:
    """Whose scanner noise a case made for ``site`` carries: its own, or all sites' pooled."""
    assert gen.scanner_noise is not None
    return site if site in gen.scanner_noise.spectra else POOLED


def _in_plan_order(rows: list[ManifestRow], plan: list[PlannedCase]) -> list[ManifestRow]:
    order = {_case_path(c, f): i for i, c in enumerate(plan) for f in VOLUME_FORMATS}
    return sorted(rows, key=lambda r: order.get(r.path, len(order)))
