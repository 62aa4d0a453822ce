"""Manifests: how every volume enters synthct (``path,label,site,split`` CSV).

Relative paths are relative to the manifest's folder. ``split`` is the one split contract:
``train`` (models learn), ``holdout`` (the gate compares), ``test`` (downstream results only).
Cohort manifests add columns (``source``, ``seed``, ...), which are kept as ``extra``.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from synthct.artifacts import atomic_write_text
from synthct.config import SynthctConfig
from synthct.data.volume_io import VolumeError, read_volume
from synthct.errors import SynthctError

__all__ = [
    "SPLITS",
    "REQUIRED_COLUMNS",
    "ManifestError",
    "ManifestRow",
    "read_manifest",
    "write_manifest",
    "write_site_manifest",
    "check_manifest",
    "check_volume",
]

SPLITS = ("train", "holdout", "test")
REQUIRED_COLUMNS = ("path", "label", "site", "split")


class ManifestError(SynthctError, ValueError):
    """A manifest cannot be used; the message lists every problem found."""


@dataclass
class ManifestRow:
    path: str
    label: str
    site: str
    split: str
    extra: dict[str, str] = field(default_factory=dict)

    def resolve(self, base: Path) -> Path:
        p = Path(self.path)
        return p if p.is_absolute() else base / p


def partial_manifest_path(manifest: Path) -> Path:
    """Where the rows of a manifest still being written live (``NAME.partial.csv``): a
    cohort lists its cases there until every planned case is on disk, so an interrupted one
    is never read as whole."""
    return manifest.with_name(f"{manifest.stem}.partial{manifest.suffix}")


def _unfinished(manifest: Path) -> str:
    """What an unfinished cohort beside ``manifest`` holds: cases written of cases planned."""
    partial = partial_manifest_path(manifest)
    written = max(len(partial.read_text(encoding="utf-8-sig").splitlines()) - 1, 0)
    planned = "an unknown number of"
    try:
        planned = str(len(json.loads((manifest.parent / "cohort.json").read_text())["plan"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return (
        f"{partial.name} beside it lists an unfinished cohort, {written} of {planned} planned "
        "cases written (rerun the same `synthct generate` to finish it)"
    )


def require_manifest_file(path: Path) -> None:
    """``path`` names a manifest file that is there (not a folder, not an unfinished cohort's,
    not missing); cheap, so a command can refuse a mistyped path before loading anything."""
    if not path.exists() and partial_manifest_path(path).is_file():
        raise ManifestError(f"{path}: not written yet; {_unfinished(path)}")
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder; give the manifest CSV inside it")
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")


def _parse(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    require_manifest_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheet programs write a BOM
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r});"
            " save the CSV as UTF-8"
        ) from None
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames or []), list(reader)


def read_manifest(path: str | Path, *, validate: bool = True) -> list[ManifestRow]:
    """Read a manifest; with ``validate`` the columns and split values must be right."""
    path = Path(path)
    columns, records = _parse(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; has {columns}")
    rows = []
    for i, rec in enumerate(records, start=2):
        row = ManifestRow(
            path=(rec["path"] or "").strip(),
            label=(rec["label"] or "").strip(),
            site=(rec["site"] or "").strip(),
            split=(rec["split"] or "").strip(),
            extra={k: v for k, v in rec.items() if k not in REQUIRED_COLUMNS and k is not None},
        )
        if validate and row.split not in SPLITS:
            raise ManifestError(f"{path}:{i}: split {row.split!r} is not one of {SPLITS}")
        rows.append(row)
    return rows


def write_manifest(path: str | Path, rows: list[ManifestRow]) -> None:
    """Write rows atomically; extra columns (union over rows) follow the required ones."""
    extra_cols: list[str] = []
    for row in rows:
        extra_cols += [k for k in row.extra if k not in extra_cols]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*REQUIRED_COLUMNS, *extra_cols])
    for r in rows:
        writer.writerow(
            [r.path, r.label, r.site, r.split, *(r.extra.get(c, "") for c in extra_cols)]
        )
    atomic_write_text(path, buf.getvalue())


def write_site_manifest(pooled: str | Path, site: str, out: str | Path) -> Path:
    """What one hospital holds: the pooled manifest's rows of ``site`` only, absolute paths."""
    pooled, out = Path(pooled), Path(out)
    rows = [
        replace(r, path=str((pooled.parent / r.path).resolve()))
        for r in read_manifest(pooled, validate=False)
        if r.site == site
    ]
    if not rows:
        raise ManifestError(f"{pooled}: no rows for site {site!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(out, rows)
    return out


def check_volume(path: Path, spacings: list[tuple[str, tuple]] | None = None) -> list[str]:
    """Problems of one volume file: unreadable, truncated, NaN/inf, not 3D, not CT-like. A
    readable volume's ``(path, voxel spacing)`` is appended to ``spacings`` when given."""
    try:
        volume = read_volume(path)
    except VolumeError as exc:
        return [str(exc)]
    if spacings is not None:
        spacings.append((str(path), volume.spacing))
    if min(volume.hu.shape) < 2:
        return [f"{path}: shape {volume.hu.shape} is a single slice, not a 3D volume"]
    low = float(np.percentile(volume.hu, 1))
    if low > -500:
        return [
            f"{path}: does not look like CT in HU (1st percentile {low:.0f}, no air below -500)"
        ]
    return []


def check_manifest(
    path: str | Path,
    config: SynthctConfig | None = None,
    *,
    read_volumes: bool = True,
    spacings: list[tuple[str, tuple]] | None = None,
) -> list[str]:
    """Every problem of a manifest at once (empty list = usable).

    Checks columns, split values, labels (through each site's ``label_map`` when a config is
    given), duplicate paths, and, with ``read_volumes``, that every file exists, is non-empty,
    reads completely, is 3D and finite, and looks like CT; each volume read adds its
    ``(path, voxel spacing)`` to ``spacings`` when given (geometry checks, no second read).
    """
    path = Path(path)
    try:
        columns, records = _parse(path)
    except ManifestError as exc:
        return [str(exc)]
    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        problems.append(f"{path}: missing column(s) {missing}; has {columns}")
    if not records:
        problems.append(f"{path}: no rows")
    base = path.parent
    seen: Counter[str] = Counter()
    for line, rec in enumerate(records, start=2):
        where = f"{path}:{line}"
        rel = (rec.get("path") or "").strip()
        split = (rec.get("split") or "").strip()
        label = (rec.get("label") or "").strip()
        site = (rec.get("site") or "").strip()
        if "split" in columns and split not in SPLITS:
            problems.append(f"{where}: split {split!r} is not one of {list(SPLITS)}")
        if "site" in columns and not site:
            problems.append(f"{where}: empty site")
        if config is not None and "label" in columns:
            try:
                config.resolve_label(site, label)
            except KeyError as exc:
                problems.append(f"{where}: {exc.args[0]}")
        if "path" not in columns:
            continue
        if not rel:
            problems.append(f"{where}: empty path")
            continue
        resolved = Path(rel) if Path(rel).is_absolute() else base / rel
        key = str(resolved.resolve())
        seen[key] += 1
        if seen[key] == 2:
            problems.append(f"{where}: duplicate path {rel}")
        if seen[key] > 1 or not read_volumes:
            continue
        problems += [f"{where}: {p}" for p in check_volume(resolved, spacings)]
    return problems
