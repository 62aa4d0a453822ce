"""The late-site plugin bench over seeds: mean and SD per arm, and how much of the base-to-
retraining gap in the late site's style the plugin closes (issue 24).

    python bench/plugins_seeds.py RESULT.json [RESULT.json ...] --out bench/results/plugins_seeds_<date>.json
        [--plugin fusion_site_e_only_decoder]

Reads ``bench/plugins.py`` result files (one per seed; trains nothing). The style metric is the
radiomics KID of an arm's cases to ``site_e``'s own holdout scans. Per seed,

    gap closed = (KID base - KID plugin) / (KID base - KID retrain)

(1.0: the plugin moves the cases as far toward the late site's scans as retraining does;
above 1: further; negative: away from them; undefined where retraining does not beat the
base). The issue's target is at least half, at no more than 10 % of the bytes of a full
update. Beside it, per seed, the three KIDs themselves: a ratio over a small retraining gap
says little on its own.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from phantom_world import bench_command

from synthct.artifacts import read_json, write_json
from synthct.eval.classification import mean_sd

METRICS = ("kid_radiomics_site_e", "kid_radiomics_other_sites", "conditional_accuracy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", required=True)
    p.add_argument("--plugin", default="fusion_site_e_only_decoder", help="the plugin arm")
    args = p.parse_args()
    runs = [read_json(f) for f in args.results]
    for f, r in zip(args.results, runs, strict=True):
        missing = [a for a in ("base", args.plugin, "retrain") if a not in r["arms"]]
        if missing:
            p.error(f"{f}: no {', '.join(missing)} arm (was retraining skipped by --budget-min?)")
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        p.error(f"the result files repeat a seed: {seeds}")
    arms = sorted(set.intersection(*(set(r["arms"]) for r in runs)))
    per_arm = {
        arm: {m: mean_sd([r["arms"][arm][m] for r in runs]) for m in METRICS} for arm in arms
    }
    closed, kids = [], []
    for r in runs:
        kid = {a: r["arms"][a]["kid_radiomics_site_e"] for a in ("base", args.plugin, "retrain")}
        gap = kid["base"] - kid["retrain"]
        closed.append(round((kid["base"] - kid[args.plugin]) / gap, 3) if gap > 0 else None)
        kids.append({"seed": r["seed"], **kid})
    bytes_share = [
        r["arms"][args.plugin]["bytes_sent_per_site"] / r["generator_update_bytes"] for r in runs
    ]
    write_json(
        args.out,
        {
            "date": time.strftime("%Y-%m-%d"),
            "seeds": seeds,
            "files": [str(f) for f in args.results],
            "plugin_arm": args.plugin,
            "gap_closed_per_seed": closed,
            "kid_radiomics_site_e_per_seed": kids,
            "plugin_share_of_generator_update": round(max(bytes_share), 4),
            "arms": per_arm,
            "command": bench_command("plugins_seeds.py", args, positional=("results",)),
        },
        kind="bench-plugins-seeds",
    )
    print(f"gap closed per seed: {closed}; plugin share of an update {max(bytes_share):.3f}")


if __name__ == "__main__":
    main()
