"""Does the one metrics path give the central gate the values the old pooled code gave?
(issue 22: one metrics path, checked before the parallel code was deleted)

    python bench/metrics_path_agreement.py --cohorts runs/bench_gate runs/bench_dose
        --real runs/bench_gate/real/manifest.csv [--old-rev b0fc594]
        [--results bench/results/metrics_path_agreement_<date>.json]

The old central code (``eval/cohort_metrics.py`` at ``--old-rev``, read from git) and the one
path (:func:`synthct.eval.metrics.central_metrics`: every real case at one site) score every
cohort folder found under ``--cohorts`` (``*/manifest.csv``) against the same real cases, from
the same features; each is judged with the default rules. Recorded per cohort: both verdicts
and failed rules, every metric's value from both; summarised: verdict agreement and the
largest difference per metric.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phantom_world import bench_command

from synthct.artifacts import library_versions
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.eval.gate import DEFAULT_RULES, featurise_cohort, judge, load_real
from synthct.eval.metric_values import clean_number
from synthct.eval.metrics import central_metrics
from synthct.pretrained import load_phantom_reference

REPO = Path(__file__).resolve().parents[1]
SKIP = ("data", "real", "judge")  # real phantoms the benches keep beside their cohorts


def _load_from_git(rev: str, path: str, name: str, replace: tuple[str, str] | None = None):
    """Import ``path`` as it stood at ``rev`` as module ``name``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    if replace:
        source = source.replace(*replace)
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def old_module(rev: str):
    """``eval/cohort_metrics.py`` as it stood at ``rev``, with the DCR and membership
    functions of that revision's ``eval/privacy.py``."""
    _load_from_git(rev, "eval/privacy.py", "old_privacy")
    return _load_from_git(
        rev,
        "eval/cohort_metrics.py",
        "old_cohort_metrics",
        ("from synthct.eval.privacy import", "from old_privacy import"),
    )


def verdict(metrics) -> tuple[bool, list[str]]:
    rows = judge(metrics, DEFAULT_RULES)
    failed = [r["rule"] for r in rows if r["passed"] is False]
    return not failed, failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cohorts", nargs="+", required=True)
    p.add_argument("--real", required=True)
    p.add_argument("--old-rev", default="b0fc594")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    start = time.perf_counter()
    old = old_module(args.old_rev)
    config = load_config(packaged_config_path("demo"))
    classes = list(config.labels.classes)
    window = config.data.hu_window
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    real = load_real(args.real, args.real, config=config, reference=reference)
    site = real.as_site()
    rows = []
    manifests = sorted(m for root in args.cohorts for m in Path(root).glob("*/manifest.csv"))
    for manifest in manifests:
        if manifest.parent.name in SKIP or manifest.resolve() == Path(args.real).resolve():
            continue
        cohort = load_cases(manifest, config, splits=("train",))
        if len(cohort) == 0:
            continue
        side = featurise_cohort(cohort, reference, window)
        requested = cohort.labels.numpy()
        before, _ = old.cohort_metrics(
            old.CohortEvidence(
                cohort=side.features,
                train=site.train,
                holdout=site.holdout,
                cohort_match=side.match,
                train_match=site.train_match,
                holdout_match=site.holdout_match,
                cohort_pred=side.pred,
                holdout_pred=site.holdout_pred,
                classes=classes,
            ),
            requested=requested,
        )
        after, _ = central_metrics(site, side, classes=classes, requested=requested)
        (old_pass, old_failed), (new_pass, new_failed) = verdict(before), verdict(after)
        row = {
            "cohort": f"{manifest.parent.parent.name}/{manifest.parent.name}",
            "cases": len(cohort),
            "old": {"passed": old_pass, "failed_rules": old_failed},
            "new": {"passed": new_pass, "failed_rules": new_failed},
            "values": {
                name: [clean_number(before[name].value), clean_number(after[name].value)]
                for name in after
            },
            "baselines": {
                name: [clean_number(before[name].baseline), clean_number(after[name].baseline)]
                for name in after
            },
            "intervals": {
                name: [before[name].as_dict()["ci"], after[name].as_dict()["ci"]] for name in after
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    def gap(name: str, field: str = "values") -> float | None:
        diffs = [
            abs(a - b) for r in rows if None not in (pair := r[field][name]) for a, b in [pair]
        ]
        return clean_number(max(diffs)) if diffs else None

    def interval_gap(name: str) -> float | None:
        diffs = [
            abs(a - b)
            for r in rows
            if None not in (pair := r["intervals"][name])
            for a, b in zip(*pair, strict=True)
            if a is not None and b is not None
        ]
        return clean_number(max(diffs)) if diffs else None

    names = list(rows[0]["values"]) if rows else []
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "versions": library_versions(),
        "old_code": f"eval/cohort_metrics.py at {args.old_rev}",
        "cohorts": len(rows),
        "verdicts_agree": sum(r["old"]["passed"] == r["new"]["passed"] for r in rows),
        "failed_rules_agree": sum(
            r["old"]["failed_rules"] == r["new"]["failed_rules"] for r in rows
        ),
        "largest_difference": {name: gap(name) for name in names},
        "largest_baseline_difference": {name: gap(name, "baselines") for name in names},
        "largest_interval_difference": {name: interval_gap(name) for name in names},
        "rows": rows,
        "wall_s": round(time.perf_counter() - start, 1),
        "command": bench_command("metrics_path_agreement.py", args),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))
    if args.results:
        Path(args.results).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
