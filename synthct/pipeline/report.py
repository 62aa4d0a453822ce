"""The report stage: a run's self-contained ``report.html`` from what its stages wrote.

Slices of real and synthetic volumes per class and per site, the training curves from
``rounds.jsonl``, the gate's verdict, the downstream per-site results, the site plugin and the
run's provenance (config, generator and cohort hashes), so a reader sees the run without
opening its JSON files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from synthct.checkpoint import generator_sha256
from synthct.config import SynthctConfig
from synthct.data.dataset import CaseSet, load_cases
from synthct.data.preprocess import model_to_hu
from synthct.eval.calibration import load_calibration
from synthct.privacy import artifact_privacy, run_account
from synthct.report import write_report

__all__ = ["write_run_report"]

SLICES_PER_CLASS = 3  # volumes shown per class, real and synthetic


def _hu_by_class(cases: CaseSet, config: SynthctConfig, per_class: int) -> dict[str, np.ndarray]:
    hu = model_to_hu(cases.images, config.data.hu_window)[:, 0].numpy()
    out = {}
    for c, name in enumerate(config.labels.classes):
        idx = (cases.labels == c).nonzero().flatten()[:per_class].tolist()
        if idx:
            out[name] = hu[idx]
    return out


def _hu_by_site(cases: CaseSet, config: SynthctConfig) -> dict[str, np.ndarray]:
    """The first volume of each site, in HU."""
    hu = model_to_hu(cases.images, config.data.hu_window)[:, 0].numpy()
    return {site: hu[cases.sites.index(site)] for site in dict.fromkeys(cases.sites)}


def write_run_report(
    run: Path,
    *,
    config: SynthctConfig,
    real_manifest: Path,
    cohort_manifest: Path,
    gate: dict[str, Any],
    downstream: dict[str, Any],
    summary: dict[str, Any],
    plugin: dict[str, Any] | None = None,
    title: str,
) -> Path:
    """Write ``run/report.html`` for a run folder holding ``config.yaml``, ``generator/`` and
    (federated runs) ``rounds.jsonl``; real volumes are shown, so use it where they may be
    (phantoms, or a site's own report)."""
    cohort_cases = load_cases(cohort_manifest, config, splits=("train",))
    real_cases = load_cases(real_manifest, config, splits=("train",))
    rounds_path = run / "rounds.jsonl"
    rounds = (
        [json.loads(line) for line in rounds_path.read_text().splitlines()]
        if rounds_path.is_file()
        else []
    )
    provenance = {
        "config": (run / "config.yaml").read_text(),
        "generator_sha256": generator_sha256(run / "generator"),
        "cohort_manifest_sha256": gate["cohort"]["manifest_sha256"],
        "reference": gate["reference"],
        "real": gate["real"],
    }
    records = {"generator": artifact_privacy(run / "generator")[1]}
    if (run / "reference" / "reference.json").is_file():
        records["reference"] = artifact_privacy(run / "reference")[1]
    records["downstream"] = downstream.get("privacy")
    return write_report(
        run / "report.html",
        title=title,
        summary=summary,
        synthetic=_hu_by_class(cohort_cases, config, SLICES_PER_CLASS),
        real=_hu_by_class(real_cases, config, SLICES_PER_CLASS),
        rounds=rounds,
        gate=gate,
        downstream=downstream,
        provenance=provenance,
        plugin=plugin,
        sites=(_hu_by_site(real_cases, config), _hu_by_site(cohort_cases, config)),
        calibration=load_calibration(),
        privacy=run_account(records),
    )
