"""How alike are a cohort's cases within a class? Feature by feature, against real cases.

    python bench/cohort_spread.py COHORT_MANIFEST [...] [--names NAME ...]
        [--out runs/bench_cohort_spread] [--results bench/results/cohort_spread_<date>.json]

For every class and every HU / texture feature the gate's ``fidelity_radiomics`` rule uses
(``synthct.eval.features.RADIOMICS_NAMES``): the cohort's mean minus the real cases' mean in
units of the real cases' SD, and the cohort's SD over the real cases' SD (1 = as varied as
real; the ``mode_collapse`` rule sees only the structural side of the same thing). Real = the
demo phantoms' ``holdout`` split; the baseline row is their ``train`` split scored the same
way, so a ratio can be read against what two real samples of these sizes give. No ``test``
split is read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from phantom_world import bench_command, phantom_world

from synthct.artifacts import write_json
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.preprocess import model_to_hu
from synthct.eval.features import RADIOMICS_NAMES, radiomics_features


def spread(features: np.ndarray, labels: np.ndarray, real: np.ndarray, real_labels, classes):
    """Per class: per feature mean gap (real SDs) and SD ratio, and their medians."""
    out = {}
    for k, name in enumerate(classes):
        mine, theirs = features[labels == k], real[real_labels == k]
        if len(mine) < 2 or len(theirs) < 2:
            continue
        sd = theirs.std(0) + 1e-9
        gap = (mine.mean(0) - theirs.mean(0)) / sd
        ratio = mine.std(0) / sd
        out[name] = {
            "cases": int(len(mine)),
            "real_cases": int(len(theirs)),
            "median_sd_ratio": round(float(np.median(ratio)), 3),
            "median_abs_gap": round(float(np.median(np.abs(gap))), 3),
            "sd_ratio": {
                f: round(float(r), 3) for f, r in zip(RADIOMICS_NAMES, ratio, strict=True)
            },
            "gap_in_real_sd": {
                f: round(float(g), 3) for f, g in zip(RADIOMICS_NAMES, gap, strict=True)
            },
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cohorts", nargs="+", type=Path, help="cohort manifest.csv files")
    p.add_argument("--names", nargs="+", default=None, help="one name per cohort")
    p.add_argument("--out", type=Path, default=Path("runs/bench_cohort_spread"))
    p.add_argument("--results", default=None)
    args = p.parse_args()
    names = args.names or [c.parent.name for c in args.cohorts]
    if len(names) != len(args.cohorts):
        p.error("--names needs one name per cohort")
    config = load_config(packaged_config_path("demo"))
    classes, window = list(config.labels.classes), config.data.hu_window
    _, train, holdout = phantom_world(config, args.out)
    real = radiomics_features(model_to_hu(holdout.images, window))
    real_labels = holdout.labels.numpy()
    rows = {
        "real train (baseline)": spread(
            radiomics_features(model_to_hu(train.images, window)),
            train.labels.numpy(),
            real,
            real_labels,
            classes,
        )
    }
    for name, manifest in zip(names, args.cohorts, strict=True):
        cases = load_cases(manifest, config, splits=("train",))
        feats = radiomics_features(model_to_hu(cases.images, window))
        rows[name] = spread(feats, cases.labels.numpy(), real, real_labels, classes)
    for name, per_class in rows.items():
        summary = "  ".join(
            f"{c} sd x{v['median_sd_ratio']:.2f} gap {v['median_abs_gap']:.2f}"
            for c, v in per_class.items()
        )
        print(f"{name:<28} {summary}", flush=True)
    if args.results:
        write_json(
            args.results,
            {
                "date": time.strftime("%Y-%m-%d"),
                "real": "demo phantoms, holdout split",
                "cohorts": {n: str(c) for n, c in zip(names, args.cohorts, strict=True)},
                "rows": rows,
                "command": bench_command("cohort_spread.py", args, positional=("cohorts",)),
            },
            kind="bench-cohort-spread",
        )


if __name__ == "__main__":
    main()
