"""How many FedAvg rounds does the federated real-only classifier need? (a convergence probe)

    python bench/downstream_convergence.py LOCAL_EPOCHS MAX_ROUNDS PATIENCE_ROUNDS [--keep-optimizer-state]
        [--data runs/bench_difficulty/report_rare_small/data/manifest.csv]

One seed of the federated real-only downstream arm on the benchmark phantoms with the given
schedule, stopped by holdout early stopping; prints where it stopped and its test scores (the
central arm's are in bench/results/benchmark_difficulty_*.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
    args = parser.parse_args()
    base = load_config(packaged_config_path("demo"))
    down = base.downstream.model_copy(
        update={
            "local_epochs": args.local_epochs,
            "rounds": args.rounds,
            "patience_rounds": args.patience_rounds,
            "keep_optimizer_state": args.keep_optimizer_state,
            "seeds": [0],
        }
    )
    config = base.model_copy(update={"downstream": down})
    kept = "_kept" if args.keep_optimizer_state else ""
    out = Path(args.out) / f"{args.local_epochs}_{args.rounds}_{args.patience_rounds}{kept}"
    manifest = Path(args.data) if args.data else phantom_manifest(config, Path(args.out))
    start = time.perf_counter()
    res = run_downstream(config, manifest, out, federated=True)
    run = res["arms"]["real"]["runs"][0]
    print(
        json.dumps(
            {
                "local_epochs": args.local_epochs,
                "max_rounds": args.rounds,
                "patience_rounds": args.patience_rounds,
                "keep_optimizer_state": args.keep_optimizer_state,
                "stopping": run["stopping"],
                "test_balanced_accuracy": run["overall"]["balanced_accuracy"],
                "test_recall": run["overall"]["per_class_recall"],
                "worst_site_balanced_accuracy": run["worst_site_balanced_accuracy"],
                "wall_s": round(time.perf_counter() - start),
            }
        )
    )


if __name__ == "__main__":
    main()
