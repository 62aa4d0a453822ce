"""Which downstream training recipe converges in the fewest epochs without losing accuracy?

    python bench/downstream_recipe.py [--recipes current lr3e-3 onecycle3e-3_150 ...]
        [--seeds 0 1] [--out runs/bench_recipe]
        [--results bench/results/downstream_recipe_<date>.json]

The central real-only classifier of the demo benchmark (train on the demo phantoms' ``train``
split, early stopping and best checkpoint on their ``holdout``, as the product does) under each
recipe, per seed. Recipes change only ``downstream`` settings (learning rate, schedule, epoch
cap, patience). Each run is judged on a **choice set** of fresh real phantoms
(``--per-class`` per class over all sites, seed 4001: neither the benchmark's phantoms nor the
dose-response bench's calibration set), so rare-class recall rests on more than the 4
consolidation cases of ``holdout``; the ``test`` split is never read. Recorded per run: epochs
run, best epoch, holdout and choice-set scores, wall time (a timing only when nothing else ran).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from phantom_world import phantom_manifest

from synthct.artifacts import library_versions, write_json
from synthct.classifier import build_classifier, predict, train_converged
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.eval import negatives
from synthct.eval.classification import per_site_metrics

CHOICE_SEED = 4001

RECIPES: dict[str, dict] = {
    "current": {},  # configs/demo.yaml: AdamW 1e-3 constant, cap 600, patience 100
    "lr3e-3": {"lr": 3e-3},
    "onecycle3e-3_150": {"lr": 3e-3, "lr_schedule": "onecycle", "epochs": 150, "patience": 0},
    "onecycle1e-2_150": {"lr": 1e-2, "lr_schedule": "onecycle", "epochs": 150, "patience": 0},
    "onecycle3e-3_100": {"lr": 3e-3, "lr_schedule": "onecycle", "epochs": 100, "patience": 0},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--out", default="runs/bench_recipe")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    base = load_config(packaged_config_path("demo"))
    classes, rare = list(base.labels.classes), list(base.labels.rare)
    out = Path(args.out)
    manifest = phantom_manifest(base, out)
    train = load_cases(manifest, base, splits=("train",))
    holdout = load_cases(manifest, base, splits=("holdout",))
    choice_manifest = out / "choice" / "manifest.csv"
    if not choice_manifest.is_file():
        choice_manifest = negatives.fresh_real_cohort(
            base, dict.fromkeys(classes, args.per_class), out / "choice", seed=CHOICE_SEED
        )
    choice = load_cases(choice_manifest, base, splits=("train",))
    results = {
        "kind": "bench-downstream-recipe",
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "versions": library_versions(),
        "judged_on": f"fresh real phantoms, {args.per_class} per class over all sites (seed "
        f"{CHOICE_SEED}); early stopping on the real holdout; test never read",
        "command": f"python bench/downstream_recipe.py --recipes {' '.join(args.recipes)} "
        f"--seeds {' '.join(map(str, args.seeds))} --per-class {args.per_class} "
        f"--out {args.out} --results {args.results}",
        "recipes": {name: RECIPES[name] for name in args.recipes},
        "runs": [],
        "summary": {},
    }
    for name in args.recipes:
        down = base.downstream.model_copy(update=RECIPES[name])
        config = base.model_copy(update={"downstream": down})
        scores = []
        for seed in args.seeds:
            start = time.perf_counter()
            torch.manual_seed(seed)
            model = build_classifier(config)
            stop = train_converged(model, train, holdout, config, seed=seed)
            m = per_site_metrics(
                predict(model, choice.images),
                choice.labels.numpy(),
                list(choice.sites),
                classes,
                rare,
            )
            run = {
                "recipe": name,
                "seed": seed,
                "stopping": stop,
                "balanced_accuracy": round(m["overall"]["balanced_accuracy"], 4),
                "worst_site_balanced_accuracy": round(m["worst_site_balanced_accuracy"], 4),
                **{f"recall_{r}": round(m["overall"]["per_class_recall"][r], 4) for r in rare},
                "wall_s": round(time.perf_counter() - start, 1),
            }
            scores.append(run)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            keys = ["balanced_accuracy", "worst_site_balanced_accuracy"] + [
                f"recall_{r}" for r in rare
            ]
            results["summary"][name] = {
                **{
                    k: {
                        "mean": round(float(np.mean([s[k] for s in scores])), 4),
                        "sd": round(float(np.std([s[k] for s in scores])), 4),
                    }
                    for k in keys
                },
                "epochs_run": [s["stopping"]["epochs_run"] for s in scores],
                "best_at": [s["stopping"]["best_at"] for s in scores],
                "holdout_balanced_accuracy": [
                    round(s["stopping"]["holdout_balanced_accuracy"], 4) for s in scores
                ],
            }
            if args.results:
                write_json(args.results, results, kind="bench-downstream-recipe")


if __name__ == "__main__":
    main()
