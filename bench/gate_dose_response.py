"""Does a cohort the gate fails harm the classifier, and does one it passes not? (issue 21:
the gate calibrated on downstream harm)

    python bench/gate_dose_response.py [--seeds 0] [--out runs/bench_dose]
        [--results bench/results/gate_dose_response_<date>.json] [--resume]

A good cohort (fresh real phantoms of the demo's balanced class mix, every site) is degraded
along each axis the gate watches, at increasing doses: texture (Gaussian blur of sigma voxels,
what samples without scanner noise look like), HU shift, label noise (share of labels rotated
to the next class), mode collapse (distinct volumes per class), near copies of `train` cases
(share), and one site's style claimed for every site; beside them, the shipped generator's own
cohort in the same class mix. Every cohort is gated (every rule's value
and verdict) and added to the demo's real `train` cases to train the central classifier to
convergence (early stopping on the real `holdout`, as the product does); the real-only
classifier of the same seed is the reference.

Harm is judged on a **calibration set** that no model or stopping rule sees: fresh real
phantoms, ``--judge-per-class`` per class over all sites (another seed than the benchmark's),
so rare-class recall is measured on more than the 4 rare cases of `holdout`. The `test` split
is never read. Each row is written as it finishes; ``--resume`` keeps the rows of a results
file and runs the rest (one long run can span sessions).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from phantom_world import bench_command, phantom_manifest

from synthct.artifacts import library_versions
from synthct.classifier import build_classifier, join, load_cohort_for, predict, train_converged
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.manifest import read_manifest
from synthct.eval import negatives
from synthct.eval.classification import per_site_metrics
from synthct.eval.gate import load_real, run_gate
from synthct.pretrained import load_phantom_reference

COUNTS = {"nodule": 35, "ground_glass": 40, "consolidation": 60}  # the demo's balanced cohort
GOOD_SEED, JUDGE_SEED = 2001, 3001

# (axis, dose): the most telling doses first, so a run cut short has one of each axis
DOSES = [
    ("none", 0),
    # the product's own output in the same class mix: where the shipped generator's cohort sits
    # on these curves (does a cohort the gate fails today help or harm?)
    ("generator", "pretrained"),
    ("smoothed", 1.0),
    ("hu_shift", 60),
    ("label_noise", 0.3),
    ("mode_collapse", 1),
    ("near_copies", 0.5),
    ("one_style", "site_a"),
    ("smoothed", 0.5),
    ("smoothed", 2.0),
    ("hu_shift", 20),
    ("hu_shift", 150),
    ("label_noise", 0.1),
    ("label_noise", 0.6),
    ("mode_collapse", 3),
    ("mode_collapse", 8),
    ("near_copies", 1.0),
]


def make_cohort(axis: str, dose, base, good: Path, out: Path, world) -> Path:
    """The good cohort degraded along ``axis`` by ``dose`` (written once, reused on resume)."""
    manifest = out / "manifest.csv"
    if manifest.is_file():
        return manifest
    config, train_paths, train_labels = world
    if axis == "none":
        return good
    if axis == "smoothed":
        return negatives.smoothed(base, out, sigma_vox=dose)
    if axis == "hu_shift":
        return negatives.hu_shift(base, out, offset_hu=dose)
    if axis == "label_noise":
        return negatives.relabelled(base, out, classes=config.labels.classes, fraction=dose)
    if axis == "mode_collapse":
        return negatives.mode_collapse(base, out, distinct=dose)
    if axis == "near_copies":
        return negatives.near_copies(train_paths, train_labels, base, out, fraction=dose)
    if axis == "one_style":
        return negatives.one_style_for_all_sites(config, COUNTS, out, seed=GOOD_SEED, style=dose)
    if axis == "generator":
        return generator_cohort(config, dose, out)
    raise ValueError(f"unknown axis {axis!r}")


def generator_cohort(config, generator: str, out: Path) -> Path:
    """A generator's cohort in the good cohort's class mix, its cases cycling over the sites as
    the good cohort's do, sampled with the generator's own inference settings."""
    from synthct.checkpoint import load_generator
    from synthct.cohort import PlannedCase, generate_cohort
    from synthct.pretrained import phantom_dir

    gen_dir = phantom_dir() / "generator" if generator == "pretrained" else Path(generator)
    names = config.site_names
    plan, k = [], 0
    for label, n in COUNTS.items():
        for i in range(n):
            site = names[k % len(names)]
            plan.append(PlannedCase(f"{site}-{label}-{i:04d}", label, site))
            k += 1
    return generate_cohort(load_generator(gen_dir), gen_dir, plan, out, seed=GOOD_SEED)


def judge(model, cases, classes, rare) -> dict:
    """Balanced accuracy, worst site and rare-class recall on the calibration set."""
    m = per_site_metrics(
        predict(model, cases.images), cases.labels.numpy(), list(cases.sites), classes, rare
    )
    return {
        "balanced_accuracy": round(m["overall"]["balanced_accuracy"], 4),
        "worst_site_balanced_accuracy": round(m["worst_site_balanced_accuracy"], 4),
        **{f"recall_{r}": round(m["overall"]["per_class_recall"][r], 4) for r in rare},
    }


def plot(summary: dict, path: Path) -> None:
    """The dose-response curves (``synthct.report_harm``, as the report draws them): per axis,
    the mean change over seeds against the dose, filled where the gate passed every seed's."""
    import matplotlib.pyplot as plt

    from synthct.report_harm import dose_response_figure, mean_over_seeds

    fig = dose_response_figure(mean_over_seeds(summary["rows"]))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--judge-per-class", type=int, default=60)
    p.add_argument("--out", default="runs/bench_dose")
    p.add_argument("--results", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--skip-axes",
        nargs="*",
        default=[],
        help="axes not run (e.g. near_copies on later seeds: privacy is never traded for "
        "utility, so its downstream effect sets no threshold)",
    )
    args = p.parse_args()
    torch.set_num_threads(2)
    config = load_config(packaged_config_path("demo"))
    classes, rare = list(config.labels.classes), list(config.labels.rare)
    out = Path(args.out)
    manifest = phantom_manifest(config, out)
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    real = load_real(manifest, manifest, config=config, reference=reference)
    train, holdout = real.train, real.holdout
    listed = [r for r in read_manifest(manifest) if r.split == "train"]
    train_paths = [r.resolve(manifest.parent) for r in listed]
    train_labels = [classes[i] for i in train.labels.tolist()]
    judge_manifest = out / "judge" / "manifest.csv"
    if not judge_manifest.is_file():
        judge_manifest = negatives.fresh_real_cohort(
            config, {c: args.judge_per_class for c in classes}, out / "judge", seed=JUDGE_SEED
        )
    judge_set = load_cases(judge_manifest, config, splits=("train",))
    good = out / "good" / "manifest.csv"
    if not good.is_file():
        good = negatives.fresh_real_cohort(config, COUNTS, out / "good", seed=GOOD_SEED)
    base = negatives.load_cohort_volumes(good)
    world = (config, train_paths, train_labels)

    results = Path(args.results) if args.results else None
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "versions": library_versions(),
        "judged_on": f"fresh real phantoms, {args.judge_per_class} per class over all sites "
        f"(seed {JUDGE_SEED}); early stopping on the real holdout; test never read",
        "good_cohort": {"counts": COUNTS, "seed": GOOD_SEED},
        "real_only": {},
        "rows": [],
        "command": bench_command("gate_dose_response.py", args),
    }
    if args.resume and results and results.is_file():
        kept = json.loads(results.read_text())
        summary["real_only"], summary["rows"] = kept["real_only"], kept["rows"]
    done = {(r["axis"], str(r["dose"]), r["seed"]) for r in summary["rows"]}

    def save() -> None:
        if results:
            results.write_text(json.dumps(summary, indent=1))
            plot(summary, results.with_suffix(".png"))

    for seed in args.seeds:
        if str(seed) not in summary["real_only"]:
            start = time.perf_counter()
            torch.manual_seed(seed)
            model = build_classifier(config)
            stop = train_converged(model, train, holdout, config, seed=seed)
            summary["real_only"][str(seed)] = {
                **judge(model, judge_set, classes, rare),
                "stopping": stop,
                "wall_s": round(time.perf_counter() - start, 1),
            }
            print(json.dumps({"real_only": seed, **summary["real_only"][str(seed)]}), flush=True)
            save()
        for axis, dose in DOSES:
            if (axis, str(dose), seed) in done or axis in args.skip_axes:
                continue
            start = time.perf_counter()
            cohort_manifest = make_cohort(axis, dose, base, good, out / f"{axis}_{dose}", world)
            verdict = run_gate(cohort_manifest, real, config=config, reference=reference)
            cohort = load_cohort_for(cohort_manifest, config, None)
            torch.manual_seed(seed)
            model = build_classifier(config)
            stop = train_converged(model, join(train, cohort), holdout, config, seed=seed)
            scores = judge(model, judge_set, classes, rare)
            ref = summary["real_only"][str(seed)]
            row = {
                "axis": axis,
                "dose": dose,
                "seed": seed,
                "gate_passed": verdict["verdict"] == "pass",
                "failed_rules": verdict["failed_rules"],
                "gate_values": {r["rule"]: [r["value"], r["threshold"]] for r in verdict["rules"]},
                **scores,
                "change": {k: round(v - ref[k], 4) for k, v in scores.items()},
                "stopping": stop,
                "wall_s": round(time.perf_counter() - start, 1),
            }
            summary["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()
    changes = [r["change"]["balanced_accuracy"] for r in summary["rows"] if r["axis"] == "none"]
    if changes:
        summary["good_cohort"]["balanced_accuracy_change"] = float(np.mean(changes))
    save()


if __name__ == "__main__":
    main()
