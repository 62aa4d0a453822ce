"""How many FedAvg rounds does the federated real-only classifier need? (a convergence probe)

    python bench/downstream_convergence.py LOCAL_EPOCHS MAX_ROUNDS PATIENCE_ROUNDS [--keep-optimizer-state]
        [--data runs/bench_difficulty/report_rare_small/data/manifest.csv] [--seeds 0 1 2]
        [--central | --central-only] [--central-epochs N] [--central-patience N]
        [--results bench/results/downstream_convergence_<date>.json]

The federated real-only downstream arm on the benchmark phantoms with the given schedule, one
run per seed, each stopped by holdout early stopping; prints where it stopped and its test
scores. ``--central`` also trains the central real-only arm on the same seeds (paired), so the
federated-minus-central gap comes with its spread; ``--results`` writes every run and the
mean +- sd to a JSON file. ``--central-only`` with ``--central-epochs`` / ``--central-patience``
probes how far the central arm gets when its holdout-patience stop waits longer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from phantom_world import phantom_manifest

from synthct.config import load_config, packaged_config_path
from synthct.pipeline.downstream import run_downstream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("local_epochs", type=int)
    parser.add_argument("rounds", type=int)
    parser.add_argument("patience_rounds", type=int)
    parser.add_argument("--data", default=None, help="manifest (default: render the demo sites)")
    parser.add_argument("--out", default="runs/bench_downstream_convergence")
    parser.add_argument(
        "--keep-optimizer-state", action="store_true", help="sites keep AdamW moments"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--central", action="store_true", help="also the central arm, paired")
    parser.add_argument(
        "--central-only", action="store_true", help="the central arm alone (no federated runs)"
    )
    parser.add_argument("--central-epochs", type=int, default=None, help="central epoch cap")
    parser.add_argument(
        "--central-patience", type=int, default=None, help="central holdout patience (epochs)"
    )
    parser.add_argument("--results", default=None, help="JSON file for every run and the summary")
    args = parser.parse_args()
    base = load_config(packaged_config_path("demo"))
    down = base.downstream.model_copy(
        update={
            "local_epochs": args.local_epochs,
            "rounds": args.rounds,
            "patience_rounds": args.patience_rounds,
            "keep_optimizer_state": args.keep_optimizer_state,
            "seeds": list(args.seeds),
            **({"epochs": args.central_epochs} if args.central_epochs else {}),
            **({"patience": args.central_patience} if args.central_patience else {}),
        }
    )
    config = base.model_copy(update={"downstream": down})
    kept = "_kept" if args.keep_optimizer_state else ""
    out = Path(args.out) / f"{args.local_epochs}_{args.rounds}_{args.patience_rounds}{kept}"
    manifest = Path(args.data) if args.data else phantom_manifest(config, Path(args.out))
    arms = ({} if args.central_only else {"federated": True}) | (
        {"central": False} if args.central or args.central_only else {}
    )
    runs: dict[str, list[dict]] = {}
    for arm, federated in arms.items():
        start = time.perf_counter()
        res = run_downstream(config, manifest, out / arm, federated=federated)
        wall = round(time.perf_counter() - start)
        runs[arm] = [
            {
                "seed": run["seed"],
                "stopping": run["stopping"],
                "test_balanced_accuracy": run["overall"]["balanced_accuracy"],
                "test_recall": run["overall"]["per_class_recall"],
                "worst_site_balanced_accuracy": run["worst_site_balanced_accuracy"],
            }
            for run in res["arms"]["real"]["runs"]
        ]
        print(json.dumps({"arm": arm, "runs": runs[arm], "wall_s": wall}), flush=True)
    summary = {
        arm: {
            key: [
                round(float(np.mean(v)), 4),
                round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else None,
            ]
            for key, v in {
                "test_balanced_accuracy": [r["test_balanced_accuracy"] for r in rs],
                "worst_site_balanced_accuracy": [r["worst_site_balanced_accuracy"] for r in rs],
                "rare_recall": [
                    np.mean([r["test_recall"][c] for c in config.labels.rare]) for r in rs
                ],
            }.items()
        }
        for arm, rs in runs.items()
    }
    if args.central and not args.central_only:
        gaps = [
            f["test_balanced_accuracy"] - c["test_balanced_accuracy"]
            for f, c in zip(runs["federated"], runs["central"], strict=True)
        ]
        summary["federated_minus_central"] = [round(g, 4) for g in gaps]
    print(json.dumps({"summary (mean, sd)": summary}), flush=True)
    if args.results:
        record = {
            "date": time.strftime("%Y-%m-%d"),
            "device": f"cpu ({os.cpu_count()} cores)",
            "command": "python bench/downstream_convergence.py " + " ".join(sys.argv[1:]),
            "schedule": down.model_dump(mode="json"),
            "runs": runs,
            "summary": summary,
        }
        Path(args.results).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
