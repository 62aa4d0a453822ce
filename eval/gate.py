"""The gate: a synthetic cohort is used only when evidence says it is faithful, diverse, not a
copy of anyone's scan and not biased.

Works on any cohort folder with a ``manifest.csv`` (``path,label,site,split``; synthct's or
another generator's). Its rules (:mod:`synthct.eval.rules`) are thresholds over
:mod:`synthct.eval.metrics`. ``gate.json`` records every rule (value, threshold, interval,
pass/fail, reason), the verdict, per-volume flags and the sha256 of the manifest and of every
file it lists, so a later stage can refuse a cohort that changed.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synthct.artifacts import (
    artifact_header,
    atomic_write_text,
    read_json,
    sha256_file,
    sha256_path,
)
from synthct.config import SynthctConfig
from synthct.data.dataset import load_cases
from synthct.data.manifest import ManifestError, ManifestRow, read_manifest, write_manifest
from synthct.eval.features import FeatureSet, extract_features
from synthct.eval.metric_values import MetricValue
from synthct.eval.metrics import CohortSide, central_metrics
from synthct.eval.privacy import MatchSet, prepare_for_matching
from synthct.eval.rules import DEFAULT_RULES, GateError, RuleSpec, judge, load_rules
from synthct.eval.site_statistics import SiteData
from synthct.reference import ReferenceModel
from synthct.signing import SignatureError, sign_document, verify_document

__all__ = [
    "GATE_FORMAT",
    "RuleSpec",
    "DEFAULT_RULES",
    "GateError",
    "load_rules",
    "RealSide",
    "load_real",
    "featurise_cohort",
    "run_gate",
    "gate_report",
    "hash_cohort",
    "write_gate",
    "gate_table",
    "not_evaluated_note",
    "judge",
    "verify_gate",
    "drop_flagged",
    "check_cohort_gate",
    "gated_cohort",
]

logger = logging.getLogger(__name__)

GATE_FORMAT = 1


def hash_cohort(manifest: Path) -> tuple[dict[str, Any], list[ManifestRow]]:
    """sha256 of the manifest and of every file it lists; also the rows themselves."""
    rows = read_manifest(manifest)
    files = {}
    for row in rows:
        path = row.resolve(manifest.parent)
        if not path.exists():
            raise GateError(f"{manifest}: listed file {row.path} does not exist")
        files[row.path] = sha256_path(path)  # a DICOM series folder: every slice counts
    info = {"manifest": manifest.name, "manifest_sha256": sha256_file(manifest), "files": files}
    return info, rows


@dataclass
class RealSide:
    """The real cases a cohort is judged against, featurised once (several cohorts may share it)."""

    train: Any
    holdout: Any
    train_features: FeatureSet
    holdout_features: FeatureSet
    train_match: MatchSet
    holdout_match: MatchSet
    holdout_pred: np.ndarray
    provenance: dict[str, Any]

    def as_site(self) -> SiteData:
        """The real cases as the one site of the central gate."""
        return SiteData(
            self.train_features,
            self.holdout_features,
            self.train_match,
            self.holdout_match,
            self.holdout_pred,
        )


def featurise_cohort(cohort, reference: ReferenceModel, hu_window) -> CohortSide:
    """What the gate compares of a cohort (loaded cases): reference features, the matching
    set for copy checks and the reference's predicted class of each volume."""
    return CohortSide(
        extract_features(cohort.images, cohort.labels, cohort.sites, reference, hu_window),
        prepare_for_matching(cohort.images, hu_window),
        reference.predict(cohort.images).argmax(1).numpy(),
    )


def load_real(
    train_manifest: str | Path,
    holdout_manifest: str | Path,
    *,
    config: SynthctConfig,
    reference: ReferenceModel,
) -> RealSide:
    """Read and featurise the ``train`` and ``holdout`` splits the gate compares against."""
    if reference.vocabulary_hash != config.labels.vocabulary_hash:
        raise GateError("the reference models were trained on another label vocabulary")
    train = load_cases(train_manifest, config, splits=("train",))
    holdout = load_cases(holdout_manifest, config, splits=("holdout",))
    for name, cases, manifest in (
        ("train", train, train_manifest),
        ("holdout", holdout, holdout_manifest),
    ):
        if len(cases) < 5:
            raise GateError(f"{manifest}: only {len(cases)} {name} cases; the gate needs >= 5")
    window = config.data.hu_window
    return RealSide(
        train=train,
        holdout=holdout,
        train_features=extract_features(train.images, train.labels, train.sites, reference, window),
        holdout_features=extract_features(
            holdout.images, holdout.labels, holdout.sites, reference, window
        ),
        train_match=prepare_for_matching(train.images, config.data.hu_window),
        holdout_match=prepare_for_matching(holdout.images, config.data.hu_window),
        holdout_pred=reference.predict(holdout.images).argmax(1).numpy(),
        provenance={
            "train_manifest_sha256": sha256_file(train_manifest),
            "holdout_manifest_sha256": sha256_file(holdout_manifest),
            "train_cases": len(train),
            "holdout_cases": len(holdout),
        },
    )


def run_gate(
    cohort_manifest: str | Path,
    real: RealSide,
    *,
    config: SynthctConfig,
    reference: ReferenceModel,
    rules: dict[str, RuleSpec] | None = None,
    seed: int = 0,
    bootstrap: int = 200,
) -> dict[str, Any]:
    """Score the cohort and judge it; returns the ``gate.json`` payload (not yet written)."""
    rules = rules or dict(DEFAULT_RULES)
    cohort_manifest = Path(cohort_manifest)
    files, listed = hash_cohort(cohort_manifest)  # first: the verdict is about these bytes
    cohort = load_cases(cohort_manifest, config, splits=("train",))
    if len(cohort) == 0:
        raise GateError(f"{cohort_manifest}: no cases with split 'train' (synthetic cases train)")
    metrics, per_volume = central_metrics(
        real.as_site(),
        featurise_cohort(cohort, reference, config.data.hu_window),
        classes=list(config.labels.classes),
        requested=cohort.labels.numpy(),
        bootstrap=bootstrap,
        seed=seed,
    )
    per_volume["copy_of"] = [
        f"train case {Path(real.train.paths[int(i)]).name}" for i in per_volume["copy_of"]
    ]
    return gate_report(
        metrics,
        per_volume,
        rules,
        cohort=cohort,
        files=files,
        listed=listed,
        config=config,
        real=real.provenance,
        reference=reference,
        seed=seed,
    )


def gate_report(
    metrics: dict[str, MetricValue],
    per_volume: dict[str, Any],
    rules: dict[str, RuleSpec],
    *,
    cohort,
    files: dict[str, Any],
    listed: list[ManifestRow],
    config: SynthctConfig,
    real: dict[str, Any],
    reference: ReferenceModel,
    seed: int,
) -> dict[str, Any]:
    """The ``gate.json`` payload from the metrics (central or federated) and per-volume
    evidence (``copy_of`` names what each volume would be a copy of)."""
    rows = judge(metrics, rules)
    failed = [r["rule"] for r in rows if r["passed"] is False]
    # load_cases keeps the manifest's order: case i is the i-th row with split "train"
    listed_paths = [r.path for r in listed if r.split == "train"]
    flags = []
    for i, listed_path in enumerate(listed_paths):
        reasons = []
        if per_volume["near_copy"][i]:
            reasons.append(
                f"near-copy of {per_volume['copy_of'][i]} (NCC {per_volume['copy_ncc'][i]:.4f})"
            )
        if per_volume["hu_insane"][i]:
            soft, lung, bone = per_volume["medians"][i]
            reasons.append(
                f"tissue median HU out of range (soft {soft:.0f}, lung {lung:.0f}, bone {bone:.0f})"
            )
        if reasons:
            flags.append({"path": listed_path, "reasons": reasons})
    changed = {
        name: {
            "threshold": spec.threshold,
            "enabled": spec.enabled,
            "default_threshold": DEFAULT_RULES[name].threshold,
            "default_enabled": DEFAULT_RULES[name].enabled,
        }
        for name, spec in rules.items()
        if (spec.threshold, spec.enabled)
        != (DEFAULT_RULES[name].threshold, DEFAULT_RULES[name].enabled)
    }
    return {
        "verdict": "fail" if failed else "pass",
        "failed_rules": failed,
        "rules_changed": changed,  # what this verdict was judged under beyond the defaults
        "rules": rows,
        "metrics": {k: v.as_dict() for k, v in metrics.items()},
        "flags": flags,
        "cohort": {
            "cases": len(cohort),
            "per_class": {
                c: int((cohort.labels == i).sum()) for i, c in enumerate(config.labels.classes)
            },
            **files,
        },
        "real": real,
        "reference": {
            "weights_sha256": reference.info.get("weights_sha256"),
            "vocabulary_hash": reference.vocabulary_hash,
        },
        "seed": seed,
    }


def gate_table(report: dict[str, Any]):
    """A rich table of the rules: value, threshold, interval, result."""
    from rich.table import Table

    table = Table(title=f"gate: {report['verdict'].upper()} ({report['cohort']['cases']} cases)")
    for col in ("rule", "value", "threshold", "CI", "result"):
        table.add_column(col)
    for r in report["rules"]:
        ci = "" if not r["ci"] or None in r["ci"] else f"[{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]"
        value = "n/a" if r["value"] is None else f"{r['value']:.4g}"
        sign = "<=" if r["direction"] == "max" else ">="
        result = {True: "pass", False: "FAIL", None: "-"}[r["passed"]]
        table.add_row(r["rule"], value, f"{sign} {r['threshold']:.4g}", ci, result)
    return table


def not_evaluated_note(report: dict[str, Any]) -> str | None:
    """A federated gate's classes that sites held too few cases of to send statistics on."""
    held = report.get("real", {}).get("not_evaluated") or {}
    if not held:
        return None
    k = report["real"].get("min_class_cases")
    return f"not evaluated (fewer than {k} cases at the site): " + "; ".join(
        f"{site}: {', '.join(names)}" for site, names in held.items()
    )


def write_gate(
    report: dict[str, Any], out: str | Path, *, sign_with: str | Path | None = None
) -> dict[str, Any]:
    """Write ``gate.json``; with ``sign_with`` (an Ed25519 private key) signed, so downstream
    can refuse an edited verdict. Returns the document as written (header, signature)."""
    document = {**artifact_header("synthct-gate"), **report}
    if sign_with is not None:
        document = sign_document(document, sign_with)
    atomic_write_text(out, json.dumps(document, indent=2, default=str) + "\n")
    return document


def verify_gate(
    gate_json: str | Path,
    cohort_dir: str | Path,
    trusted_keys: list[str | Path] | None = None,
) -> dict[str, Any]:
    """The gate report of a cohort, only if it passed and every hashed file is unchanged; with
    ``trusted_keys`` (public keys) also only if one of them signed it and nothing in it was
    edited since."""
    gate_json, cohort_dir = Path(gate_json), Path(cohort_dir)
    if not gate_json.is_file():
        raise GateError(f"{gate_json}: no gate report; run `synthct gate` on {cohort_dir} first")
    try:
        report = read_json(gate_json)
    except (OSError, ValueError) as exc:
        raise GateError(f"{gate_json}: unreadable gate report: {exc}") from None
    if trusted_keys:
        report["signed_by"] = verify_document(report, list(trusted_keys), what=str(gate_json))
    if report.get("verdict") != "pass":
        raise GateError(
            f"{gate_json}: the cohort failed the gate (rules: {', '.join(report.get('failed_rules', []))})"
        )
    info = report["cohort"]
    manifest = cohort_dir / info["manifest"]
    changed = []
    if not manifest.is_file() or sha256_file(manifest) != info["manifest_sha256"]:
        changed.append(info["manifest"])
    for rel, digest in info["files"].items():
        path = Path(rel) if Path(rel).is_absolute() else cohort_dir / rel
        if not path.exists() or sha256_path(path) != digest:
            changed.append(rel)
    if changed:
        shown = ", ".join(changed[:5]) + (
            f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        )
        raise GateError(f"{cohort_dir}: changed since it was gated ({gate_json}): {shown}")
    return report


def drop_flagged(cohort_dir: str | Path, report: dict[str, Any], out_dir: str | Path) -> Path:
    """Copy the cohort without its flagged volumes into ``out_dir`` (to be gated again)."""
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    if out_dir.resolve() == cohort_dir.resolve():
        raise GateError("--drop-flagged needs an output folder other than the cohort itself")
    manifest = cohort_dir / report["cohort"]["manifest"]
    flagged = {f["path"] for f in report["flags"]}
    kept = []
    for row in read_manifest(manifest):
        if row.path in flagged:
            continue
        src = row.resolve(cohort_dir)
        if not Path(row.path).is_absolute():
            (out_dir / row.path).parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():  # a DICOM series
                shutil.copytree(src, out_dir / row.path, dirs_exist_ok=True)
            else:
                shutil.copy2(src, out_dir / row.path)
        kept.append(row)
    if not kept:
        raise ManifestError(f"{manifest}: every case is flagged; nothing left to keep")
    for extra in ("cohort.json",):
        if (cohort_dir / extra).is_file():
            shutil.copy2(cohort_dir / extra, out_dir / extra)
    write_manifest(out_dir / "manifest.csv", kept)
    logger.info("kept %d of %d cases in %s", len(kept), len(kept) + len(flagged), out_dir)
    return out_dir / "manifest.csv"


def gated_cohort(
    cohort_dir: Path | None,
    gate_json: Path | None,
    force_ungated: bool,
    trusted_keys: list[str | Path] | None = None,
) -> tuple[dict[str, Any] | None, Path | None]:
    """What downstream may train on: the gate's record (:func:`check_cohort_gate`) and the
    cohort manifest it judged; ``(None, None)`` without a cohort."""
    if cohort_dir is None:
        return None, None
    info = check_cohort_gate(cohort_dir, gate_json, force_ungated, trusted_keys)
    return info, Path(info.get("manifest") or cohort_dir / "manifest.csv")


def check_cohort_gate(
    cohort_dir: Path,
    gate_json: Path | None,
    force_ungated: bool,
    trusted_keys: list[str | Path] | None = None,
) -> dict[str, Any]:
    """The gate's verdict on the cohort; refuses (GateError, SignatureError) unless it passed
    unchanged and, with ``trusted_keys``, was signed by one of them. Rules that differed from
    the defaults are passed on (and logged) so results and reports can show them."""
    gate_json = gate_json or cohort_dir / "gate.json"
    try:
        report = verify_gate(gate_json, cohort_dir, trusted_keys)
    except (GateError, SignatureError) as exc:
        if not force_ungated:
            raise
        logger.warning("UNGATED cohort used (--force-ungated): %s", exc)
        return {"gated": False, "gate": str(gate_json), "refusal": str(exc)}
    if not trusted_keys:
        logger.warning(
            "%s: verdict accepted without a signature check (no trusted keys)", gate_json
        )
    changed = report.get("rules_changed") or {}
    if changed:
        logger.warning("%s was judged under non-default rules: %s", gate_json, changed)
    return {
        "gated": True,
        "gate": str(gate_json),
        "manifest": str(cohort_dir / report["cohort"]["manifest"]),  # the list it judged
        "verdict": report["verdict"],
        "signed_by": report.get("signed_by"),
        "rules_changed": changed,
    }
